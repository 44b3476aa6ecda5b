"""Kernel generation for the GPU runtime.

config.py   declarative KernelConfig (family, bits, tile, arch) -> CUDA source and cache key
templates/  the CUDA templates (bit-plane m16n8k256 b1 AND-popc GEMM/GEMV, activation quantize+pack)
nvrtc.py    just-in-time compilation with NVRTC, cubin cache, SASS inspection
layout.py   the MMA-fragment weight layout the kernels read
planner.py  per-shape tile choice by measured autotuning, cached on disk
plan_report.py  every quantized linear's kernel choice per M (CompiledModel.kernel_plan)
"""
from .config import KernelConfig, all_configs

__all__ = ["KernelConfig", "all_configs"]

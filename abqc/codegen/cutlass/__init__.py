"""The CUTLASS path: bit-plane linears as one nvidia-cutlass b1 AND-popc GEMM plus a generated reduction.

config.py    declarative CutlassConfig (w_planes, a_bits, tile, stages, arch) -> the cutlass_library
             operation printed by its own emitter, and the (P, Q) reduction kernel
templates/   gemm.cu (extern "C" entry around the emitted instance), reduce.cu (2^(i+j) + epilogue)
launch.py    K padding, compilation (NVRTC, cached like every abqc kernel) and driver-API launches

Not wired into the planner yet: callers pick a CutlassConfig themselves.
"""
from .config import CutlassConfig, GemmConfig, ReduceConfig, catalogue

__all__ = ["CutlassConfig", "GemmConfig", "ReduceConfig", "catalogue"]

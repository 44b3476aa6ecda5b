"""Scratch (not committed): tests/test_cuda.py's tests touched by this branch, with only their builds precompiled."""
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_cuda import *  # noqa: F401,F403
import pytest
import torch

SAMPLE = [(1, 1), (2, 8), (3, 8), (4, 4), (8, 8)]


@pytest.fixture(scope="module", autouse=True)
def _subset():
    from abqc.codegen.config import KernelConfig, all_configs, gemv_channel_tiles, gemv_max_tokens
    from abqc.codegen.nvrtc import precompile
    arch = cuda.arch_of(torch.device("cuda"))
    cfgs = [c for c in all_configs(arch) if c.family not in ("bmma", "gemv", "wgmma")]
    cfgs += [c for c in all_configs(arch) if (c.w_planes, c.a_bits) in SAMPLE and c.family in ("wgmma", "bmma", "gemv")]
    precompile(cfgs)
    cuda.register()

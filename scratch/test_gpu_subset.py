"""Scratch (not committed): tests/test_cuda.py's tests with only the GEMV/packer builds precompiled."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_cuda import *  # noqa: F401,F403  (the test functions; not the all-config precompile fixture)
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _subset():
    from abqc.codegen.config import all_configs
    from abqc.codegen.nvrtc import precompile
    precompile([c for c in all_configs(cuda.arch_of(torch.device("cuda"))) if c.family in ("gemv", "quant_pack", "quant_int8")])
    cuda.register()

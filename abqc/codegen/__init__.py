"""Kernel generation for the GPU runtime (bit-plane binary tensor-core GEMM/GEMV instances)."""

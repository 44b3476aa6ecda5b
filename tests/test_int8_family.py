"""The INT8 family's kernels (int8.cu, quant_pack.cu built with INT8_CODES) against the CPU reference,
bit for bit, for every (w_bits, a_bits) in 1..8. Skipped without CUDA; kept apart from test_cuda.py so it
runs without compiling every bit-plane kernel first."""
import itertools

import pytest
import torch

from abqc import quant
from abqc.codegen import layout
from conftest import int64_group_matmul

cuda = pytest.importorskip("abqc.runtime.cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")]

from abqc.runtime import ops  # noqa: E402

# odd K and N tails, N not a multiple of 8, K < 32, M below and above torch._int_mm's 17 rows
SHAPES = [(1, 37, 77), (5, 130, 300), (19, 64, 1000), (64, 48, 513), (17, 64, 64), (40, 8, 31), (2, 29, 1000),
          (150, 141, 600)]   # the last: several INT8 GEMM blocks along M and N


@pytest.mark.parametrize("p,q", list(itertools.product(range(1, 9), range(1, 9))))
def test_int8_family_exact_all_pairs(p, q):
    """The INT8 family's codes and de-centred accumulators equal the CPU reference bit for bit."""
    gen = torch.Generator().manual_seed(1000 + 10 * p + q)
    for (m, n, k), symmetric in itertools.product(SHAPES, (False, True)):
        if symmetric and q == 1:
            continue
        words = -(-k // 32)
        x = torch.randn(m, k, generator=gen) * torch.linspace(0.2, 3, m).view(-1, 1)
        uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
        up, _, _, _ = ops.quantize_activation_padded(x, q, k, k, symmetric)
        codes, sums, _, _ = cuda.quant_int8(x.cuda(), q, words, k, symmetric, cuda.INT8_MIN_ROWS)
        want = torch.zeros(max(m, cuda.INT8_MIN_ROWS), words * 32, dtype=torch.int64)
        want[:m, :k] = up[:, :k].long() - 2 ** (q - 1)
        assert torch.equal(codes.cpu().long(), want) and torch.equal(sums.cpu().long().sum(1), want.sum(1)[:m])
        wt = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=words * 32).cuda(), words)
        w8 = cuda.int8_weights(wt, n, k, words).cpu().long()
        assert w8.shape == (-(-n // 8) * 8, words * 32)
        assert torch.equal(w8[:n, :k], uw - 2 ** (p - 1)) and not w8[n:].any() and not w8[:, k:].any()
        w_sum = uw.sum(1, keepdim=True).int().cuda()
        ones = torch.ones(n, 1, device="cuda")
        ws = torch.rand(n, 1, generator=gen).add(0.5).cuda()      # weight scales: the float epilogue too
        zeros = torch.zeros(n, 1, dtype=torch.int32, device="cuda")
        got = cuda.int8_linear(x.cuda(), wt, ones, zeros, w_sum, None, n, q, words, k, symmetric, integer=True)
        assert torch.equal(got.cpu().long(), int64_group_matmul(up[:, :k].long(), uw, words * 32)), (m, n, k)
        # abqc's own INT8 GEMM (weights unpacked in shared memory) gives torch._int_mm's accumulators exactly
        acc = cuda.int8_gemm(codes, wt, n, m)
        assert torch.equal(acc, torch._int_mm(codes, cuda.int8_weights(wt, n, k, words).t())[:m, :n]), (m, n, k)
        fused = cuda.int8_linear(x.cuda(), wt, ones, zeros, w_sum, None, n, q, words, k, symmetric, integer=True,
                                 gemm="int8k")
        assert torch.equal(fused, got), (m, n, k)
        if cuda.fp8_applicable(p, q, torch.device("cuda")):
            # the FP8 family: the same centred codes as float8_e4m3fn on torch._scaled_mm, exact integers
            rows = -(-m // cuda.FP8_ROWS) * cuda.FP8_ROWS
            acc8 = cuda.fp8_gemm(cuda.quant_int8(x.cuda(), q, words, k, symmetric, rows)[0],
                                 cuda.int8_weights(wt, n, k, words, cuda.FP8_ROWS))
            assert torch.equal(acc8[:m, :n].long(), acc.long()), (m, n, k)
            for integer in (True, False):
                want = cuda.int8_linear(x.cuda(), wt, ws, zeros, w_sum, None, n, q, words, k, symmetric,
                                        integer=integer)
                assert torch.equal(cuda.int8_linear(x.cuda(), wt, ws, zeros, w_sum, None, n, q, words, k, symmetric,
                                                    integer=integer, gemm="fp8"), want), (m, n, k, integer)

"""Determinism on CPU: the same model, seed and config give the same packed weights, scales, zero points
and code sums bit for bit, and the same logits; packing does not depend on the thread count."""
import pytest
import torch

import abqc
from abqc.runtime import QuantLinear
from conftest import tiny_model

BUFFERS = ("w_planes", "w_scale", "w_zero", "w_sum", "bias")


def _quantized(model, bits, threads=None):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        q = abqc.compile(model, bits=bits, passes=("rtn", "lower"), seed=0, progress=False)
    finally:
        torch.set_num_threads(old)
    return q, {name: m for name, m in q.model.named_modules() if isinstance(m, QuantLinear)}


def _assert_same_buffers(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:
        for buf in BUFFERS:
            x, y = getattr(a[name], buf), getattr(b[name], buf)
            assert (x is None) == (y is None), (name, buf)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), (name, buf)


@pytest.mark.parametrize("kind,bits", [("llama", "w4a8"), ("qwen2", "w2*a8,down=w4a8g32"), ("llama", "w3a16g64")])
def test_same_config_same_bits(kind, bits):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    q1, lin1 = _quantized(tiny_model(kind, layers=1, seed=3), bits)
    q2, lin2 = _quantized(tiny_model(kind, layers=1, seed=3), bits, threads=1)
    _assert_same_buffers(lin1, lin2)
    with torch.no_grad():
        assert torch.equal(q1(ids).logits, q2(ids).logits)
    # the check can fail: a different model gives different packed weights
    _, other = _quantized(tiny_model(kind, layers=1, seed=4), bits)
    assert not all(torch.equal(lin1[n].w_planes, other[n].w_planes) for n in lin1)


def _gpu_ready() -> bool:
    try:
        from abqc.runtime import cuda
    except ImportError:
        return False
    return cuda.available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")
@pytest.mark.parametrize("bits", ["w4a8", "w2*a8", "w3a8g64"])
@pytest.mark.parametrize("m", [1, 40])
def test_gpu_kernels_run_to_run_bit_identical(bits, m):
    # the README's GPU tolerance: exact integers, a float32 epilogue in an order fixed by the kernel config
    from abqc import quant
    from abqc.bits import parse_pair
    torch.manual_seed(0)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(300, 70)
    qw = quant.quantize_weight(lin.weight, pair.w_bits, pair.group_size, symmetric=pair.balanced,
                               balanced=pair.balanced)
    a, b = QuantLinear.from_linear(lin, pair, qw).cuda(), QuantLinear.from_linear(lin, pair, qw).cuda()
    x = torch.randn(m, 300, device="cuda")
    y = a(x)
    assert torch.equal(y, a(x)) and torch.equal(y, b(x))
    torch.testing.assert_close(y.cpu(), QuantLinear.from_linear(lin, pair, qw)(x.cpu()), rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", ["w1a8", "w2*a8", "w3a8g32", "w4a8", "w4a8g32f", "w8a8g64f", "w6a6"])
def test_quantizer_gives_the_same_bits_on_cuda_as_on_cpu(bits):
    """Weights quantized on the GPU (the calibration quantizes where it runs) equal the CPU's bit for bit:
    codes, scales, zero points; and per-token activation codes and scales too (CUDA divides by a Python
    scalar as a multiply by its reciprocal, so the quantizer divides by device tensors)."""
    from abqc import quant
    from abqc.bits import parse_pair
    pair = parse_pair(bits)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(96, 200, generator=gen) * torch.rand(96, 1, generator=gen) + 0.01
    grid = quant.weight_grid_of(pair)
    c, g = quant.quantize_weight(w, **grid), quant.quantize_weight(w.cuda(), **grid)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(getattr(c, name), getattr(g, name).cpu()), (bits, name)
    x = torch.randn(40, 300, generator=gen) * 3
    for sym in ([False, True] if pair.a_bits > 1 else [False]):
        uc, sc, zc = quant.quantize_activation(x, pair.a_bits, sym)
        ug, sg, zg = quant.quantize_activation(x.cuda(), pair.a_bits, sym)
        assert torch.equal(uc, ug.cpu()) and torch.equal(sc, sg.cpu()) and torch.equal(zc, zg.cpu()), (bits, sym)

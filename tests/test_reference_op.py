"""The bit-plane integer core must equal an int64 matmul of the codes, bit for bit."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abqc import quant
from conftest import int64_group_matmul
from abqc.bits import parse_pair
from abqc.runtime import FakeQuantLinear, QuantLinear, cpu_impl, reference


def _codes(rows, k, bits, gen):
    return torch.randint(0, 2 ** bits, (rows, k), generator=gen)


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("q", range(1, 9))
def test_all_bit_pairs_exact(p, q):
    gen = torch.Generator().manual_seed(p * 10 + q)
    m, n, k = 3, 5, 77                                  # odd K and N: tails inside the last word
    ua, uw = _codes(m, k, q, gen), _codes(n, k, p, gen)
    a, w = quant.pack_bitplanes(ua, q), quant.pack_bitplanes(uw, p)
    expect = int64_group_matmul(ua, uw, k)
    for impl in ("bitplane", "codes"):
        with cpu_impl(impl):
            got = torch.ops.abqc.bitplane_mm(a, w, a.shape[2])
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64), expect), impl


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 8), q=st.integers(1, 8), m=st.integers(1, 9), n=st.integers(1, 13),
       k=st.integers(1, 300), group_words=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2 ** 16))
def test_grouped_products_exact(p, q, m, n, k, group_words, seed):
    gen = torch.Generator().manual_seed(seed)
    ua, uw = _codes(m, k, q, gen), _codes(n, k, p, gen)
    pad = group_words * 32
    a, w = quant.pack_bitplanes(ua, q, pad_to=pad), quant.pack_bitplanes(uw, p, pad_to=pad)
    expect = int64_group_matmul(ua, uw, pad)
    assert torch.equal(reference.accumulate_bitplane(a, w, group_words), expect)
    assert torch.equal(reference.accumulate_codes(a, w, group_words), expect)


def test_eight_bit_long_k_uses_exact_float64():
    # 255*255*K exceeds 2^24: a float32 GEMM would round, the reference must not
    gen = torch.Generator().manual_seed(1)
    ua, uw = torch.full((2, 4096), 255), _codes(3, 4096, 8, gen)
    a, w = quant.pack_bitplanes(ua, 8), quant.pack_bitplanes(uw, 8)
    assert reference.exact_dtype(8, 8, 4096) == torch.float64
    assert torch.equal(reference.accumulate_codes(a, w, a.shape[2]), int64_group_matmul(ua, uw, 4096 + 0))


def test_popcount():
    x = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000, 0x12345678, -1], dtype=torch.int64)
    assert popcounts(x) == [0, 1, 32, 1, 13, 32]


def popcounts(x):
    return reference.popcount32(x).tolist()


def test_shape_errors():
    a = torch.zeros(2, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not agree"):
        torch.ops.abqc.bitplane_mm(a, torch.zeros(2, 3, 5, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="must divide"):
        torch.ops.abqc.bitplane_mm(a, torch.zeros(2, 3, 4, dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.abqc.bitplane_mm(a.long(), a, 1)


@pytest.mark.parametrize("bits", ["w4a8", "w2a8", "w2*a8", "w3a4g32", "w8a8", "w1a1", "w6a6g64", "w4a16", "w2a16g32"])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_fake_quant(bits, bias):
    torch.manual_seed(0)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(150, 37, bias=bias)
    qw = quant.quantize_weight(lin.weight, pair.w_bits, pair.group_size, symmetric=pair.balanced,
                               balanced=pair.balanced)
    real = QuantLinear.from_linear(lin, pair, qw)
    fake = FakeQuantLinear(qw.dequantize(), lin.bias, pair)
    x = torch.randn(2, 5, 150)
    assert torch.allclose(real.dequantized_weight(), qw.dequantize())
    y_real = real(x)
    assert y_real.shape == (2, 5, 37)
    torch.testing.assert_close(y_real, fake(x), rtol=1e-5, atol=1e-5)
    with cpu_impl("bitplane"):
        torch.testing.assert_close(real(x), y_real, rtol=1e-6, atol=1e-6)


def test_ops_registered_and_pass_opcheck():
    assert hasattr(torch.ops.abqc, "bitplane_mm") and hasattr(torch.ops.abqc, "wpaq_linear")
    gen = torch.Generator().manual_seed(0)
    a = quant.pack_bitplanes(_codes(4, 70, 3, gen), 3)
    w = quant.pack_bitplanes(_codes(6, 70, 2, gen), 2)
    torch.library.opcheck(torch.ops.abqc.bitplane_mm.default, (a, w, 3))
    lin = torch.nn.Linear(70, 6)
    pair = parse_pair("w2a3")
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, 2))
    args = (torch.randn(4, 70), ql.w_planes, ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, 3, ql.group_size, 70, False)
    torch.library.opcheck(torch.ops.abqc.wpaq_linear.default, args, test_utils=("test_schema", "test_faketensor"))


def test_dtype_casts_keep_float32_epilogue():
    torch.manual_seed(0)
    pair = parse_pair("w4a8")
    lin = torch.nn.Linear(96, 24)
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, 4))
    x = torch.randn(3, 96)
    ref = ql(x.half().float())
    ql.half()
    assert ql.w_scale.dtype == torch.float32 and ql.bias.dtype == torch.float32
    assert ql.w_planes.dtype == torch.int32 and ql.w_zero.dtype == torch.int32
    y = ql(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits,k", [("w4a8g64", 300), ("w2a4g32", 77), ("w8a8g128", 1000), ("w3a6g32", 64)])
def test_grouped_cpu_path_equals_integer_epilogue(bits, k):
    """The CPU codes path for grouped weights (scales folded into the codes, one float64 GEMM) gives the
    integer accumulators' epilogue to float64 rounding, tail groups and bias included."""
    from abqc.runtime import ops
    pair = parse_pair(bits)
    torch.manual_seed(k)
    lin = torch.nn.Linear(k, 40, bias=True)
    qw = quant.quantize_weight(lin.weight, pair.w_bits, pair.group_size)
    ql = QuantLinear.from_linear(lin, pair, qw)
    x = torch.randn(9, k) * 3
    up, a_sum, a_scale, a_zero = ops.quantize_activation_padded(x, pair.a_bits, pair.group_size, k, False)
    uw = quant.unpack_bitplanes(ql.w_planes)
    gw, kp = ops.group_layout(k, pair.group_size)
    assert kp // (gw * 32) > 1
    acc = reference.accumulate_from_codes(up, uw, kp // (gw * 32), pair.a_bits, ql.w_planes.shape[0])
    ref = ops.epilogue(acc, a_sum, a_scale, a_zero, ql.w_sum, ql.w_scale, ql.w_zero, pair.group_size, k, ql.bias,
                       torch.float64)
    got = ops.grouped_linear_from_codes(up, a_sum, a_scale, a_zero, uw, ql.w_scale, ql.w_zero, ql.w_sum,
                                        pair.group_size, k, ql.bias, torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with cpu_impl("bitplane"):                      # and the module's float32 output equals the literal path
        literal = ql(x)
    torch.testing.assert_close(ql(x), literal, rtol=1e-6, atol=1e-6)

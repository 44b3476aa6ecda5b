import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abqc import quant


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [None, 32, 64])
def test_weight_codes_in_range_and_error_bounded(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(24, 100)
    qw = quant.quantize_weight(w, bits, group)
    assert qw.codes.min() >= 0 and qw.codes.max() <= 2 ** bits - 1
    assert qw.zero.min() >= 0 and qw.zero.max() <= 2 ** bits - 1
    g = group or 100
    assert qw.scale.shape == (24, -(-100 // g))
    # within the (0-including) range the rounding error is at most half a step
    step = qw.scale.repeat_interleave(g, 1)[:, :100]
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [(quant.fake_quant_weight(w, b) - w).norm().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_groups_beat_per_channel():
    w = torch.randn(64, 256) * torch.linspace(0.1, 5, 256)   # channel-varying magnitude along K
    assert (quant.fake_quant_weight(w, 3, 32) - w).norm() < (quant.fake_quant_weight(w, 3) - w).norm()


def test_symmetric_and_balanced_grids():
    w = torch.linspace(-1, 1, 41).repeat(3, 1)
    sym = quant.quantize_weight(w, 2, symmetric=True)
    assert (sym.zero == 2).all() and set(sym.codes.unique().tolist()) <= {0, 1, 2, 3}
    # the lopsided INT2 grid {-2,-1,0,1}: symmetric data never reaches -2, so only 3 levels are used
    assert (sym.codes.float() - 2).unique().tolist() == [-1.0, 0.0, 1.0]
    bal = quant.quantize_weight(w, 2, symmetric=True, balanced=True)
    assert bal.planes == 3 and (bal.zero == 2).all()
    assert (bal.codes.float() - 2).unique().tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    # the balanced grid is symmetric, so +-max are both representable exactly
    deq = bal.dequantize()
    assert torch.allclose(deq[:, 0], -deq[:, -1]) and torch.allclose(deq[:, -1], torch.ones(3))
    with pytest.raises(ValueError, match="symmetric 1-bit"):
        quant.quantize_weight(w, 1, symmetric=True)


def test_clip_factors_shrink_range():
    w = torch.randn(8, 64)
    full = quant.quantize_weight(w, 4)
    clipped = quant.quantize_weight(w, 4, clip_max=torch.full((8, 1), 0.5), clip_min=torch.full((8, 1), 0.5))
    assert (clipped.scale < full.scale).all()


def test_activation_per_token():
    x = torch.randn(5, 7, 33) * torch.arange(1, 6).view(5, 1, 1)
    u, s, z = quant.quantize_activation(x, 8)
    assert u.shape == x.shape and s.shape == (5, 7, 1)
    assert u.min() >= 0 and u.max() <= 255 and (u == u.round()).all()
    assert ((quant.fake_quant_activation(x, 8) - x).abs() <= s / 2 + 1e-6).all()
    assert quant.fake_quant_activation(x, 16) is x


@settings(max_examples=60, deadline=None)
@given(planes=st.integers(1, 8), rows=st.integers(1, 9), k=st.integers(1, 200),
       pad=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_roundtrip(planes, rows, k, pad, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** planes, (rows, k), generator=g)
    words = quant.pack_bitplanes(codes, planes, pad_to=pad)
    assert words.dtype == torch.int32 and words.shape == (planes, rows, -(-k // pad) * pad // 32)
    assert torch.equal(quant.unpack_bitplanes(words, k), codes)
    # padding is zero in every plane
    assert (quant.unpack_bitplanes(words)[:, k:] == 0).all()


def test_pack_layout_lsb_first():
    codes = torch.zeros(1, 64, dtype=torch.int64)
    codes[0, 0] = 1      # plane 0, word 0, bit 0
    codes[0, 33] = 2     # plane 1, word 1, bit 1
    codes[0, 31] = 1     # plane 0, word 0, bit 31 -> sign bit of an int32
    w = quant.pack_bitplanes(codes, 2)
    assert w[0, 0, 0].item() == 1 - 2 ** 31 and w[0, 0, 1].item() == 0
    assert w[1, 0, 1].item() == 2 and w[1, 0, 0].item() == 0


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="codes must lie"):
        quant.pack_bitplanes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="codes must lie"):
        quant.pack_bitplanes(torch.tensor([[-1]]), 2)


def test_fractional_zero_grid_rebuilds_scale_plus_offset_weights():
    """Weights that are d*q + m per group of 32 (GGUF Q4_1's form, m a float) come back from the "f" grid to
    the 2^-8 zero step, where the integer zero point leaves a sizeable error; zeros are exact in fixed point."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 48, 256, 32
    d = torch.rand(n, k // g, 1, generator=gen) * 0.02 + 1e-3
    m = 0.03 - torch.rand(n, k // g, 1, generator=gen) * 0.1          # some groups entirely positive
    q = torch.randint(0, 16, (n, k // g, g), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15                                          # each group spans all 16 levels
    w = (d * q + m).view(n, k)
    integer = quant.quantize_weight(w, 4, g)
    frac = quant.quantize_weight(w, 4, g, frac_zero=True)
    err = lambda qw: float((qw.dequantize() - w).norm() / w.norm())   # noqa: E731
    assert err(frac) < 3e-4 < 1e-2 < err(integer)
    assert torch.equal(frac.codes.view(n, -1, g).float(), q)             # the very codes Q4_1 stored
    fixed = quant.zero_fixed(frac.zero)
    assert fixed.dtype == torch.int32 and torch.equal(quant.zero_of_fixed(fixed).float(), frac.zero)
    assert bool((frac.zero != frac.zero.round()).any()) and bool((frac.zero < 0).any())
    assert torch.equal(quant.zero_fixed(integer.zero), integer.zero.to(torch.int32) * 2 ** quant.ZERO_FRAC_BITS)
    # a constant (here all-positive) group still reconstructs, with its zero inside the int32 range
    c = quant.quantize_weight(torch.full((2, 64), 0.37), 4, 32, frac_zero=True)
    assert float((c.dequantize() - 0.37).abs().max()) < 1e-6
    assert float(c.zero.abs().max()) <= quant.FRAC_ZERO_RANGE
    # the trainable path has the same arithmetic
    ste = quant.fake_quant_weight_ste(w, 4, g, frac_zero=True)
    assert torch.equal(ste, frac.dequantize())


def test_weight_grid_of_pairs_and_refuses_symmetric_fractional():
    from abqc.bits import parse_pair
    assert quant.weight_grid_of(parse_pair("w4a8g32f")) == {"bits": 4, "group_size": 32, "symmetric": False,
                                                            "balanced": False, "frac_zero": True}
    assert quant.weight_grid_of(parse_pair("w2*a8"))["symmetric"] is True
    with pytest.raises(ValueError, match="asymmetric grid"):
        quant.weight_grid_of(parse_pair("w4a8f"), weight_symmetric=True)


def test_kernels_use_the_same_zero_point_fixed_point():
    from importlib import resources
    text = resources.files("abqc.codegen").joinpath("templates", "common.cuh").read_text()
    assert f"#define W_ZERO_FRAC_BITS {quant.ZERO_FRAC_BITS}\n" in text

"""Hypothesis fuzzing of the formats every kernel shares: the bit-plane word layout, the W(p)A(q) linear
op against an int64 oracle, and the bit-spec parser (total: a spec or BitSpecError, nothing else).

tests/test_quant.py already round-trips pack/unpack and tests/test_reference_op.py checks the integer
core's accumulators; these tests add independent oracles (Python-int word layout, the op's full
epilogue in int64), extreme inputs, and the parser. Small max_examples and deadline=None keep the file
to seconds.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from abqc import quant
from abqc.bits import ROLES, BitPair, BitSpec, Selector, parse_bits
from abqc.errors import BitSpecError
from abqc.runtime import cpu_impl, ops

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _codes(rows: int, k: int, planes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2 ** planes, (rows, k), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- bit-plane layout

def _word(codes_row: list[int], plane: int, word: int) -> int:
    """Word `word` of `plane` from the README's definition, in plain Python ints, as a signed int32."""
    v = 0
    for b in range(32):
        k = word * 32 + b
        if k < len(codes_row):
            v |= ((codes_row[k] >> plane) & 1) << b
    return v - (1 << 32) if v >= 1 << 31 else v


@FAST
@given(planes=st.integers(1, 8), rows=st.integers(1, 4), k=st.integers(0, 60).map(lambda i: 2 * i + 1),
       pad=st.sampled_from([32, 64]), seed=st.integers(0, 2 ** 16))
def test_pack_layout_matches_definition(planes, rows, k, pad, seed):
    codes = _codes(rows, k, planes, seed)
    words = quant.pack_bitplanes(codes, planes, pad_to=pad)
    rows_py = codes.tolist()
    expect = [[[_word(rows_py[r], i, w) for w in range(words.shape[2])] for r in range(rows)] for i in range(planes)]
    assert words.tolist() == expect


@FAST
@given(planes=st.integers(1, 8), rows=st.integers(1, 6), k=st.integers(0, 100).map(lambda i: 2 * i + 1),
       dtype=st.sampled_from([torch.int16, torch.int32, torch.int64, torch.uint8]), transposed=st.booleans(),
       fill=st.sampled_from(["random", "zeros", "max"]), seed=st.integers(0, 2 ** 16))
def test_pack_round_trip_any_int_dtype_and_layout(planes, rows, k, dtype, transposed, fill, seed):
    codes = {"random": _codes(rows, k, planes, seed), "zeros": torch.zeros(rows, k, dtype=torch.int64),
             "max": torch.full((rows, k), 2 ** planes - 1)}[fill]
    src = codes.to(dtype)
    if transposed:   # a non-contiguous view of the same codes
        src = src.T.contiguous().T
    words = quant.pack_bitplanes(src, planes)
    assert torch.equal(quant.unpack_bitplanes(words, k).to(torch.int64), codes)


@FAST
@given(planes=st.integers(1, 8), k=st.integers(1, 70), over=st.integers(1, 300), negative=st.booleans(),
       pos=st.integers(0, 10 ** 6), seed=st.integers(0, 2 ** 16))
def test_pack_refuses_codes_out_of_range(planes, k, over, negative, pos, seed):
    codes = _codes(2, k, planes, seed)
    codes.view(-1)[pos % codes.numel()] = -over if negative else 2 ** planes - 1 + over
    with pytest.raises(ValueError, match="codes must lie in"):
        quant.pack_bitplanes(codes, planes)


# ---------------------------------------------------------------- W(p)A(q) linear against int64

def _oracle(x, qw, a_bits, act_symmetric, bias):
    """y = sum_g s_w * s_a * sum_{k in g} (u_a - z_a)(u_w - z_w) + bias, the integer part in int64 (z_w in
    fixed point, quant.zero_fixed: an exact integer times 2^-ZERO_FRAC_BITS)."""
    n, k = qw.codes.shape
    ua, sa, za = quant.quantize_activation(x, a_bits, act_symmetric)
    gw, _ = ops.group_layout(k, qw.group_size)
    gs = gw * 32
    da = ua.to(torch.int64) - za.to(torch.int64)                  # [M, K]
    f = quant.ZERO_FRAC_BITS
    zw = quant.zero_fixed(qw.zero).to(torch.int64)
    dw = qw.codes.to(torch.int64) * 2 ** f - torch.repeat_interleave(zw, gs, 1)[:, :k]
    t = torch.stack([da[:, g:g + gs] @ dw[:, g:g + gs].T for g in range(0, k, gs)], -1)   # [M, N, G] int64
    y = (t.to(torch.float64) * qw.scale.to(torch.float64).unsqueeze(0)).sum(-1) * sa.to(torch.float64) / 2 ** f
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def _activations(kind: str, m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    return {"randn": x, "zeros": torch.zeros(m, k), "constant": torch.full((m, k), -0.75),
            "huge": x * 1e4, "tiny": x * 1e-6, "outlier": x.index_fill(1, torch.tensor([k // 2]), 300.0),
            "positive": x.abs()}[kind]


@FAST
@given(p=st.integers(1, 8), q=st.integers(1, 8), m=st.integers(1, 5), n=st.integers(1, 9),
       k=st.integers(0, 80).map(lambda i: 2 * i + 1), group=st.sampled_from([None, 32, 64]),
       act_symmetric=st.booleans(), weight_grid=st.sampled_from(["asym", "sym", "frac"]), with_bias=st.booleans(),
       kind=st.sampled_from(["randn", "zeros", "constant", "huge", "tiny", "outlier", "positive"]),
       impl=st.sampled_from(["codes", "bitplane"]), seed=st.integers(0, 2 ** 16))
def test_wpaq_linear_matches_int64_oracle(p, q, m, n, k, group, act_symmetric, weight_grid, with_bias, kind,
                                          impl, seed):
    assume(not (act_symmetric and q == 1) and not (weight_grid == "sym" and p == 1))   # no symmetric 1-bit grid
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    qw = quant.quantize_weight(w, p, group, symmetric=weight_grid == "sym", frac_zero=weight_grid == "frac")
    gw, kp = ops.group_layout(k, qw.group_size)
    planes = quant.pack_bitplanes(qw.codes, qw.planes, pad_to=gw * 32)
    w_sum = torch.nn.functional.pad(qw.codes.to(torch.int64), (0, kp - k)).view(n, -1, gw * 32).sum(-1)
    x = _activations(kind, m, k, seed)
    with cpu_impl(impl):
        y = torch.ops.abqc.wpaq_linear(x, planes, qw.scale, quant.zero_fixed(qw.zero), w_sum.to(torch.int32), bias,
                                       q, qw.group_size, k, act_symmetric)
    assert torch.equal(y, _oracle(x, qw, q, act_symmetric, bias))
    assert torch.isfinite(y).all()


@settings(max_examples=8, deadline=None)
@given(p=st.integers(5, 8), q=st.integers(5, 8), impl=st.sampled_from(["codes", "bitplane"]))
def test_bitplane_mm_at_the_int32_limit(p, q, impl):
    # all-max codes over a long K group: for 8x8 the accumulator sits just under 2^31, where an int32
    # intermediate or a float32 GEMM would round or wrap
    limit = (2 ** 31 - 1) // ((2 ** p - 1) * (2 ** q - 1) * 32)   # longest group (words) int32 can hold
    group_words = min(limit, 1024)
    k = group_words * 32
    a = quant.pack_bitplanes(torch.full((2, k), 2 ** q - 1), q)
    w = quant.pack_bitplanes(torch.full((3, k), 2 ** p - 1), p)
    with cpu_impl(impl):
        acc = torch.ops.abqc.bitplane_mm(a, w, group_words)
    expect = (2 ** p - 1) * (2 ** q - 1) * k
    assert torch.equal(acc, torch.full((2, 3, 1), expect, dtype=torch.int32))
    # one word more per group could overflow: refused before any arithmetic
    a1, w1 = torch.zeros(q, 1, limit + 1, dtype=torch.int32), torch.zeros(p, 1, limit + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="too long for int32"):
        torch.ops.abqc.bitplane_mm(a1, w1, limit + 1)


# ---------------------------------------------------------------- bit-spec parser

def _parse_or_refuse(text, overrides=None):
    """The parser's contract: a spec whose str() parses back to itself, or BitSpecError; nothing else."""
    try:
        spec = parse_bits(text, overrides)
    except BitSpecError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert isinstance(spec, BitSpec)
    assert parse_bits(str(spec)) == spec
    return spec


GRAMMAR_TOKENS = ["w", "a", "g", "*", ",", ";", "=", ".", "-", " ", "0", "1", "2", "3", "4", "8", "9", "16", "32",
                  "64", "128", "q", "o", "gate", "up", "down", "W", "A", "G", "DOWN", "\t", "x", "w4a8", "w2*a8",
                  "w16a16", "0-2", "3.down", "٣", "²"]


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(GRAMMAR_TOKENS), max_size=14).map("".join))
def test_parser_on_grammar_like_text(text):
    _parse_or_refuse(text)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_parser_on_arbitrary_text(text):
    _parse_or_refuse(text)


@settings(max_examples=60, deadline=None)
@given(overrides=st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 40), st.none()),
                                 st.one_of(st.text(max_size=10), st.integers(0, 20), st.none(),
                                           st.builds(BitPair, st.integers(0, 17), st.integers(0, 17))),
                                 max_size=3))
def test_parser_on_arbitrary_override_dicts(overrides):
    _parse_or_refuse("w4a8", overrides)


pairs = st.one_of(
    st.just(BitPair(16, 16)),
    st.builds(BitPair, st.integers(1, 8), st.sampled_from(list(range(1, 9)) + [16]), st.just(False),
              st.one_of(st.none(), st.integers(1, 8).map(lambda i: 32 * i))),
    st.builds(BitPair, st.just(2), st.sampled_from(list(range(1, 9)) + [16]), st.just(True), st.none()),
)
selectors = st.one_of(
    st.builds(lambda r: Selector(None, None, r), st.sampled_from(ROLES)),
    st.builds(lambda a, d, r: Selector(a, a + d, r), st.integers(0, 40), st.integers(0, 5),
              st.one_of(st.none(), st.sampled_from(ROLES))),
)


def _spell(obj, upper: bool, spaced: bool) -> str:
    s = str(obj)
    s = s.upper() if upper else s
    return " ".join(s) if spaced else s


@settings(max_examples=80, deadline=None)
@given(default=pairs, overrides=st.lists(st.tuples(selectors, pairs), max_size=4), upper=st.booleans(),
       spaced=st.booleans(), semicolons=st.booleans())
def test_valid_specs_parse_to_what_was_written(default, overrides, upper, spaced, semicolons):
    sep = ";" if semicolons else ","
    text = sep.join([_spell(default, upper, spaced)] +
                    [f"{_spell(s, upper, spaced)}={_spell(p, upper, spaced)}" for s, p in overrides])
    spec = _parse_or_refuse(text)
    assert spec == BitSpec(default, tuple(overrides))
    # the same spec from objects plus a dict of overrides resolves every linear the same way
    assume(len({str(sel) for sel, _ in overrides}) == len(overrides))   # a dict holds one entry per selector
    via_dict = parse_bits(default, {str(sel): pair for sel, pair in overrides})
    assert all(spec.for_linear(layer, role) == via_dict.for_linear(layer, role)
               for layer in (0, 3, 41) for role in ROLES)

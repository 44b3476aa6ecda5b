"""The wgmma8 family (Hopper INT8 warpgroup MMA, weights unpacked from bit-planes in registers) against the
CPU reference. Skipped without an sm_90 GPU; run on the device machine: python -m pytest -q tests/test_wgmma8.py"""
import itertools

import pytest
import torch

from abqc import quant
from abqc.bits import parse_pair
from abqc.codegen import layout
from abqc.codegen.config import WGMMA8_TOKENS, WGMMA8_WARPGROUPS

cuda = pytest.importorskip("abqc.runtime.cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not cuda.available() or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU (sm_90a)")]

from abqc.runtime import QuantLinear  # noqa: E402

# K tails inside a word, a step and a pipeline ring; N past a 64/128-channel block; M past 8 and a token tile
SHAPES = [(1, 37, 77), (5, 130, 300), (19, 64, 1000), (70, 200, 513), (130, 16, 2304)]
TILES = [("wgmma8", wg, tn // 8) for wg, tn in itertools.product(WGMMA8_WARPGROUPS, WGMMA8_TOKENS)]


def _specified(m, k, steps):
    """Where quant_u8's output is defined: rows < M and k < 32 * words (the rest meets zero weights)."""
    return layout.byte_codes(torch.ones(m, -(-k // 32) * 32, dtype=torch.uint8), steps).bool()


@pytest.mark.parametrize("q", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_u8_matches_the_packer(q, dtype):
    """quant_u8's byte codes are the activation packer's codes in wgmma8's K order; sums, scales, zeros equal."""
    gen = torch.Generator().manual_seed(q)
    for m, k in [(1, 77), (19, 1000), (600, 4096), (3, 11008)]:
        x = (torch.randn(m, k, generator=gen) * 3).to(dtype).cuda()
        kw = -(-k // 32)
        planes, sums, scale, zero = cuda.quant_pack(x, q, kw, 1, k, False)
        codes, sums8, scale8, zero8 = cuda.quant_u8(x, q, kw, k, False)
        u = quant.unpack_bitplanes(planes.cpu(), k)
        steps = layout.steps_per_group(kw)
        want, where = layout.byte_codes(u, steps), _specified(m, k, steps)
        assert codes.shape == want.shape
        assert torch.equal(codes.cpu()[where], want[where]), (m, k)
        assert torch.equal(sums8.sum(1), sums.sum(1)) and torch.equal(scale8, scale) and torch.equal(zero8, zero)


@pytest.mark.parametrize("p", range(1, 9))
def test_wgmma8_integer_exact(p):
    """sum_k u_a * u_w from the GPU equals the CPU's for every weight width, every tile, with M, N, K tails."""
    gen = torch.Generator().manual_seed(300 + p)
    for m, n, k in SHAPES:
        kw = -(-k // 32)
        steps = layout.steps_per_group(kw)
        ua = torch.randint(0, 256, (m, k), generator=gen)
        uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
        wt = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=kw * 32).cuda(), kw)
        codes = layout.byte_codes(ua, steps).cuda()
        # bytes the kernel must ignore: past K (zero weights there) and rows >= M (columns never stored)
        codes[~_specified(m, k, steps).cuda()] = 0xA5
        expect = ua.long() @ uw.long().T
        for tile in TILES:
            got = cuda.wgmma8(wt, codes, m, n, k, kw, 0, tile=tile).cpu()
            assert torch.equal(got[..., 0].long(), expect), (m, n, k, tile)


@pytest.mark.parametrize("bits", ["w2a8", "w4a4", "w3a8", "w8a8", "w2*a8", "w6a6"])
def test_wgmma8_linear_equals_bmma(bits):
    """bmma_linear through wgmma8 gives the bmma family's output bit for bit (the same integers through the
    same epilogue), with bias and f16 / bf16 activations; grouped weights are refused."""
    torch.manual_seed(7)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(1000, 300, bias=True)
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))).cuda()
    gw, groups = ql.group_words_and_count()
    for dtype, m in itertools.product((torch.float16, torch.bfloat16), (1, 150)):
        x = torch.randn(m, 1000, device="cuda", dtype=dtype)

        def run(tile):
            return cuda.bmma_linear(x, ql.tiled_weights(), ql.w_scale, ql.w_zero, ql.w_sum, ql.bias,
                                    ql.out_features, pair.a_bits, gw, groups, ql.in_features, False, tile=tile)

        ref = run(("bmma", 4, 1))
        for tile in TILES:
            assert torch.equal(run(tile), ref), (bits, dtype, m, tile)
    wt = layout.tile_weights(torch.zeros(2, 300, 32, dtype=torch.int32, device="cuda"), 2)
    with pytest.raises(ValueError, match="per-channel|K layout"):
        cuda.bmma_linear(x, wt, ql.w_scale, ql.w_zero, ql.w_sum, None, 300, 8, 2, 16, 1000, False,
                         tile=TILES[0])

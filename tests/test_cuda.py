"""GPU kernels against the CPU reference. Skipped without CUDA; run on the device machine:
    python -m pytest -q tests/test_cuda.py
Integer results must be equal bit for bit; dequantized outputs within float rounding."""
import itertools

import pytest
import torch

from abqc import quant
from conftest import int64_group_matmul
from abqc.bits import parse_pair
from abqc.codegen import layout
from abqc.codegen.config import WGMMA_TOKENS, WGMMA_WARPGROUPS, gemv_channel_tiles, gemv_max_tokens, token_tile_choices

cuda = pytest.importorskip("abqc.runtime.cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")]

from abqc.runtime import QuantLinear, ops  # noqa: E402

SHAPES = [(1, 37, 77), (5, 130, 300), (19, 64, 1000), (64, 48, 513)]   # odd K and N tails, M not a tile multiple


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    from abqc.codegen.config import all_configs
    from abqc.codegen.nvrtc import precompile
    precompile(all_configs(cuda.arch_of(torch.device("cuda"))))
    cuda.register()


@pytest.mark.parametrize("p,q", list(itertools.product(range(1, 9), range(1, 9))))
def test_bitplane_mm_exact_all_pairs(p, q):
    gen = torch.Generator().manual_seed(100 * p + q)
    for (m, n, k), gw in itertools.product(SHAPES, (None, 2, 9)):
        group_words = gw or -(-k // 32)
        pad = group_words * 32
        ua = torch.randint(0, 2 ** q, (m, k), generator=gen)
        uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
        a, w = quant.pack_bitplanes(ua, q, pad_to=pad), quant.pack_bitplanes(uw, p, pad_to=pad)
        expect = int64_group_matmul(ua, uw, pad)
        wt = layout.tile_weights(w.cuda(), group_words)
        tiles = [("bmma", wk, tm) for wk, tm in itertools.product((2, 4, 8), token_tile_choices(p, q))]
        if gw is None:     # the GEMV family: per-channel, every build that serves m tokens
            tiles += [("gemv", wk, mt, u) for wk in (2, 4, 8) for mt in gemv_max_tokens(p, q) if m <= mt
                      for u in gemv_channel_tiles(p, q, mt)]
        for tile in tiles:
            got = cuda.bmma(wt, a.cuda(), n, k, group_words, 0, tile=tile).cpu()
            assert torch.equal(got.to(torch.int64), expect), (m, n, k, gw, tile)
    # the registered op dispatches to the GPU kernel
    got = torch.ops.abqc.bitplane_mm(a.cuda(), w.cuda(), group_words).cpu()
    assert torch.equal(got.to(torch.int64), expect)


@pytest.mark.parametrize("q", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_pack_matches_cpu(q, dtype, symmetric):
    if symmetric and q == 1:
        pytest.skip("no symmetric 1-bit grid")
    torch.manual_seed(q)
    x = (torch.randn(7, 333) * torch.linspace(0.1, 4, 7)[:, None]).to(dtype)
    x[3] = x[3].abs()    # an all-positive token
    for gw in (11, 4, 1):
        groups = -(-333 // (gw * 32))
        planes, sums, scale, zero = cuda.quant_pack(x.cuda(), q, gw, groups, 333, symmetric)
        gs = 333 if gw == 11 else gw * 32      # gw 11: one group (per-channel); else groups of gw words
        ref_planes, ref_sums, ref_s, ref_z = ops.pack_activation(x.float(), q, gs, 333, symmetric)
        assert torch.equal(scale.cpu(), ref_s.view(-1)) and torch.equal(zero.cpu(), ref_z.view(-1).int())
        got_sums = sums.cpu().long()
        if groups == 1:          # per-channel: one partial sum per packer chunk
            got_sums = got_sums.sum(1, keepdim=True)
        assert torch.equal(planes.cpu(), ref_planes) and torch.equal(got_sums, ref_sums)


@pytest.mark.parametrize("q", (1, 3, 8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packers_prefill_rows_match_cpu(q, dtype):
    """Prefill rows (one packer block a whole row, rows of 1000 to 20000 values): the bit planes, the INT8
    family's centred codes and both code sums equal the CPU reference's."""
    torch.manual_seed(q)
    for m, k in ((600, 1000), (520, 4096), (512, 20000)):
        x = (torch.randn(m, k) * torch.linspace(0.1, 4, m)[:, None]).to(dtype)
        x[5] = x[5].abs()
        kw = -(-k // 32)
        assert cuda.pack_chunks(kw, 1, m)[1] == 1          # whole rows, one block each
        planes, sums, scale, zero = cuda.quant_pack(x.cuda(), q, kw, 1, k, False)
        ref_planes, ref_sums, ref_s, ref_z = ops.pack_activation(x.float(), q, k, k, False)
        assert torch.equal(planes.cpu(), ref_planes) and torch.equal(sums.cpu().long().sum(1, keepdim=True), ref_sums)
        assert torch.equal(scale.cpu(), ref_s.view(-1)) and torch.equal(zero.cpu(), ref_z.view(-1).int())
        codes, sums8, _, _ = cuda.quant_int8(x.cuda(), q, kw, k, False)
        up, _, _, _ = ops.quantize_activation_padded(x.float(), q, k, k, False)
        want = torch.zeros(m, kw * 32, dtype=torch.int64)
        want[:, :k] = up[:, :k].long() - 2 ** (q - 1)
        assert torch.equal(codes.cpu().long(), want) and torch.equal(sums8.cpu().long().sum(1), want.sum(1))


@pytest.mark.parametrize("p,q", list(itertools.product(range(1, 9), range(1, 9))))
def test_gemv_quantizing_in_kernel_exact_all_pairs(p, q):
    """The "gemvq" family (one launch, activations quantized in-kernel): its integer accumulators equal the
    CPU reference's codes multiplied out, and its output equals the packer + "gemv" launch pair's exactly."""
    gen = torch.Generator().manual_seed(1000 + 10 * p + q)
    for (m, n, k), dtype, sym in itertools.product([(1, 37, 77), (2, 130, 300), (8, 48, 513), (4, 200, 4096)],
                                                   (torch.float32, torch.float16, torch.bfloat16), (False, True)):
        if m > max(gemv_max_tokens(p, q)) or (sym and q == 1):
            continue
        x = (torch.randn(m, k, generator=gen) * torch.linspace(0.05, 3, m)[:, None]).to(dtype)
        x[0, :: 7] = 0.0
        if m > 1:
            x[1] = x[1].abs()                         # an all-positive token: zero point at the grid's end
        kw = -(-k // 32)
        uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
        wt = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=kw * 32).cuda(), kw)
        ua, _, _, _ = ops.quantize_activation_padded(x.float(), q, k, k, sym)
        expect = ua[:, :k].long() @ uw.T
        w_scale = torch.rand(n, 1, generator=gen).cuda() + 0.5
        w_zero = torch.randint(0, 2 ** p, (n, 1), generator=gen, dtype=torch.int32).cuda()
        w_sum = uw.sum(1, keepdim=True).int().cuda()
        packed = cuda.quant_pack(x.cuda(), q, kw, 1, k, sym)
        epi = cuda.epilogue_args(w_scale, w_zero, w_sum, packed)
        for wk, mt in itertools.product((2, 8), [t for t in gemv_max_tokens(p, q) if m <= t]):
            for u in gemv_channel_tiles(p, q, mt):
                tile = ("gemvq", wk, mt, u)
                got = cuda.gemv_quant(x.cuda(), wt, w_scale, w_zero, w_sum, None, n, q, kw, k, sym, tile,
                                      integer=True).cpu()
                assert torch.equal(got[..., 0].long(), expect), (m, n, k, dtype, sym, tile)
                y = cuda.gemv_quant(x.cuda(), wt, w_scale, w_zero, w_sum, None, n, q, kw, k, sym, tile)
                ref = cuda.bmma(wt, packed[0], n, k, kw, 1, epi, ("gemv", wk, mt, u), x.dtype)
                assert torch.equal(y, ref), (m, n, k, dtype, sym, tile)


HOPPER = pytest.mark.skipif(not cuda.available() or cuda.arch_of(torch.device("cuda")) != "sm_90a",
                            reason="the bulk-copy GEMV builds (gemvt, gemvqt) and the wgmma family need sm_90a (Hopper)")


def _check_bulk(gen, p, q, m, n, k, dtype, wks=(2, 8)):
    """gemvt against the codes multiplied out and against gemv's output; gemvqt likewise against gemvq.
    Returns how many tiles ran (tiles whose weights overflow shared memory must refuse with a clear error)."""
    x = (torch.randn(m, k, generator=gen) * torch.linspace(0.05, 3, m)[:, None]).to(dtype)
    x[0, :: 7] = 0.0
    kw = -(-k // 32)
    uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
    wt = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=kw * 32).cuda(), kw)
    ua = ops.quantize_activation_padded(x.float(), q, k, k, False)[0]
    expect = ua[:, :k].long() @ uw.T
    w_scale = torch.rand(n, 1, generator=gen).cuda() + 0.5
    w_zero = torch.randint(0, 2 ** p, (n, 1), generator=gen, dtype=torch.int32).cuda()
    w_sum = uw.sum(1, keepdim=True).int().cuda()
    packed = cuda.quant_pack(x.cuda(), q, kw, 1, k, False)
    epi = cuda.epilogue_args(w_scale, w_zero, w_sum, packed)
    ran = 0
    for wk, mt in itertools.product(wks, [t for t in gemv_max_tokens(p, q) if m <= t]):
        for u in gemv_channel_tiles(p, q, mt):
            weight_bytes = u * wt.shape[1] * p * 512
            if weight_bytes > cuda.MAX_SMEM:
                with pytest.raises(ValueError, match="shared memory"):
                    cuda.bmma(wt, packed[0], n, k, kw, 0, None, ("gemvt", wk, mt, u))
                continue
            if weight_bytes > cuda.MAX_SMEM - 64 * 1024:   # near the limit: the staged rows decide; not tested here
                continue
            for fam in ("gemvt", "gemv"):
                acc = cuda.bmma(wt, packed[0], n, k, kw, 0, None, (fam, wk, mt, u)).cpu()
                assert torch.equal(acc[..., 0].long(), expect), (fam, m, n, k, p, q, wk, mt, u)
            y = cuda.bmma(wt, packed[0], n, k, kw, 1, epi, ("gemvt", wk, mt, u), x.dtype)
            assert torch.equal(y, cuda.bmma(wt, packed[0], n, k, kw, 1, epi, ("gemv", wk, mt, u), x.dtype))
            args = (w_scale, w_zero, w_sum, None, n, q, kw, k, False)
            got = cuda.gemv_quant(x.cuda(), wt, *args, ("gemvqt", wk, mt, u), integer=True).cpu()
            assert torch.equal(got[..., 0].long(), expect), ("gemvqt", m, n, k, p, q, wk, mt, u)
            assert torch.equal(cuda.gemv_quant(x.cuda(), wt, *args, ("gemvqt", wk, mt, u)),
                               cuda.gemv_quant(x.cuda(), wt, *args, ("gemvq", wk, mt, u)))
            ran += 1
    return ran


@HOPPER
@pytest.mark.parametrize("p,q", list(itertools.product(range(1, 9), range(1, 9))))
def test_bulk_gemv_exact_all_pairs(p, q):
    """The bulk-copy GEMV builds (weights streamed into shared memory by cp.async.bulk, one mbarrier per
    chunk of K steps): integer accumulators equal the CPU reference's codes multiplied out, and outputs
    equal the register-load builds' bit for bit, for the packer-fed (gemvt) and quantizing (gemvqt) launch,
    at odd K and N tails and partial channel tiles."""
    gen = torch.Generator().manual_seed(3000 + 10 * p + q)
    ran = 0
    for (m, n, k), dtype in itertools.product([(1, 37, 77), (2, 130, 300), (8, 48, 513), (4, 200, 4096)],
                                              (torch.float16, torch.bfloat16)):
        if m <= max(gemv_max_tokens(p, q)):
            ran += _check_bulk(gen, p, q, m, n, k, dtype)
    assert ran > 0


@HOPPER
def test_bulk_gemv_long_k_many_chunks_and_smem_limit():
    """K long enough for more rounds of steps than mbarriers (several rounds per chunk), LLaMA's 11008,
    and tiles whose weights cannot fit in shared memory refuse with an error naming it."""
    gen = torch.Generator().manual_seed(77)
    for p, q, m, n, k in [(2, 8, 1, 40, 11008), (2, 8, 1, 20, 20000), (1, 4, 2, 33, 20000), (3, 8, 4, 50, 11008),
                          (8, 8, 1, 17, 11008)]:
        assert _check_bulk(gen, p, q, m, n, k, torch.float16) > 0 or p == 8
    with pytest.raises(ValueError, match="shared memory"):   # 43 steps x 8 planes x 512 B = 176 KB of weights
        x = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
        wt = torch.zeros(2, 43, 8, 32, 4, dtype=torch.int32, device="cuda")
        cuda.bmma(wt, cuda.quant_pack(x, 8, 344, 1, 11008, False)[0], 20, 11008, 344, 0, None, ("gemvt", 8, 1, 1))


@HOPPER
def test_bulk_gemv_in_cuda_graphs_follows_module_tile():
    """A QuantLinear told to launch gemvt / gemvqt does so eagerly and replayed from a CUDA graph with new
    inputs (programmatic dependent launch on), giving the register-load twin's output bit for bit."""
    torch.manual_seed(12)
    pair = parse_pair("w2a8")
    lin = torch.nn.Linear(4096, 1024, bias=True)
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, pair.w_bits)).cuda()
    gw, groups = ql.group_words_and_count()

    def run(x, tile):
        return cuda.bmma_linear(x, ql.tiled_weights(), ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features,
                                pair.a_bits, gw, groups, ql.in_features, False, tile=tile)

    for tile, twin in [(("gemvt", 8, 1, 1), ("gemv", 8, 1, 1)), (("gemvqt", 4, 1, 2), ("gemvq", 4, 1, 2))]:
        ql.tile = tile
        static = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        assert torch.equal(ql(static), run(static, twin))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = ql(static)
        for _ in range(3):
            static.copy_(torch.randn(1, 4096, device="cuda", dtype=torch.float16))
            g.replay()
            assert torch.equal(out, run(static, twin)), tile
    assert cuda.pdl_status().startswith("on"), cuda.pdl_status()


WGMMA_SHAPES = [(1, 37, 77), (19, 130, 300), (70, 200, 1000), (33, 129, 2080), (130, 48, 4096), (64, 300, 11008)]


@HOPPER
@pytest.mark.parametrize("p,q", list(itertools.product(range(1, 9), range(1, 9))))
def test_wgmma_exact_all_pairs(p, q):
    """The Hopper warpgroup-MMA GEMM (m64nNk256 b1 AND-popc, both token tiles): integer accumulators equal the
    CPU reference for M, N and K tails (K words not a multiple of 4: the 4-byte staging path; K steps not a
    multiple of a stage; channel tiles past N, token rows past M), and its dequantized output equals the
    bmma family's bit for bit (the same integers through the same epilogue)."""
    gen = torch.Generator().manual_seed(5000 + 10 * p + q)
    for m, n, k in WGMMA_SHAPES:
        kw = -(-k // 32)
        ua = torch.randint(0, 2 ** q, (m, k), generator=gen)
        uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
        a = quant.pack_bitplanes(ua, q, pad_to=kw * 32).cuda()
        wt = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=kw * 32).cuda(), kw)
        expect = ua.long() @ uw.long().T
        x = torch.randn(m, k, generator=gen).to(torch.float16).cuda()
        packed = cuda.quant_pack(x, q, kw, 1, k, False)
        epi = cuda.epilogue_args(torch.rand(n, 1, generator=gen).cuda() + 0.5,
                                 torch.randint(0, 2 ** p, (n, 1), generator=gen, dtype=torch.int32).cuda(),
                                 uw.sum(1, keepdim=True).int().cuda(), packed)
        ref = cuda.bmma(wt, packed[0], n, k, kw, 2, epi, ("bmma", 4, 1), torch.float16)
        for tn in WGMMA_TOKENS:
            tile = ("wgmma", WGMMA_WARPGROUPS, tn // 8)
            got = cuda.bmma(wt, a, n, k, kw, 0, tile=tile).cpu()
            assert torch.equal(got[..., 0].long(), expect), (m, n, k, tile)
            y = cuda.bmma(wt, packed[0], n, k, kw, 2, epi, tile, torch.float16)
            assert torch.equal(y, ref), (m, n, k, tile)


@HOPPER
def test_wgmma_linear_and_refusals():
    """bmma_linear through the wgmma family gives the bmma family's output (bias, bf16 activations); grouped
    weights and a wrong warpgroup count are refused with errors naming the fix."""
    torch.manual_seed(21)
    pair = parse_pair("w2a8")
    lin = torch.nn.Linear(1000, 300, bias=True)
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, pair.w_bits)).cuda()
    gw, groups = ql.group_words_and_count()
    x = torch.randn(150, 1000, device="cuda", dtype=torch.bfloat16)

    def run(tile):
        return cuda.bmma_linear(x, ql.tiled_weights(), ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features,
                                pair.a_bits, gw, groups, ql.in_features, False, tile=tile)

    assert torch.equal(run(("wgmma", WGMMA_WARPGROUPS, 8)), run(("bmma", 4, 2)))
    a = cuda.quant_pack(x, 8, 2, 16, 1000, False)[0]
    wt = layout.tile_weights(torch.zeros(2, 300, 32, dtype=torch.int32, device="cuda"), 2)
    with pytest.raises(ValueError, match="per-channel"):
        cuda.bmma(wt, a, 300, 1000, 2, 0, tile=("wgmma", WGMMA_WARPGROUPS, 8))
    with pytest.raises(ValueError, match="warpgroups"):
        cuda.bmma(ql.tiled_weights(), cuda.quant_pack(x, 8, gw, 1, 1000, False)[0], 300, 1000, gw, 0,
                  tile=("wgmma", 1, 8))


@pytest.mark.parametrize("bits", ["w2a8", "w4a4", "w2*a8", "w3a8g64", "w8a8", "w6a6", "w1a2g128", "w4a8g32",
                                  "w4a8g32f", "w3a8f", "w8a4g64f"])
@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_fused_linear_matches_reference(bits, m):
    """Every family's output (bmma, gemv; per channel also INT8 and gemvq) equals the CPU reference to float32
    rounding, fractional weight zero points ("f") included."""
    torch.manual_seed(m)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(300, 70, bias=True)
    qw = quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))
    ql = QuantLinear.from_linear(lin, pair, qw)
    x = torch.randn(m, 300)
    ref = ql(x)                                     # CPU reference (float64 epilogue)
    qg = QuantLinear.from_linear(lin, pair, qw).cuda()
    y32 = qg(x.cuda()).cpu()
    torch.testing.assert_close(y32, ref, rtol=2e-5, atol=2e-5)
    if qg.group_words_and_count()[1] == 1:          # per-channel: the INT8 family too, and gemvq at few tokens
        tiles = [("int8", 0, 0)]
        mt = max(gemv_max_tokens(qg.planes, pair.a_bits))
        tiles += [("gemvq", 4, mt, 1)] if m <= mt else []
        for tile in tiles:
            qg.tile = tile
            torch.testing.assert_close(qg(x.cuda()).cpu(), ref, rtol=2e-5, atol=2e-5)
        qg.tile = None
    xh = x.half()
    y16 = qg(xh.cuda()).float().cpu()
    ref16 = ql(xh.float())                          # same fp16 inputs -> same codes; output rounded to fp16
    torch.testing.assert_close(y16, ref16, rtol=2e-3, atol=2e-3)


def test_compiled_model_on_gpu_matches_cpu():
    import abqc
    from conftest import tiny_model
    model = tiny_model("llama", layers=2)
    q = abqc.compile(model, bits="w4a8", method="rtn", progress=False)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = q(ids).logits
        q.cuda()
        got = q(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_prepared_launches_follow_the_module():
    """QuantLinear's per-(tokens, dtype) launchers give bmma_linear's output, and are rebuilt when the
    module moves (new tiles and buffers), changes tile or loads other weights."""
    torch.manual_seed(5)
    pair = parse_pair("w2a8")
    lin = torch.nn.Linear(256, 96, bias=True)
    qw = quant.quantize_weight(lin.weight, pair.w_bits)
    ql = QuantLinear.from_linear(lin, pair, qw).cuda()
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    gw, groups = ql.group_words_and_count()

    def direct(m, tile=None):
        return cuda.bmma_linear(x, m.tiled_weights(), m.w_scale, m.w_zero, m.w_sum, m.bias, m.out_features,
                                pair.a_bits, gw, groups, m.in_features, False, tile=tile)

    ql.tile = ("gemvq", 4, 1, 2)                                          # the prepared single launch
    y1 = ql(x)
    assert torch.equal(y1, direct(ql, ql.tile))
    ql.tile = None
    y1 = ql(x)
    assert torch.equal(y1, direct(ql)) and torch.equal(ql(x), y1)        # the second call reuses the launcher
    assert len(ql.__dict__["_launchers"]) == 2
    ql.tile = ("gemv", 2, 1, 1)
    assert torch.equal(ql(x), direct(ql, ("gemv", 2, 1, 1)))
    ql.tile = None
    ql.cpu().cuda()                                                       # new tiles and buffers
    assert "_launchers" not in ql.__dict__ or not ql.__dict__["_launchers"]
    assert torch.equal(ql(x), y1)
    other = QuantLinear.from_linear(torch.nn.Linear(256, 96, bias=True), pair,
                                    quant.quantize_weight(torch.randn(96, 256), pair.w_bits))
    ql.load_state_dict(other.state_dict())
    assert torch.equal(ql(x), direct(ql)) and not torch.equal(ql(x), y1)


@pytest.mark.parametrize("bits", ["w2a8", "w4a4g64", "w3a8"])
def test_packed_launcher_matches_bmma_linear(bits):
    """The prepared packer + bit-plane launch pair (every packer-fed family, per-channel and grouped, fp16 and
    bf16, decode and prefill token counts) gives bmma_linear's output bit for bit, call after call with new
    inputs, also replayed from a CUDA graph."""
    torch.manual_seed(9)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(1000, 200, bias=True)
    ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))).cuda()
    gw, groups = ql.group_words_and_count()
    args = (ql.tiled_weights(), ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features, pair.a_bits, gw, groups,
            ql.in_features, False)
    hopper = cuda.arch_of(torch.device("cuda")) == "sm_90a"
    for m, dtype in [(1, torch.float16), (8, torch.bfloat16), (70, torch.float16)]:
        tiles = [("bmma", 4, 1)]
        mt = next((t for t in gemv_max_tokens(pair.w_planes, pair.a_bits) if m <= t), None)
        if groups == 1 and mt:
            tiles.append(("gemv", 8, mt, 1))
        if groups == 1 and m >= 16 and hopper:
            tiles.append(("wgmma", WGMMA_WARPGROUPS, 8))
        for tile in tiles:
            x = torch.randn(m, 1000, device="cuda", dtype=dtype)
            run = cuda.linear_launcher(x, *args, tile=tile)
            assert isinstance(run, cuda.PackedLauncher)
            for _ in range(2):
                x = torch.randn(m, 1000, device="cuda", dtype=dtype)
                assert torch.equal(run(x), cuda.bmma_linear(x, *args, tile=tile)), (bits, m, tile)
            static = x.clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = run(static)
            static.copy_(torch.randn(m, 1000, device="cuda", dtype=dtype))
            g.replay()
            assert torch.equal(out, cuda.bmma_linear(static, *args, tile=tile)), (bits, m, tile, "graph")


def test_programmatic_dependent_launch_matches_plain():
    """On sm_90 the GEMV launches as the packer's programmatic dependent (it starts early and waits before
    reading the packed activations): the same outputs as strictly ordered launches, eagerly and replayed from
    a CUDA graph with fresh inputs, and no launch fell back."""
    torch.manual_seed(11)
    pair = parse_pair("w2a8")
    lin = torch.nn.Linear(4096, 1024, bias=True)
    qw = quant.quantize_weight(lin.weight, pair.w_bits)
    ql = QuantLinear.from_linear(lin, pair, qw).cuda()
    gw, groups = ql.group_words_and_count()

    def run(x, tile):
        return cuda.bmma_linear(x, ql.tiled_weights(), ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features,
                                pair.a_bits, gw, groups, ql.in_features, False, tile=tile)

    tiles = [("gemv", wk, mt, u) for wk in (2, 8) for mt in gemv_max_tokens(2, 8) for u in gemv_channel_tiles(2, 8, mt)]
    for tile in tiles:
        x = torch.randn(tile[2], 4096, device="cuda", dtype=torch.float16)
        cuda.set_pdl(True)
        got = run(x, tile)
        cuda.set_pdl(False)
        want = run(x, tile)
        cuda.set_pdl(True)
        assert torch.equal(got, want), tile
    if cuda.arch_of(torch.device("cuda")) == "sm_90a":
        assert cuda.pdl_status().startswith("on"), cuda.pdl_status()
    static = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    ql(static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ql(static)
    for _ in range(3):
        static.copy_(torch.randn(1, 4096, device="cuda", dtype=torch.float16))
        g.replay()
        cuda.set_pdl(False)
        want = run(static, None)
        cuda.set_pdl(True)
        assert torch.equal(out, want)

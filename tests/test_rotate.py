"""Rotation pass and online Hadamard: the Hadamard matrices are orthogonal, the fast transform equals the
explicit matrix, rotating leaves the FP model's logits unchanged, the rotated model quantizes (real
integer path == fake-quant float model), the kernel compiles for sm_80 / sm_90a without spills, and on
a GPU it equals the CPU reference (skipped without CUDA)."""
import math
import re

import pytest
import torch

import abqc
from abqc.capture import capture
from abqc.errors import AbqcError, UnsupportedModelError
from abqc.runtime import FakeQuantLinear, QuantLinear
from abqc.runtime import hadamard as H
from abqc.passes.rotate import kurtosis
from conftest import tiny_model

# (kind, hidden, intermediate, tied): powers of two, 12- and 20-based Paley orders, a random fallback (92)
MODELS = [("llama", 64, 160, False), ("qwen2", 48, 96, True), ("mistral", 96, 92, False)]


def _model(kind, hidden, inter, tied):
    m = tiny_model(kind, hidden=hidden, inter=inter)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():       # random init leaves norm weights at 1: make the fold do something
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


@pytest.mark.parametrize("n,want", [(576, (16, 36, "paley2(q=17)")), (1536, (128, 12, "paley1(q=11)")),
                                    (2048, (2048, 1, "sylvester")), (4096, (4096, 1, "sylvester")),
                                    (11008, (32, 344, "paley1(q=343)")), (3584, (128, 28, "paley1(q=27)")),
                                    (92, (4, 23, "random_orthogonal"))])
def test_factorisation_of_model_sizes(n, want):
    assert H.factorize(n) == want


@pytest.mark.parametrize("n", [2, 12, 20, 28, 36, 52, 344, 92, 46])
def test_blocks_are_hadamard_or_orthogonal(n):
    pow2, m, kind = H.factorize(n)
    b = H.block_matrix(n, seed=3)
    torch.testing.assert_close(b @ b.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-10)
    if kind != "random_orthogonal":
        assert set(b.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n", [1, 8, 48, 96, 160, 92, 576])
def test_fast_transform_equals_explicit_orthonormal_matrix(n):
    mat = H.explicit_matrix(n)
    torch.testing.assert_close(mat @ mat.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    block = H.block_matrix(n)
    torch.testing.assert_close(H.hadamard(x, block), x @ mat.T, rtol=0, atol=1e-12)
    y32 = H.hadamard(x.float(), block)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), x @ mat.T, rtol=0, atol=1e-5)


def test_transform_gradient_and_shape_errors():
    block = H.block_matrix(24)
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: H.hadamard(t, block), (x,))
    with pytest.raises(AbqcError, match="last dim 20 is not 2\\^k times the block order 12"):
        H.hadamard(torch.randn(2, 20), H.block_matrix(24))


def test_kurtosis_helper():
    g = torch.Generator().manual_seed(0)
    assert abs(kurtosis(torch.randn(200_000, generator=g)) - 3.0) < 0.1
    spiky = torch.zeros(1000)
    spiky[0] = 100.0
    assert kurtosis(spiky) > 500


CALIB = torch.randint(0, 256, (6, 100), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def rotated():
    """{kind: (FP model, its rotated compile)}; llama's is calibrated on CALIB."""
    out = {}
    for kind, hidden, inter, tied in MODELS:
        model = _model(kind, hidden, inter, tied)
        calib = CALIB if kind == "llama" else None
        out[kind] = model, abqc.compile(model, passes=["rotate"], calib=calib, progress=False)
    return out


@pytest.mark.parametrize("kind,hidden,inter,tied", MODELS)
def test_rotate_keeps_fp_logits(rotated, kind, hidden, inter, tied):
    model, rot = rotated[kind]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        l0, l1 = model(ids).logits, rot(ids).logits
    assert ((l1 - l0).abs().max() / l0.abs().max()).item() < 1e-5
    m = rot.model
    layer = m.model.layers[0]
    # it did rotate: weights changed, norms folded to 1, down carries the online Hadamard, head untied
    assert not torch.allclose(layer.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(hidden)) and torch.equal(m.model.norm.weight,
                                                                                        torch.ones(hidden))
    assert isinstance(layer.mlp.down_proj, H.HadamardLinear) and layer.mlp.down_proj.pre.n == inter
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    if tied:
        assert not torch.allclose(m.lm_head.weight, m.model.embed_tokens.weight)
    rep = rot.report["passes"][0]
    assert rep["summary"]["untied_embeddings"] is tied
    assert len(rep["details"]) == 3 * len(m.model.layers)


def test_rotated_model_recaptures_roles_without_up_down_relation(rotated):
    cm = capture(rotated["llama"][1].model)
    for b in cm.blocks:
        assert set(b.linears) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert b.norm_groups == {"input_layernorm": ["q", "k", "v"], "post_attention_layernorm": ["gate", "up"]}
        assert b.gated_mlp is None      # scaling up's outputs no longer commutes with down's input
        assert any(n.op == "call_function" and "hadamard" in str(n.target) for n in b.graph.graph.nodes)


def test_kurtosis_report_uses_calibration_and_flattens_down_inputs(rotated):
    rep = rotated["llama"][1].report["passes"][0]
    s = rep["summary"]
    assert s["kurtosis_probe"] == "calibration batch [4, 100]"
    assert s["online_hadamard_down"] == "160 = 8 x 20: paley1(q=19)"
    assert s["mean_kurtosis_down_after"] < s["mean_kurtosis_down_before"]
    assert {d["input_of"] for d in rep["details"]} == {"q/k/v", "gate/up", "down"}
    assert rotated["qwen2"][1].report["passes"][0]["summary"]["kurtosis_probe"] == "random-token batch [2, 64]"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rotated_quantized_real_equals_fake(rotated, kind):
    model, rot = rotated[kind]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    # rotate -> rtn -> lower, starting from the rotated FP model (same as passes=["rotate", "rtn", "lower"])
    real = abqc.compile(rot.model, bits="w4a8", passes=["rtn", "lower"], progress=False)
    fake = abqc.compile(rot.model, bits="w4a8", passes=["rtn", "lower_fake"], progress=False)
    down_r, down_f = real.model.model.layers[0].mlp.down_proj, fake.model.model.layers[0].mlp.down_proj
    assert isinstance(down_r, QuantLinear) and isinstance(down_r.pre, H.OnlineHadamard)
    assert isinstance(down_f, FakeQuantLinear) and isinstance(down_f.pre, H.OnlineHadamard)
    with torch.no_grad():
        lr, lf, l0 = real(ids).logits, fake(ids).logits, model(ids).logits
    torch.testing.assert_close(lr, lf, rtol=1e-4, atol=1e-4)
    assert (lr - l0).abs().max() > 1e-4
    # spec / from_spec (saved artifacts) keep the online Hadamard
    spec = down_r.spec()
    assert spec["pre"] == {"n": down_r.in_features, "m": down_r.pre.block.shape[0], "kind": down_r.pre.kind}
    empty = QuantLinear.from_spec(spec)
    empty.load_state_dict(down_r.state_dict())
    x = torch.randn(3, down_r.in_features)
    torch.testing.assert_close(empty(x), down_r(x), rtol=0, atol=0)
    fempty = FakeQuantLinear.from_spec(down_f.spec())
    fempty.load_state_dict(down_f.state_dict())
    torch.testing.assert_close(fempty(x), down_f(x), rtol=0, atol=0)


def test_one_pass_pipeline_and_rotating_twice_is_refused(rotated):
    model = _model("qwen2", 48, 96, True)
    q = abqc.compile(model, bits="w4a8", passes=["rotate", "rtn", "lower"], progress=False)
    assert [p["name"] for p in q.report["passes"]] == ["rotate", "rtn", "lower[real]"]
    with pytest.raises(UnsupportedModelError, match="already rotated"):
        abqc.compile(rotated["llama"][1].model, passes=["rotate"], progress=False)
    with pytest.raises(AbqcError, match="online Hadamard spec"):
        H.OnlineHadamard.from_spec({"n": 96})


def test_unfoldable_norm_is_named():
    from abqc.bits import parse_bits
    from abqc.passes import PassContext
    from abqc.passes.rotate import rotate
    cm = capture(tiny_model("llama", layers=1))
    cm.blocks[0].norm_groups["input_layernorm"] = ["k", "v"]      # as if q read the residual directly
    with pytest.raises(UnsupportedModelError, match=r"layer 0: the inputs of \['q'\] do not come from a norm"):
        rotate(cm, PassContext(parse_bits("w4a8")))


# --- CUDA kernel: compiled without a GPU (CI), checked against the reference on one -----------------

def _have_nvrtc():
    try:
        from abqc.codegen import nvrtc
        nvrtc.compiler_version()
        return True
    except Exception:  # AbqcError or ImportError when cuda-bindings / NVRTC are missing
        return False


@pytest.mark.skipif(not _have_nvrtc(), reason="NVRTC not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("pack_bits", [0, 1, 4, 8])
def test_hadamard_kernel_compiles_without_spills(arch, pack_bits, tmp_path):
    from abqc.codegen import nvrtc
    s = nvrtc.sass(nvrtc.compile_cubin(H.HadamardKernel(arch, pack_bits), use_cache=False), tmp_path)
    assert not re.search(r"\b(LDL|STL)\b", s), "online Hadamard kernel spills to local memory"
    assert "BAR.SYNC" in s and re.search(r"\bLDS\b", s) and re.search(r"\bSTS\b", s)   # staged in shared memory
    assert "LDS.128" in s                                   # the dense factor's 16-byte shared loads
    if pack_bits:   # the fused quantizer: a row counter in global memory, ballots into bit-planes
        assert "ATOMG.E.ADD" in s and "MEMBAR" in s and "VOTE.ANY" in s
    with pytest.raises(ValueError, match="pack_bits"):
        H.HadamardKernel(arch, 9)


def _cuda_ok():
    try:
        from abqc.runtime import cuda
        return cuda.available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")
@pytest.mark.parametrize("n", [64, 92, 576, 1536, 4096, 11008])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hadamard_cuda_matches_reference(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, 3, n, generator=g).to(dtype)
    block = H.block_matrix(n)
    want = H.hadamard_reference(x.float(), block)
    got = H.hadamard(x.cuda(), block.cuda())         # dispatches to the NVRTC kernel
    assert got.dtype == dtype and got.shape == x.shape
    direct = H.hadamard_cuda(x.cuda(), block.cuda())
    assert torch.equal(got, direct)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * math.sqrt(1 + want.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")
def test_rotated_quantized_model_on_cuda_matches_cpu():
    model = _model("llama", 64, 160, False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    q = abqc.compile(model, bits="w4a8", passes=["rotate", "rtn", "lower"], progress=False)
    with torch.no_grad():
        cpu = q(ids).logits
        gpu = q.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")
@pytest.mark.parametrize("n,group", [(11008, None), (11008, 128), (1536, None), (1536, 64), (92, None),
                                     (4096, 32), (64, None)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_hadamard_pack_equals_hadamard_then_quant_pack(n, group, rows):
    """The fused launch (transform, then the last block of each row quantizes and packs it) gives
    quant_pack(hadamard_cuda(x)) bit for bit: planes, code sums, scales, zero points, and the rotated rows;
    again on a second call (the row counters reset themselves)."""
    from abqc.runtime import cuda, ops
    gen = torch.Generator().manual_seed(n + rows)
    block = H.block_matrix(n).cuda()
    gw, kp = ops.group_layout(n, group or n)
    groups = kp // (gw * 32)
    for dtype, q, sym in [(torch.float16, 8, False), (torch.bfloat16, 4, True), (torch.float32, 3, False),
                          (torch.float16, 1, False), (torch.float16, 6, True)]:
        x = (torch.randn(rows, n, generator=gen) * torch.linspace(0.1, 3, rows)[:, None]).to(dtype).cuda()
        y = H.hadamard_cuda(x, block)
        want = cuda.quant_pack(y, q, gw, groups, n, sym)
        for _ in range(2):
            planes, sums, scale, zero, rot = H.hadamard_pack(x, block, q, gw, groups, sym, rotated=True)
            assert torch.equal(rot, y), (dtype, q)
            assert torch.equal(planes, want[0]) and torch.equal(scale, want[2]) and torch.equal(zero, want[3])
            want_sums = want[1].sum(1, keepdim=True) if groups == 1 else want[1]
            assert torch.equal(sums, want_sums), (dtype, q, sym)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU (sm_80+) and cuda-bindings")
@pytest.mark.parametrize("fused_plan", [True, False])
def test_fused_hadamard_linear_in_a_cuda_graph(fused_plan, monkeypatch):
    """A QuantLinear with an online Hadamard on CUDA runs it the planner's way for the bit-plane families:
    fused into the activation quantizer (one launch) or as a launch of its own; either equals transforming
    first exactly, eagerly and replayed from a CUDA graph with new inputs; the gemvq and INT8 families
    transform in a launch of their own and agree too."""
    from abqc import quant
    from abqc.bits import parse_pair
    from abqc.codegen import planner
    from abqc.runtime import cuda
    monkeypatch.setattr(planner, "HADAMARD_FUSED_DEFAULT", fused_plan)   # the untuned choice, no plans.json
    calls = {"fused": 0}
    real_pack = H.hadamard_pack

    def counting_pack(*args, **kwargs):
        calls["fused"] += 1
        return real_pack(*args, **kwargs)
    monkeypatch.setattr(H, "hadamard_pack", counting_pack)
    torch.manual_seed(3)
    pair = parse_pair("w2a8")
    n = 1536
    pre = H.OnlineHadamard.of_size(n)
    lin = torch.nn.Linear(n, 200, bias=True)
    qw = quant.quantize_weight(lin.weight, pair.w_bits)
    ql = QuantLinear.from_linear(lin, pair, qw, pre=pre).cuda()
    for m, tile in [(1, None), (3, None), (40, None), (1, ("bmma", 4, 1)), (2, ("gemvq", 4, 2, 1)),
                    (40, ("int8", 0, 0))]:
        ql.tile = tile
        x = torch.randn(m, n, device="cuda", dtype=torch.float16)
        before = calls["fused"]
        fused = ql(x)
        gw, groups = ql.group_words_and_count()
        launched = tile or cuda.launch_tile(m, ql.pair.w_planes, 8, 200, gw * groups, gw, cuda.arch_of(x.device))
        takes_fused = fused_plan and launched[0] in ("gemv", "bmma")
        assert calls["fused"] - before == int(takes_fused), (m, tile, fused_plan)
        unfused = ql._cuda_linear(ql.pre(x))
        assert torch.equal(fused, unfused), (m, tile)
    ql.tile = None
    static = torch.randn(1, n, device="cuda", dtype=torch.float16)
    ql(static)                                             # eager first: the launcher and its counters
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ql(static)
    for _ in range(3):
        x = torch.randn(1, n, device="cuda", dtype=torch.float16)
        static.copy_(x)
        g.replay()
        assert torch.equal(out, ql._cuda_linear(ql.pre(x))), "graph replay of the fused path"
    ref = QuantLinear.from_linear(lin, pair, qw, pre=H.OnlineHadamard.of_size(n))(x.float().cpu())
    err = (out.float().cpu() - ref).norm() / ref.norm()    # fp16-rounded rotation vs the CPU's float32 one
    assert err < 1e-2, err

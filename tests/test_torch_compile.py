"""torch.compile over abqc models: no graph break at the quantized linears (CPU: the reference op; CUDA:
abqc::tiled_linear), fused projections computed once per layer, outputs equal to eager."""
import pytest
import torch

import abqc
from abqc.runtime import QuantLinear, ops
from conftest import tiny_model

RTN = ["rtn", "lower"]


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)     # fullgraph: a graph break is an error


@pytest.mark.parametrize("bits", ["w2a8", "w4a4g32"])
def test_tiled_op_traces_and_equals_the_module(bits):
    q = abqc.compile(tiny_model(), bits=bits, passes=RTN, progress=False)
    ql = q.model.model.layers[0].mlp.down_proj
    assert isinstance(ql, QuantLinear)
    x = torch.randn(3, ql.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ql(x)                       # CPU: abqc::wpaq_linear on the canonical planes
        got = _compiled(ql._tiled_op)(x)   # what a compiled CUDA forward runs, here on its CPU reference
    assert torch.equal(got, want)


def test_tiled_op_traces_a_tiles_only_module(monkeypatch):
    # on CUDA a QuantLinear holds only the tiles (w_planes is None): the traced forward must read them as is
    q = abqc.compile(tiny_model(), bits="w4a8", passes=RTN, progress=False)
    ql = q.model.model.layers[1].self_attn.o_proj
    x = torch.randn(4, ql.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ql(x)
        monkeypatch.setattr(QuantLinear, "keeps_tiles_only", staticmethod(lambda device: True))
        ql._retile()
        assert ql._tiles_only()
        got = _compiled(ql._tiled_op)(x)
    assert torch.equal(got, want) and ql._tiles_only()      # traced without re-tiling or restoring planes


def test_tiled_op_shape_from_its_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q = abqc.compile(tiny_model(), bits="w2a8", passes=RTN, progress=False)
    ql = q.model.model.layers[0].self_attn.o_proj
    gw, groups = ql.group_words_and_count()
    wt = ql.tiled_weights()
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = ops.tiled_linear(torch.empty(5, ql.in_features, dtype=torch.float16), wt, ql.w_scale, ql.w_zero,
                             ql.w_sum, None, ql.out_features, 8, gw, groups, ql.in_features, False, "gemv,8,1,4")
    assert y.shape == (5, ql.out_features) and y.dtype == torch.float16


@pytest.mark.parametrize("fuse", [False, True])
def test_whole_model_through_the_tiled_op_under_aot_autograd(fuse, monkeypatch):
    # the compiled CUDA path (abqc::tiled_linear nodes, fused groups traced once) run on the op's CPU body,
    # through AOTAutograd's functionalization and the op's fake kernel
    q = abqc.compile(tiny_model(), bits="w4a8", passes=RTN, progress=False)
    if fuse:
        q.fuse_projections()
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = q.model(ids).logits
        monkeypatch.setattr(QuantLinear, "_runs_kernels", lambda self, x: not self.pair.weight_only)
        calls = []
        real = ops.tiled_linear
        monkeypatch.setattr(ops, "tiled_linear", lambda *a: calls.append(a[6]) or real(*a))
        torch._dynamo.reset()
        got = torch.compile(lambda t: q.model(t).logits, backend="aot_eager", fullgraph=True)(ids)
    assert torch.equal(got, want)
    assert len(calls) == 2 * (4 if fuse else 7)      # traced once per linear (fused: once per group)


@pytest.mark.parametrize("tiled", [False, True])
def test_rotated_model_compiles_as_one_graph(tiled, monkeypatch):
    # down_proj behind an online Hadamard: abqc::hadamard then the linear, no graph break
    q = abqc.compile(tiny_model(), bits="w4a8", passes=["rotate", "rtn", "lower"], progress=False)
    assert any(getattr(m, "pre", None) is not None for m in q.modules() if type(m) is QuantLinear)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = q.model(ids).logits
        if tiled:     # the compiled CUDA path, on the op's CPU body
            monkeypatch.setattr(QuantLinear, "_runs_kernels", lambda self, x: not self.pair.weight_only)
        torch._dynamo.reset()
        got = torch.compile(lambda t: q.model(t).logits, backend="aot_eager", fullgraph=True)(ids)
    assert torch.equal(got, want)


def test_tile_strings_round_trip():
    from abqc.runtime import cuda
    for tile in (("gemv", 8, 1, 4), ("int8k", 0, 0), ("bmma", 2, 1)):
        assert cuda.parse_tile(ops.tile_string(tile)) == tile
    assert ops.tile_string(None) is None and cuda.parse_tile(None) is None
    for bad in ("gemv", "warp,8,1", "gemv,8,x"):
        with pytest.raises(ValueError, match="family,wk,tm"):
            cuda.parse_tile(bad)


@pytest.mark.parametrize("fuse", [False, True])
def test_whole_model_compiles_as_one_graph_and_matches_eager(fuse):
    q = abqc.compile(tiny_model(), bits="w2a8", passes=RTN, progress=False)
    if fuse:
        q.fuse_projections()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    calls = [0]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
             for m in q.modules() if type(m) is QuantLinear]
    with torch.no_grad():
        want = q.model(ids).logits
        eager_calls, calls[0] = calls[0], 0
        got = _compiled(lambda t: q.model(t).logits)(ids)
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)
    assert calls[0] == eager_calls == 2 * (4 if fuse else 7)     # traced once: the fused linear once per group
    if fuse:
        assert all(m._y is None for m in q.modules() if hasattr(m, "take_traced"))   # nothing left behind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_model_compiles_as_one_graph_with_the_same_kernels(fuse):
    from abqc.runtime import cuda
    if not cuda.available():
        pytest.skip("needs cuda-bindings")
    q = abqc.compile(tiny_model(), bits="w2a8", passes=RTN, progress=False).to("cuda")
    if fuse:
        q.fuse_projections()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3)).cuda()
    ql = q.model.model.layers[1].mlp.down_proj
    x = torch.randn(6, ql.in_features, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_compiled(ql)(x), ql(x))      # the op launches what eager launches: the same bits
        want = q.model(ids).logits
        got = _compiled(lambda t: q.model(t).logits)(ids)      # fullgraph: abqc::tiled_linear nodes, no break
        torch._dynamo.reset()
        inductor = torch.compile(lambda t: q.model(t).logits, fullgraph=True)(ids)
    # the model around the linears may take other CUDA paths when traced (attention backend, fused norms):
    # last-bit differences there can move an activation code across a rounding boundary, so the whole model
    # is compared by relative error (a wrong linear would be off by far more)
    for out in (got, inductor):
        assert ((out - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rotated_linear_compiles_to_the_same_bits():
    from abqc.runtime import cuda
    if not cuda.available():
        pytest.skip("needs cuda-bindings")
    q = abqc.compile(tiny_model(), bits="w4a8", passes=["rotate", "rtn", "lower"], progress=False).to("cuda")
    ql = q.model.model.layers[0].mlp.down_proj
    assert ql.pre is not None
    x = torch.randn(3, ql.in_features, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(_compiled(ql)(x), ql(x))     # abqc::hadamard + abqc::tiled_linear == eager launches

"""fuse_projections: q/k/v and gate/up as one QuantLinear each, outputs bit-identical, exactly undone."""
import copy

import pytest
import torch

import abqc
from abqc.errors import AbqcError
from abqc.runtime import QuantLinear
from abqc.runtime.fuse import ProjectionSlice, SharedInputLinear
from conftest import tiny_model

RTN = ["rtn", "lower"]


def _calls(model, kind=QuantLinear):
    """How many times modules of `kind` run in one forward."""
    count = [0]
    hooks = [m.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
             for m in model.modules() if type(m) is kind]
    return count, hooks


@pytest.mark.parametrize("kind", ["llama", "qwen2"])     # qwen2: q/k/v with bias, o without
def test_fused_model_is_bit_identical_and_unfuses_exactly(kind):
    q = abqc.compile(tiny_model(kind), bits="w2a8", passes=RTN, progress=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        ref = q(ids).logits
        ref_tokens = q.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    paths = q.fuse_projections()
    assert paths == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.qkv_fused", "mlp.gate_up_fused")]
    attn = q.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionSlice) and isinstance(attn.qkv_fused, SharedInputLinear)
    assert attn.qkv_fused.linear.out_features == sum(attn.qkv_fused.widths)
    count, hooks = _calls(q)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)                     # bit for bit
        assert count[0] == 2 * (2 + 2)                             # per layer: qkv, o, gate_up, down
        assert attn.qkv_fused._y is None                           # no activations kept after the layer
        assert torch.equal(q.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), ref_tokens)
        assert torch.equal(copy.deepcopy(q)(ids).logits, ref)
    for h in hooks:
        h.remove()
    assert q.fuse_projections() == []                              # fusing twice changes nothing
    assert q.unfuse_projections() == 4
    sd = q.state_dict()
    assert list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in state)
    assert isinstance(q.model.model.layers[1].mlp.up_proj, QuantLinear)


def test_members_that_differ_are_left_separate_and_save_refuses_fused(tmp_path):
    q = abqc.compile(tiny_model("llama"), bits="w4a8", overrides={"0.k": "w8a8"}, passes=RTN, progress=False)
    assert q.fuse_projections() == ["model.layers.0.mlp.gate_up_fused", "model.layers.1.self_attn.qkv_fused",
                                    "model.layers.1.mlp.gate_up_fused"]
    assert isinstance(q.model.model.layers[0].self_attn.k_proj, QuantLinear)
    with pytest.raises(AbqcError, match="unfuse_projections"):
        q.save(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    q.unfuse_projections()
    q.save(tmp_path / "a")
    assert (tmp_path / "a" / "plan.json").exists()


def test_a_new_input_recomputes_and_in_place_edits_are_seen():
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=RTN, progress=False)
    attn = q.model.model.layers[0].self_attn
    k_ref, q_ref = copy.deepcopy(attn.k_proj), copy.deepcopy(attn.q_proj)
    q.fuse_projections()
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(attn.k_proj(x), k_ref(x))        # k alone, before q: computed for this input
        x.mul_(2)                                           # same tensor, new values: not served from cache
        v = attn.v_proj(x)
        assert torch.equal(attn.k_proj(x), k_ref(x))        # now served from v's computation, for the new x
        assert attn.qkv_fused._y is not None                # q has not taken its part yet
        assert torch.equal(attn.q_proj(x), q_ref(x)) and attn.qkv_fused._y is None and v.shape == (3, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_model_on_cuda_is_bit_identical():
    q = abqc.compile(tiny_model("llama"), bits="w2a8", passes=RTN, progress=False).to("cuda")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        ref = q(ids).logits
        q.fuse_projections()
        fused = q.model.model.layers[0].self_attn.qkv_fused.linear
        assert fused._buffers["w_planes"] is None and fused._w_tiled.is_cuda     # tiles only, as any CUDA layer
        assert torch.equal(q(ids).logits, ref)
        q.unfuse_projections()
        assert torch.equal(q(ids).logits, ref)

"""CompiledModel as a drop-in for the HF model: greedy generate, KV cache, dtype casts, attribute delegation."""
import copy

import pytest
import torch

import abqc
from abqc.runtime import QuantLinear
from conftest import tiny_model

RTN = ["rtn", "lower"]


def greedy(model, ids, use_cache=True, n=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                              pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_tokens_match_fake_quant_and_cache(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    real = abqc.compile(model, bits="w4a8", passes=RTN, progress=False)
    fake = abqc.compile(model, bits="w4a8", passes=["rtn", "lower_fake"], progress=False)
    out = greedy(real, ids)
    assert out.shape == (2, 12) and torch.equal(out[:, :6], ids)
    assert torch.equal(out, greedy(fake, ids))
    assert torch.equal(out, greedy(real, ids, use_cache=False))
    assert not torch.equal(out, greedy(model, ids))   # w4a8 of a random model changes the greedy path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_cast_keeps_quant_scales_float32(tiny_llama, dtype):
    q = abqc.compile(tiny_llama, bits="w4a8", passes=RTN, progress=False)
    ql = q.model.model.layers[0].self_attn.q_proj
    scale, planes = ql.w_scale.clone(), ql.w_planes.clone()
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = q(ids).logits
    q.to(dtype)
    assert isinstance(ql, QuantLinear) and ql.w_scale.dtype == torch.float32
    assert torch.equal(ql.w_scale, scale) and torch.equal(ql.w_planes, planes)   # moved, never rounded
    assert q.model.model.embed_tokens.weight.dtype == dtype and q.dtype == dtype
    with torch.no_grad():
        low = q(ids).logits
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)
    assert greedy(q, ids, n=4).shape == (1, 14)


def test_qwen2_bias_stays_float32_under_half(tiny_qwen2):
    q = abqc.compile(tiny_qwen2, bits="w4a8", passes=RTN, progress=False).half()
    k = q.model.model.layers[0].self_attn.k_proj
    assert k.bias is not None and k.bias.dtype == torch.float32
    torch.testing.assert_close(k.bias, tiny_qwen2.model.layers[0].self_attn.k_proj.bias, rtol=0, atol=0)


def test_attributes_delegate_to_wrapped_model(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", passes=RTN, progress=False).eval()
    assert q.config is q.model.config and q.generation_config is q.model.generation_config
    assert q.device == torch.device("cpu") and q.get_input_embeddings() is q.model.model.embed_tokens
    assert not q.training and not q.model.training
    with pytest.raises(AttributeError):
        q.no_such_attribute
    with pytest.raises(AttributeError):
        q._private_name_is_not_delegated
    clone = copy.deepcopy(q)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, q(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_generates_like_cpu(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", passes=RTN, progress=False)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu_logits = q(ids).logits
    planes = q.model.model.layers[0].mlp.down_proj.w_planes.clone()
    q.to("cuda")
    down = q.model.model.layers[0].mlp.down_proj
    assert down._buffers["w_planes"] is None and down._w_tiled.is_cuda       # the tiles are the only copy
    assert torch.equal(down.w_planes.cpu(), planes) and torch.equal(down.state_dict()["w_planes"].cpu(), planes)
    with torch.no_grad():
        torch.testing.assert_close(q(ids.cuda()).logits.cpu(), cpu_logits, atol=1e-3, rtol=1e-3)
    out = greedy(q, ids.cuda())
    assert torch.equal(out, greedy(q, ids.cuda(), use_cache=False))
    q.half()
    assert q.model.model.layers[0].mlp.down_proj.w_scale.dtype == torch.float32
    assert greedy(q, ids.cuda(), n=4).shape == (2, 10)
    q.to("cpu")
    assert torch.equal(down._buffers["w_planes"], planes) and "_w_tiled" not in down.__dict__


def test_tiles_only_storage_round_trips(tiny_llama, monkeypatch):
    """Where the kernels need only the tiled layout (CUDA), QuantLinear drops its canonical planes. Pretend the
    CPU is such a device: the module keeps one packed copy, and w_planes, state_dict, load, forward, deepcopy
    and a move to a device that keeps canonical planes all give back exactly the original planes."""
    q = abqc.compile(tiny_llama, bits="w2a8", passes=RTN, progress=False)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = q(ids).logits
    state = {k: v.clone() for k, v in q.state_dict().items()}
    ql = q.model.model.layers[0].mlp.down_proj
    planes, spec = ql.w_planes.clone(), ql.spec()
    monkeypatch.setattr(QuantLinear, "keeps_tiles_only", staticmethod(lambda device: True))
    q.to("cpu")
    assert ql._buffers["w_planes"] is None and ql._w_tiled.shape[2] == planes.shape[0]
    assert "w_planes" not in dict(ql.named_buffers()) and ql.planes == planes.shape[0] and ql.spec() == spec
    assert torch.equal(ql.w_planes, planes)
    sd = q.state_dict()
    assert list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)
        assert torch.equal(copy.deepcopy(q)(ids).logits, ref)
    other = abqc.compile(tiny_model("llama", seed=5), bits="w2a8", passes=RTN, progress=False)
    theirs = other.model.model.layers[0].mlp.down_proj.w_planes.clone()
    assert not torch.equal(theirs, planes)
    q.load_state_dict(other.state_dict())          # a tiles-only module loads new weights: new tiles
    assert torch.equal(ql.w_planes, theirs) and ql._buffers["w_planes"] is None
    with torch.no_grad():
        assert torch.equal(q(ids).logits, other(ids).logits)
    q.load_state_dict(sd)
    assert torch.equal(ql.w_planes, planes)
    tiles = ql._w_tiled
    ql.__dict__["_launchers"] = {"prepared": None}
    ql.w_scale = ql.w_scale.clone()                  # a replaced buffer drops the prepared launches
    assert "_launchers" not in ql.__dict__
    import abqc.codegen.layout as layout_mod

    def no_untile(*a, **k):
        raise AssertionError("a float cast untiled the planes")
    monkeypatch.setattr(layout_mod, "untile_weights", no_untile)
    q.to(torch.bfloat16).to(torch.float32)         # float casts leave the integer tiles alone
    assert ql._w_tiled is tiles and ql.w_scale.dtype == torch.float32
    monkeypatch.undo()
    monkeypatch.setattr(QuantLinear, "keeps_tiles_only", staticmethod(lambda device: False))
    q.to("cpu")                                    # back to canonical storage
    assert torch.equal(ql._buffers["w_planes"], planes) and "_w_tiled" not in ql.__dict__

import networkx as nx
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from abqc import capture
from abqc.errors import UnsupportedModelError
from conftest import tiny_model

ROLES = {"q", "k", "v", "o", "gate", "up", "down"}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_blocks_annotated_with_roles_and_relations(kind):
    model = tiny_model(kind, layers=2)
    cm = capture.capture(model)
    assert len(cm.blocks) == 2
    for b in cm.blocks:
        assert set(b.linears) == ROLES
        assert isinstance(b.graph, torch.fx.GraphModule)
        roles = [n.meta["abqc_role"] for n in b.graph.graph.nodes if "abqc_role" in n.meta]
        assert sorted(roles) == sorted(ROLES)
        assert b.norm_groups == {"input_layernorm": ["q", "k", "v"], "post_attention_layernorm": ["gate", "up"]}
        assert b.v_to_o == ("v", "o") and b.gated_mlp == ("gate", "up", "down")
        assert b.linear("q") is model.model.layers[b.index].self_attn.q_proj
        rel = b.relation_graph()
        assert rel.has_edge("input_layernorm", "self_attn.k_proj")
        assert rel.edges["self_attn.v_proj", "self_attn.o_proj"]["kind"] == "v->o"
        assert rel.edges["mlp.up_proj", "mlp.down_proj"]["kind"] == "up->down"
        g = b.node_graph()
        assert nx.is_directed_acyclic_graph(g) and g.number_of_nodes() == len(b.graph.graph.nodes)
    assert len(list(cm.linears())) == 14


def test_capture_leaves_model_unchanged(tiny_llama):
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = tiny_llama(ids).logits
        capture.capture(tiny_llama)
        after = tiny_llama(ids).logits
    assert torch.equal(before, after)


def test_unsupported_architecture_is_named():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        capture.capture(gpt2)


def test_unknown_linear_is_named(tiny_llama):
    layer = tiny_llama.model.layers[0]
    layer.mlp.extra_proj = torch.nn.Linear(64, 64)
    orig = layer.mlp.forward
    layer.mlp.forward = lambda x: orig(x) + layer.mlp.extra_proj(x)
    with pytest.raises(UnsupportedModelError, match="mlp.extra_proj"):
        capture.capture(tiny_llama)

"""ONNX export parity (onnxruntime vs abqc's CPU reference) and the FX graph dump/drawing of a block."""
import networkx as nx
import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

import abqc
from abqc.export import graph as xgraph
from abqc.export import onnx as xonnx

# Stated tolerance: every linear is exact up to float32 rounding (abqc scales in float64), so outputs agree to
# 1e-4; a float rounding difference upstream may move one activation across a code boundary, so the model
# check allows that for a few elements (bounded by 5% of the output range).
TOL = 1e-4


def _compile(kind, bits, layers=2, **kw):
    return abqc.compile(tiny_model(kind, layers=layers), bits=bits, method="rtn", progress=False, **kw)


def test_block_parity_with_per_group_balanced_and_weight_only(tmp_path):
    q = _compile("llama", "w4a8,down=w4a16g32,1.o=w2*a8,1.up=w3a6g64")
    exp = xonnx.export_onnx(q, tmp_path / "block.onnx", scope="block", layer=1)
    res = xonnx.parity(q, exp)
    assert res["max_abs_diff"] <= TOL and res["shape"] == [2, 16, 64]
    # dynamic batch and sequence: a new shape runs and still matches
    g = torch.Generator().manual_seed(1)
    feed = {"hidden_states": torch.randn(3, 21, 64, generator=g).numpy(),
            "cos": np.repeat(exp.inputs["cos"][:, :1], 21, 1), "sin": np.repeat(exp.inputs["sin"][:, :1], 21, 1)}
    assert xonnx.parity(q, exp, feed)["max_abs_diff"] <= TOL
    s = exp.summary()["quantized_linears_by_bits"]
    assert s == {"w4a8 (uint4)": 4, "w4a16g32 (uint4)": 1, "w2*a8 (uint4)": 1, "w3a6g64 (uint4)": 1}


def test_model_parity_every_weight_width_integer_initialisers(tmp_path):
    # one layer, seven linears: weight widths 1..8 (as q..down) and activation widths 1..8 / FP, symmetric
    bits = "w8a8,q=w1a8,k=w2a4,v=w3a3,o=w5a7,gate=w6a2,up=w7a16,down=w8a5"
    q = _compile("qwen2", bits, layers=1, act_symmetric=True)
    exp = xonnx.export_onnx(q, tmp_path / "m.onnx", scope="model")
    res = xonnx.parity(q, exp)
    assert res["frac_within_1e-4"] >= 0.999 and res["max_abs_diff"] <= 0.05 * res["ref_max_abs"]
    m = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7
    types = sorted(onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type) for n in dq)
    assert types == ["UINT4"] * 3 + ["UINT8"] * 4        # w1, w2, w3 narrowed; w5..w8 in uint8
    assert all(inits[n.input[2]].data_type == inits[n.input[0]].data_type for n in dq)
    assert not any(t.name.endswith(".weight") and "proj" in t.name for t in m.graph.initializer)
    # per-token activation quantization is in the graph: symmetric codes need one Round per quantized-activation
    # linear (up is a16); the per-token min/max are shared by linears reading the same tensor
    assert sum(n.op_type == "Round" for n in m.graph.node) == 6
    assert sum(n.op_type == "ReduceMin" for n in m.graph.node) == 4


def test_fractional_zero_points_export_with_a_per_group_offset(tmp_path):
    """An "f" grid (fractional zero points, some outside the code range) exports: DequantizeLinear holds the
    zero's integer part, a second blocked DequantizeLinear of in-graph zeros subtracts the rest; onnxruntime
    matches the integer reference, and linears with integer zeros carry no offset."""
    q = _compile("llama", "w4a8g32f,down=w8a8,1.o=w3a16f")
    exp = xonnx.export_onnx(q, tmp_path / "f.onnx", scope="block", layer=1)
    assert xonnx.parity(q, exp)["max_abs_diff"] <= TOL
    m = onnx.load(str(tmp_path / "f.onnx"))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 + 6                                   # seven linears, six of them with an offset
    inits = {t.name: t for t in m.graph.initializer}
    codes = [int(np.prod(inits[n.input[0]].dims)) for n in dq if n.input[0] in inits]
    assert len(codes) == 7                                    # the offsets' zeros are made in the graph
    floats = [int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(floats) < min(codes)                           # no [N, K] float offset stored
    ready, _ = xonnx.export_ready(q)
    layer = ready.model.layers[1]
    assert layer.mlp.down_proj.w_offset is None and layer.self_attn.q_proj.w_offset is not None
    z = abqc.quant.zero_of_fixed(q.model.model.layers[1].self_attn.q_proj.w_zero)
    assert bool(((z < 0) | (z != z.round())).any())          # the case DequantizeLinear alone cannot hold


def test_export_ready_is_the_reference_in_torch():
    """The float model of the exported graph (before ONNX) equals the integer reference, incl. an input transform."""
    q = _compile("llama", "w3a5g32,down=w6a8")
    mod = q.model.model.layers[0].mlp.down_proj
    rot = torch.linalg.qr(torch.randn(mod.in_features, mod.in_features, dtype=torch.float64))[0]
    mod.pre = _Rot(rot)
    ids = torch.randint(0, 256, (2, 9))
    ready, table = xonnx.export_ready(q)
    with torch.no_grad():
        ref = q(ids, use_cache=False).logits
        got = ready(ids, use_cache=False).logits
    assert len(table) == 14 and table["model.layers.0.mlp.down_proj"]["storage"] == "uint8"
    assert (got - ref).abs().max() <= TOL


class _Rot(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.register_buffer("m", m)

    def forward(self, x):
        return (x.double() @ self.m).to(x.dtype)


def test_unexpressible_and_wrong_inputs_are_clear_errors(tmp_path):
    with pytest.raises(abqc.AbqcError, match="not expressible"):
        xonnx.code_storage(9)
    with pytest.raises(abqc.AbqcError, match="1..8 bits or keeps them FP"):
        xonnx.check_expressible(12, False)
    with pytest.raises(abqc.AbqcError, match="no quantized linears"):
        xonnx.export_onnx(tiny_model("llama"), tmp_path / "x.onnx")
    fake = abqc.compile(tiny_model("llama"), bits="w4a8", passes=["rtn", "lower_fake"], progress=False)
    with pytest.raises(abqc.AbqcError, match="fake-quant"):
        xonnx.export_onnx(fake, tmp_path / "x.onnx")
    q = _compile("llama", "w4a8")
    with pytest.raises(abqc.AbqcError, match="scope"):
        xonnx.export_onnx(q, tmp_path / "x.onnx", scope="layer")
    with pytest.raises(abqc.AbqcError, match="decoder layers 0..1"):
        xonnx.export_onnx(q, tmp_path / "x.onnx", scope="block", layer=5)


def test_block_graph_dump_and_drawing(tmp_path):
    q = _compile("llama", "w4a8,down=w4a16g32")
    q.report["passes"].append({"name": "smoothquant", "summary": {}, "details": [
        {"layer": 1, "pair": "input_layernorm->q,k,v", "scale_min": 0.25, "scale_max": 3.5}]})
    files = xgraph.write_block_graph(q, tmp_path, layer=1)
    table = files["table"].read_text()
    starred = [ln for ln in table.splitlines() if ln.startswith("*")]
    assert len(starred) == 7 and sum("w4a8 per-channel" in ln for ln in starred) == 6
    assert "w4a16g32 per-group" in table and "wq_linear" in table
    assert "torch.ops.abqc.wpaq_linear" in files["code"].read_text()
    dot = files["dot"].read_text()
    assert dot.count("fillcolor=\"#f4a261\"") == 7 and "W4A16G32" in dot
    assert dot.count("smooth scale [0.25, 3.5]") == 3            # input_layernorm -> q, k, v
    assert dot.count("smooth scale") == 3 + 2 + 1 + 1             # + post-norm -> gate, up; v -> o; up -> down
    assert files["png"].stat().st_size > 10_000
    g = xgraph.condense(xgraph.lowered_block_graph(q, 1), q.report["relations"])
    assert nx.is_directed_acyclic_graph(g)
    kinds = [d["kind"] for _, d in g.nodes(data=True)]
    assert kinds.count("quant") == 7 and kinds.count("norm") == 2 and "attention" in kinds

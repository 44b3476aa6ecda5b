import json

import pytest
import torch

import abqc
from abqc.bits import BitPair
from abqc.errors import AbqcError, BitSpecError, UnsupportedModelError
from abqc.runtime import QuantLinear
from conftest import tiny_model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", ["w4a8", "w2a8", "w2*a8", "w4a16", "w3a4g32", "w8a8"])
def test_real_path_matches_fake_quant(kind, bits):
    model = tiny_model(kind)
    ids = torch.randint(0, 256, (2, 24))
    real = abqc.compile(model, bits=bits, method="rtn", progress=False)
    fake = abqc.compile(model, bits=bits, passes=["rtn", "lower_fake"], progress=False)
    with torch.no_grad():
        lr, lf, l0 = real(ids).logits, fake(ids).logits, model(ids).logits
    torch.testing.assert_close(lr, lf, rtol=1e-4, atol=1e-4)
    assert (lr - l0).abs().max() > 1e-4          # quantization did change something


def test_original_model_untouched_and_linears_lowered(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", method="rtn", progress=False)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(q.model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert q.config is q.model.config


def test_more_bits_closer_to_fp(tiny_llama):
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        errs = [(abqc.compile(tiny_llama, bits=b, method="rtn", progress=False)(ids).logits - ref).norm().item()
                for b in ("w2a8", "w4a8", "w8a8")]
    assert errs[0] > errs[1] > errs[2]


def test_overrides_reach_modules(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w2a8", method="rtn", overrides={"down": "w4a8", "1.o": "w16a16"}, progress=False)
    l0, l1 = q.model.model.layers
    assert l0.mlp.down_proj.pair == BitPair(4, 8) and l0.self_attn.q_proj.pair == BitPair(2, 8)
    assert type(l1.self_attn.o_proj) is torch.nn.Linear      # kept FP
    assert l0.self_attn.o_proj.pair == BitPair(2, 8)


def test_report_contents(tiny_llama, tmp_path):
    q = abqc.compile(tiny_llama, bits="w4a8,down=w8a8", method="rtn", report_dir=tmp_path, progress=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["bits"] == "w4a8,down=w8a8" and rep["n_layers"] == 2
    names = [p["name"] for p in rep["passes"]]
    assert names == ["rtn", "lower[real]"]
    rtn = rep["passes"][0]
    assert len(rtn["details"]) == 14 and {d["role"] for d in rtn["details"]} >= {"q", "down"}
    assert rep["passes"][1]["summary"]["linears_by_bits"] == {"w4a8": 12, "w8a8": 2}
    assert rep["passes"][1]["summary"]["compression_vs_fp16"] > 1
    assert rep == q.report


def test_custom_pass_callable(tiny_llama):
    seen = []

    def count(captured, ctx):
        seen.append(len(captured.blocks))
        return captured, abqc.passes.PassReport("count", {"blocks": len(captured.blocks)})

    q = abqc.compile(tiny_llama, bits="w4a8", passes=[count, "rtn", "lower"], progress=False)
    assert seen == [2] and q.report["passes"][0]["summary"] == {"blocks": 2}


def test_export_shows_runtime_ops(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", method="rtn", progress=False)
    layer = q.model.model.layers[0]
    from abqc.capture import _layer_inputs
    args, kwargs = _layer_inputs(q.model, q.model.model.layers, 8)[0]
    ep = torch.export.export(layer, args, kwargs, strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("abqc.wpaq_linear" in t for t in targets) == 7
    assert not any("aten.linear" in t for t in targets)


def test_generate_runs(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", method="rtn", progress=False)
    out = q.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("kwargs,err,fragment", [
    ({"bits": "w9a8"}, BitSpecError, "outside 1..8"),
    ({"bits": "w4a8", "method": "rtn", "overrides": {"7": "w8a8"}}, BitSpecError, "has 2 decoder layers"),
    ({"bits": "w4a8", "passes": ["rtn", "nope"]}, AbqcError, "unknown pass 'nope'"),
    ({"bits": "w4a8", "passes": ["lower"]}, RuntimeError, "run a quantization pass"),
    ({"bits": "w4a8", "calib": torch.randn(2, 8)}, AbqcError, "LongTensor"),
])
def test_bad_inputs(tiny_llama, kwargs, err, fragment):
    with pytest.raises(err, match=fragment):
        abqc.compile(tiny_llama, progress=False, **kwargs)


def test_refuses_already_quantized(tiny_llama):
    q = abqc.compile(tiny_llama, bits="w4a8", method="rtn", progress=False)
    with pytest.raises(AbqcError, match="already compiled"):
        abqc.compile(q, bits="w4a8", method="rtn")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        abqc.compile(q.model, bits="w4a8", method="rtn")

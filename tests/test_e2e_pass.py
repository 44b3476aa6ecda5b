"""The e2e pass: weight scales tuned end to end against the float model's next-token distribution, codes
and zero points frozen."""
import pytest
import torch
import torch.nn.functional as F

import abqc
from abqc.errors import AbqcError
from abqc.passes import REGISTRY
from abqc.passes.e2e import make_e2e
from conftest import tiny_model


def _kl_to(fp, q, ids) -> float:
    with torch.no_grad():
        lp, lq = (F.log_softmax(m(ids).logits.float(), -1) for m in (fp, q))
    return float(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean())


def _calib(n=8, seed=1):
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_e2e_moves_only_scales_and_brings_the_quantized_model_closer_to_the_float_one():
    model, calib = tiny_model("llama"), _calib()
    rtn = abqc.compile(model, bits="w3a8", method="rtn", progress=False)
    q = abqc.compile(model, bits="w3a8", passes=["rtn", make_e2e(epochs=6, lr=1e-2, batch=2), "lower"], calib=calib,
                     progress=False)
    rep = next(p for p in q.report["passes"] if p["name"] == "e2e")["summary"]
    assert rep["steps"] == 24 and len(rep["loss_curve"]) == 24 and rep["kl_last"] < rep["kl_first"]
    for a, b in ((rtn.model.model.layers[i].mlp.down_proj, q.model.model.layers[i].mlp.down_proj) for i in (0, 1)):
        assert torch.equal(a.w_planes, b.w_planes) and torch.equal(a.w_zero, b.w_zero)
        assert not torch.equal(a.w_scale, b.w_scale) and bool((b.w_scale > 0).all())
    # the deployed (real integer) model, on the calibration ids and on ids it never saw
    assert _kl_to(model, q, calib) < 0.8 * _kl_to(model, rtn, calib)
    held_out = _calib(4, seed=9)
    assert _kl_to(model, q, held_out) < _kl_to(model, rtn, held_out)


def test_e2e_leaves_the_float_model_and_its_gradients_flags_as_they_were():
    model = tiny_model("llama")
    for p in model.model.layers[0].parameters():     # a mix of flags, each to come back as it was
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = abqc.compile(model, bits="w4a8", passes=["rtn", make_e2e(lr=1e-2), "lower"], calib=_calib(2), progress=False,
                     inplace=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    want = {n: not n.startswith("model.layers.0.") for n, _ in model.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    got = {n: p.requires_grad for n, p in q.model.named_parameters()}   # the compiled copy: as it came in
    assert got and all(got[n] == want[n] for n in got if n in want) and not any(".t" in n for n in got)


def test_e2e_runs_from_the_registry_with_pass_options_and_after_rotation():
    model, calib = tiny_model("llama"), _calib(4)
    q = abqc.compile(model, bits="w4a8", passes=["rotate", "rtn", "gptq", "e2e", "lower"], calib=calib,
                     progress=False, pass_options={"e2e": {"epochs": 2, "lr": 5e-3}})
    rep = next(p for p in q.report["passes"] if p["name"] == "e2e")["summary"]
    assert rep["steps"] == 8 and rep["epochs"] == 2 and rep["lr"] == 5e-3
    with torch.no_grad():
        assert torch.isfinite(q(calib).logits).all()
    assert "e2e" in REGISTRY


def test_e2e_refuses_a_missing_quantization_pass_missing_calibration_and_a_bad_recipe():
    model = tiny_model("llama")
    with pytest.raises(AbqcError, match="quantization pass"):
        abqc.compile(model, bits="w4a8", passes=["e2e", "lower"], calib=_calib(2), progress=False)
    with pytest.raises(AbqcError, match="calibration"):
        abqc.compile(model, bits="w4a8", passes=["rtn", "e2e", "lower"], progress=False)
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"batch": 0}, {"samples": 0}):
        with pytest.raises(AbqcError, match="e2e needs"):
            make_e2e(**bad)


def test_e2e_stops_with_a_clear_error_when_the_loss_is_not_finite():
    model = tiny_model("llama")
    with pytest.raises(AbqcError, match="lower lr"):
        abqc.compile(model, bits="w4a8", passes=["rtn", make_e2e(epochs=3, lr=1e6), "lower"], calib=_calib(4),
                     progress=False)

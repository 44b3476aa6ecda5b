"""The gptq pass: same grid, codes re-rounded with second-order error feedback."""
import pytest
import torch

import abqc
from abqc import quant
from abqc.errors import AbqcError
from abqc.passes.gptq import _weighted_error, gptq_codes
from conftest import tiny_model


def _problem(n=48, k=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)      # correlated inputs
    x = torch.randn(512, k, generator=gen) @ mix
    return w, x.T @ x


@pytest.mark.parametrize("bits,group,balanced", [(4, None, False), (3, 32, False), (2, None, True), (2, 32, False)])
def test_gptq_lowers_the_hessian_weighted_error_on_the_same_grid(bits, group, balanced):
    w, h = _problem(seed=bits)
    qw = quant.quantize_weight(w, bits, group, symmetric=balanced, balanced=balanced)
    qmax = quant.grid(bits, balanced, balanced)[1]
    codes = gptq_codes(w, qw, qmax, h)
    assert codes.dtype == torch.int16 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= qmax
    new = quant.QuantizedWeight(codes, qw.scale, qw.zero, qw.planes, qw.group_size)
    assert _weighted_error(w, new.dequantize(), h) < 0.9 * _weighted_error(w, qw.dequantize(), h)


def test_weights_already_on_the_grid_keep_their_codes():
    w, h = _problem(seed=7)
    qw = quant.quantize_weight(w, 4, 32)
    on_grid = qw.dequantize()
    assert torch.equal(gptq_codes(on_grid, qw, 15, h), qw.codes)     # zero error: nothing to feed back


def test_gptq_method_keeps_rtn_grids_and_reduces_error():
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    rtn = abqc.compile(model, bits="w3a8", method="rtn", progress=False)
    q = abqc.compile(model, bits="w3a8", method="gptq", calib=calib, progress=False)
    rep = next(p for p in q.report["passes"] if p["name"] == "gptq")
    assert rep["summary"]["linears"] == 14 and rep["summary"]["mean_weighted_error_ratio"] < 0.9
    a, b = rtn.model.model.layers[1].mlp.down_proj, q.model.model.layers[1].mlp.down_proj
    assert torch.equal(a.w_scale, b.w_scale) and torch.equal(a.w_zero, b.w_zero)
    assert not torch.equal(a.w_planes, b.w_planes)
    with torch.no_grad():
        assert torch.isfinite(q(calib).logits).all()


def test_gptq_needs_calibration_and_a_quantization_pass_before_it():
    model = tiny_model("llama")
    with pytest.raises(AbqcError, match="calibration"):
        abqc.compile(model, bits="w4a8", method="gptq", progress=False)
    with pytest.raises(RuntimeError, match="quantization pass"):
        abqc.compile(model, bits="w4a8", passes=["gptq", "lower"], calib=torch.randint(0, 256, (2, 16)),
                     progress=False)


@pytest.mark.parametrize("group", [None, 32])
def test_act_order_is_gptq_on_the_columns_sorted_by_input_energy(group):
    """act_order=True equals plain GPTQ run on the columns permuted by decreasing H diagonal (each column
    keeping its own group's grid), mapped back; it still lowers the weighted error on the same grid."""
    w, h = _problem(seed=11)
    h = h * torch.linspace(0.2, 3.0, h.shape[0]).sqrt().outer(torch.linspace(0.2, 3.0, h.shape[0]).sqrt())
    qw = quant.quantize_weight(w, 3, group)
    codes = gptq_codes(w, qw, 7, h, act_order=True)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(len(perm)))
    new = quant.QuantizedWeight(codes, qw.scale, qw.zero, qw.planes, qw.group_size)
    assert _weighted_error(w, new.dequantize(), h) < 0.9 * _weighted_error(w, qw.dequantize(), h)
    if group is None:    # per-channel: the grid does not depend on the column order
        plain = gptq_codes(w[:, perm], qw, 7, h[perm][:, perm])
        assert torch.equal(codes, plain[:, torch.argsort(perm)])
    on_grid = qw.dequantize()
    assert torch.equal(gptq_codes(on_grid, qw, 7, h, act_order=True), qw.codes)


def test_act_order_reaches_the_pass_through_pass_options():
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = abqc.compile(model, bits="w3a8", method="gptq", calib=calib, progress=False,
                     pass_options={"gptq": {"act_order": True}})
    rep = next(p for p in q.report["passes"] if p["name"] == "gptq")
    assert rep["summary"]["act_order"] is True and rep["summary"]["mean_weighted_error_ratio"] < 1

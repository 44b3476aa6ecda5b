"""RTN: round-to-nearest weight quantization, no calibration.

Invariant: afterwards ctx.state["qweights"][(layer, role)] = (BitPair, QuantizedWeight) for every
annotated linear whose pair is not FP; the model's float weights are untouched.
"""
from __future__ import annotations

import torch

from .. import quant
from ..capture import CapturedModel
from .base import PassContext, PassReport


def rtn(captured: CapturedModel, ctx: PassContext):
    qweights = ctx.state.setdefault("qweights", {})
    details = []
    for layer, role, lin in captured.linears():
        pair = ctx.bits.for_linear(layer, role)
        if pair.is_fp:
            continue
        w = lin.weight.detach()
        qw = quant.quantize_weight(w, **quant.weight_grid_of(pair, ctx.weight_symmetric))
        qweights[(layer, role)] = (pair, qw)
        err = (qw.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
        details.append({"layer": layer, "role": role, "bits": str(pair), "shape": list(w.shape),
                        "weight_rel_err": round(float(err), 6)})
    errs = torch.tensor([d["weight_rel_err"] for d in details]) if details else torch.zeros(1)
    summary = {"quantized_linears": len(details), "mean_weight_rel_err": round(float(errs.mean()), 6),
               "max_weight_rel_err": round(float(errs.max()), 6)}
    return captured, PassReport("rtn", summary, details)

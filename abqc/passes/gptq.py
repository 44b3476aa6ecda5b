"""GPTQ: re-round every quantized linear's weight codes with second-order error feedback, keeping the grid
(scale and zero point per channel or group) that the quantization pass before it chose.

Runs after any pass that leaves ctx.state["qweights"] (rtn, smoothquant, abq, lwc-mse) and before lower.
Block by block on the calibration samples, in the order the block computes (q/k/v, o, gate/up, down):
each linear's input Gram matrix H = sum x x^T is taken with everything before it already quantized as
deployed (earlier blocks and linears re-rounded, activations fake-quantized); then its columns are
quantized in order and each column's rounding error is spread over the columns not yet quantized through
the upper Cholesky factor of H^-1 (Frantar et al. 2022, "GPTQ"), in blocks of 128 columns, with 1% of
the mean diagonal added to H as damping (option act_order: columns in decreasing order of H's diagonal,
each keeping its own group's grid). The report gives, per linear, the H-weighted error
tr((W - Q) H (W - Q)^T) after GPTQ relative to the codes it started from (below 1: better).
Invariant: afterwards every qweights entry has the same pair, scale, zero point and group size and codes
in the same range; only codes change, and the model's float weights are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from ..calib import BlockMath, batched, embed_inputs, progress, rope_tables
from ..capture import CapturedModel
from .base import PassContext, PassReport

STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))   # a block's linears in dependency order
DAMP = 0.01
COLUMN_BLOCK = 128


def _weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


@torch.no_grad()
def gptq_codes(w: torch.Tensor, qw: quant.QuantizedWeight, qmax: int, h: torch.Tensor,
               damp: float = DAMP, block: int = COLUMN_BLOCK, act_order: bool = False) -> torch.Tensor:
    """Codes int16 [N, K] for w [N, K] on qw's grid, chosen column by column with GPTQ's error feedback
    under the input Gram matrix h [K, K]. act_order: quantize the columns with the largest H diagonal
    (the most active inputs) first, so later columns absorb their error; each column keeps its own
    group's scale and zero point."""
    w = w.float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0                     # inputs that never fire: any code is as good
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    group_of = (perm if perm is not None else torch.arange(k, device=w.device)) // qw.group_size
    h += damp * torch.diag(h).mean() * torch.eye(k, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero = qw.scale.float(), qw.zero.float()
    codes = torch.empty(n, k, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.empty(n, i2 - i1, device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            grp = int(group_of[i1 + j])
            s, z = scale[:, grp], zero[:, grp]
            u = quant.quantize_codes(w1[:, j], s, z, qmax)
            codes[:, i1 + j] = u
            e = (w1[:, j] - (u - z) * s) / h1[j, j]
            w1[:, j:] -= e[:, None] * h1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]     # back to the weight's own column order
    return codes.to(torch.int16)


def _act(pair, act_symmetric):
    if pair is None or pair.is_fp or pair.weight_only:
        return lambda x: x
    return lambda x: quant.fake_quant_activation(x, pair.a_bits, act_symmetric)


def make_gptq(act_order: bool = False):
    """The gptq pass; act_order=True quantizes each linear's columns in decreasing order of input energy."""
    def gptq_pass(captured: CapturedModel, ctx: PassContext):
        return gptq(captured, ctx, act_order)
    return gptq_pass


def gptq(captured: CapturedModel, ctx: PassContext, act_order: bool = False):
    qweights = ctx.state.get("qweights")
    if qweights is None:
        raise RuntimeError("gptq re-rounds quantized weights: run a quantization pass (rtn, abq, ...) before it")
    ids = ctx.need_calib("gptq")
    dev = ctx.calib_device()
    model = captured.model
    x_q = embed_inputs(model, ids, dev)
    rope = rope_tables(model, ids.shape[1], dev)
    details = []
    for block in progress(captured.blocks, ctx, "gptq"):
        bm = BlockMath(block.module, model.config)
        w_fp = bm.weights(dev)
        pairs = {r: qweights[(block.index, r)][0] for r in w_fp.linears if (block.index, r) in qweights}
        deq = {r: qweights[(block.index, r)][1].to(dev).dequantize() for r in pairs}

        def linear_fn(role, x, w, b):
            if role not in pairs:
                return F.linear(x, w, b)
            return F.linear(_act(pairs[role], ctx.act_symmetric)(x), deq[role], b)

        for stage in STAGES:
            todo = [r for r in stage if r in pairs]
            if not todo:
                continue
            grams = {}

            last = {}   # q/k/v (and gate/up) see the same input: one Gram product per input and bit pair

            def observe(role, x, todo=todo, grams=grams, last=last):
                if role in todo:
                    if last.get("x") is not x or last.get("pair") != pairs[role]:
                        x2 = _act(pairs[role], ctx.act_symmetric)(x).reshape(-1, x.shape[-1]).float()
                        last.update(x=x, pair=pairs[role], gram=x2.T @ x2)
                    grams[role] = grams.get(role, 0) + last["gram"]
            batched(lambda xb: bm.forward(xb, rope, w_fp, linear_fn, observe=observe)[0], x_q)
            for role in todo:
                pair, qw = qweights[(block.index, role)]
                qw_dev = qw.to(dev)
                w = w_fp.linears[role][0]
                qmax = quant.grid(pair.w_bits, ctx.weight_symmetric or pair.balanced, pair.balanced)[1]
                before = _weighted_error(w, deq[role], grams[role])
                codes = gptq_codes(w, qw_dev, qmax, grams[role], act_order=act_order)
                new = quant.QuantizedWeight(codes, qw_dev.scale, qw_dev.zero, qw.planes, qw.group_size)
                deq[role] = new.dequantize()
                after = _weighted_error(w, deq[role], grams[role])
                qweights[(block.index, role)] = (pair, new.to(qw.codes.device))
                details.append({"layer": block.index, "role": role, "bits": str(pair),
                                "weighted_error_ratio": round(after / max(before, 1e-30), 6)})
        x_q = batched(lambda xb: bm.forward(xb, rope, w_fp, linear_fn)[0], x_q)
    ratios = torch.tensor([d["weighted_error_ratio"] for d in details]) if details else torch.ones(1)
    summary = {"samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "device": str(dev), "damp": DAMP,
               "act_order": act_order,
               "linears": len(details), "mean_weighted_error_ratio": round(float(ratios.mean()), 6),
               "max_weighted_error_ratio": round(float(ratios.max()), 6)}
    return captured, PassReport("gptq", summary, details)

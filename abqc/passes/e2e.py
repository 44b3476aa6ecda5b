"""E2E scale tuning: with every quantized linear's integer codes and zero points frozen, learn its weight
scales (one per channel or group) end to end, so that the whole quantized model's next-token
distribution matches the float model's (KL(p_fp || p_q) over the calibration tokens).

Block-wise calibration (abq, lwc-mse) and GPTQ each fit one block or one linear to its own float output,
so errors that only show downstream (how a block's error moves the logits) go unseen; this pass sees the
whole model at once, with activations fake-quantized as deployed (per token, straight-through rounding).
Only the scales move (one number per row of weights, or per group), so it cannot memorise its samples
the way weight fine-tuning can (after EfficientQAT's end-to-end step, Chen et al. 2024). The teacher is the
model's float graph as the passes before this one left it (rotation and smoothing keep its function).

Runs after a pass that leaves ctx.state["qweights"] (rtn, abq, lwc-mse, gptq) and before lower.
Invariant: afterwards every qweights entry has the same pair, codes, zero points and group size; only
scales change (each stays positive), and the model's float weights are untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..calib import progress
from ..capture import CapturedModel
from ..errors import AbqcError
from .base import PassContext, PassReport


class _ScaleTuned(nn.Module):
    """A quantized linear during tuning: W = (codes - zero) * scale * exp(t), t learnable, x fake-quantized."""

    def __init__(self, fp: nn.Module, pair, qw: quant.QuantizedWeight, act_symmetric: bool, device):
        super().__init__()
        self.fp, self.pair, self.act_symmetric = fp, pair, act_symmetric
        self.qw = qw.to(device)     # int16 codes: 2 bytes a weight, not a float copy of the model
        self.t = nn.Parameter(torch.zeros_like(self.qw.scale, dtype=torch.float32))
        self.teacher = False

    def scale(self) -> torch.Tensor:
        return self.qw.scale.float() * torch.exp(self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return self.fp(x)
        pre = getattr(self.fp, "pre", None)
        if pre is not None:
            x = pre(x)
        if not self.pair.weight_only:
            x = quant.fake_quant_activation(x, self.pair.a_bits, self.act_symmetric, ste=True)
        qw = self.qw
        w = quant.QuantizedWeight(qw.codes, self.scale(), qw.zero, qw.planes, qw.group_size).dequantize()
        bias = getattr(self.fp, "bias", None)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def make_e2e(epochs: int = 1, lr: float = 1e-3, samples: int | None = None, batch: int = 1):
    """The pass with its recipe: `epochs` passes over `samples` calibration samples (None: all of them),
    `batch` samples a step, Adam at `lr` on the log of every scale."""
    if epochs < 1 or lr <= 0 or batch < 1 or (samples is not None and samples < 1):
        raise AbqcError(f"e2e needs epochs >= 1, lr > 0, batch >= 1 and samples >= 1 or None; got epochs={epochs}, "
                        f"lr={lr}, batch={batch}, samples={samples}")

    def e2e(captured: CapturedModel, ctx: PassContext):
        qweights = ctx.state.get("qweights")
        if not qweights:
            raise AbqcError("e2e tunes the scales of quantized weights: run a quantization pass (rtn, abq, gptq) "
                            "before it")
        ids = ctx.need_calib("e2e")[:samples]
        dev = ctx.calib_device()
        model = captured.model
        home = next(model.parameters()).device
        model.to(dev)
        flags = {p: p.requires_grad for p in model.parameters()}   # before the tuned modules add theirs
        tuned = {}
        for b in captured.blocks:
            for role in list(b.linears):
                if (b.index, role) in qweights:
                    pair, qw = qweights[(b.index, role)]
                    tuned[(b.index, role)] = m = _ScaleTuned(b.linear(role), pair, qw, ctx.act_symmetric, dev)
                    b.set_linear(role, m)
        params = [m.t for m in tuned.values()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        losses = []
        g = torch.Generator().manual_seed(ctx.seed)
        steps = [perm[i:i + batch] for _ in range(epochs)
                 for perm in [torch.randperm(ids.shape[0], generator=g)] for i in range(0, ids.shape[0], batch)]
        try:
            for idx in progress(steps, ctx, "e2e"):
                x = ids[idx].to(dev)
                with torch.no_grad():
                    for m in tuned.values():
                        m.teacher = True
                    logp_fp = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
                    for m in tuned.values():
                        m.teacher = False
                logp_q = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
                loss = F.kl_div(logp_q, logp_fp, log_target=True, reduction="none").sum(-1).mean()
                if not math.isfinite(loss.item()):
                    raise AbqcError(f"e2e: the KL loss became {loss.item()} at step {len(losses)}: lower lr "
                                    f"(now {lr}) or check the model and calibration data for NaN/inf")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(round(loss.item(), 6))
        finally:
            blocks = {b.index: b for b in captured.blocks}
            for (layer, role), m in tuned.items():
                blocks[layer].set_linear(role, m.fp)
            for p, f in flags.items():
                p.requires_grad_(f)
            model.to(home)
        details = []
        for key, m in tuned.items():
            pair, qw = qweights[key]
            new = m.scale().detach().to(qw.scale.device, qw.scale.dtype)
            qweights[key] = (pair, quant.QuantizedWeight(qw.codes, new, qw.zero, qw.planes, qw.group_size))
            details.append({"layer": key[0], "role": key[1],
                            "mean_abs_log_scale_change": round(float(m.t.detach().abs().mean()), 6)})
        k = max(1, len(losses) // 10)
        summary = {"steps": len(losses), "samples": int(ids.shape[0]), "epochs": epochs, "lr": lr,
                   "kl_first": round(sum(losses[:k]) / k, 6) if losses else None,
                   "kl_last": round(sum(losses[-k:]) / k, 6) if losses else None, "loss_curve": losses}
        return captured, PassReport("e2e", summary, details)

    return e2e

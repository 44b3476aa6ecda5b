"""Smoothing-fusion (SmoothQuant): migrate activation outliers into weights with per-channel scales s.

For each pair (producer -> consumers) the consumers' input channels are multiplied by s and the
producer's output channels divided by s, so the FP function is unchanged:
    attn_in  input_layernorm weight / s            q, k, v columns * s
    mlp_in   post_attention_layernorm weight / s   gate, up columns * s
    v_o      v rows (and bias) / s                 o columns * s (each KV channel repeated over its GQA group)
    up_down  up rows (and bias) / s                down columns * s   (down's input is act(gate) * up)
s = max|X|^alpha / max|W|^(1 - alpha) per channel, from calibration activations.
Invariant: after the pass the FP model computes the same function (to float rounding; tested to 1e-5
relative) and its weights are the smoothed ones, so a following quantization pass sees flatter activations.
The same functions give the clip-learning pass its initial scales and its differentiable re-parametrisation.
"""
from __future__ import annotations

import torch

from ..calib import BlockMath, BlockWeights, batched, embed_inputs, progress, rope_tables
from ..capture import CapturedModel
from .base import PassContext, PassReport

PAIRS = ("attn_in", "mlp_in", "v_o", "up_down")
CONSUMERS = {"attn_in": ("q", "k", "v"), "mlp_in": ("gate", "up"), "v_o": ("o",), "up_down": ("down",)}


def apply_smoothing(bm: BlockMath, w: BlockWeights, scales: dict[str, torch.Tensor]) -> BlockWeights:
    """Differentiable: the block weights with the pairs' scales folded in."""
    lin = dict(w.linears)
    na, nm = w.norm_attn, w.norm_mlp

    def cols(roles, s):
        for r in roles:
            wt, b = lin[r]
            lin[r] = (wt * s, b)

    def rows(role, s):
        wt, b = lin[role]
        lin[role] = (wt / s[:, None], None if b is None else b / s)

    if "attn_in" in scales:
        na = na / scales["attn_in"]
        cols(CONSUMERS["attn_in"], scales["attn_in"])
    if "mlp_in" in scales:
        nm = nm / scales["mlp_in"]
        cols(CONSUMERS["mlp_in"], scales["mlp_in"])
    if "v_o" in scales:
        rows("v", scales["v_o"])
        cols(("o",), bm.kv_expand(scales["v_o"]))
    if "up_down" in scales:
        rows("up", scales["up_down"])
        cols(("down",), scales["up_down"])
    return BlockWeights(lin, na, nm, w.extra)


@torch.no_grad()
def input_absmax(bm: BlockMath, w: BlockWeights, xs: torch.Tensor, rope, batch: int = 1) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of every linear over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def observe(role, h):
        m = h.detach().abs().reshape(-1, h.shape[-1]).amax(0).float()
        stats[role] = m if role not in stats else torch.maximum(stats[role], m)

    for i in range(0, xs.shape[0], batch):
        bm.forward(xs[i:i + batch], rope, w, observe=observe)
    return stats


def init_scales(bm: BlockMath, w: BlockWeights, absmax: dict[str, torch.Tensor], alpha: float,
                pairs=PAIRS) -> dict[str, torch.Tensor]:
    """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha) for each pair (GQA-aware for v_o)."""
    out = {}
    for pair in pairs:
        roles = CONSUMERS[pair]
        a = absmax[roles[0]]
        wmax = torch.stack([w.linears[r][0].abs().amax(0) for r in roles]).amax(0)
        if pair == "v_o":   # o's input channels -> v's output channels: max over each GQA group
            groups = bm.n_heads // bm.n_kv
            a = a.view(bm.n_kv, groups, bm.head_dim).amax(1).reshape(-1)
            wmax = wmax.view(bm.n_kv, groups, bm.head_dim).amax(1).reshape(-1)
        s = a.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
        out[pair] = s.clamp(min=1e-5)
    return out


def make_smoothquant(alpha: float = 0.5, pairs=("attn_in", "mlp_in", "v_o"), samples: int | None = 32):
    """SmoothQuant baseline: scales from FP activation maxima, fused; no learning."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"migration strength alpha must be in [0, 1], got {alpha}")
    unknown = set(pairs) - set(PAIRS)
    if unknown:
        raise ValueError(f"unknown smoothing pairs {sorted(unknown)}; known: {', '.join(PAIRS)}")

    def smoothquant(captured: CapturedModel, ctx: PassContext):
        ids = ctx.need_calib("smoothquant")[:samples]
        dev = ctx.calib_device()
        x, rope = embed_inputs(captured.model, ids, dev), rope_tables(captured.model, ids.shape[1], dev)
        details = []
        for block in progress(captured.blocks, ctx, "smoothquant"):
            bm = BlockMath(block.module, captured.model.config)
            w = bm.weights(dev)
            scales = init_scales(bm, w, input_absmax(bm, w, x, rope), alpha, bm.smoothing_pairs(pairs))
            w = apply_smoothing(bm, w, scales)
            bm.write(w)
            x = batched(lambda xb: bm.forward(xb, rope, w)[0], x)
            details += [{"layer": block.index, "pair": p, "scale_min": round(float(s.min()), 6),
                         "scale_max": round(float(s.max()), 6)} for p, s in scales.items()]
        return captured, PassReport("smoothquant", {"alpha": alpha, "pairs": list(pairs), "samples": int(ids.shape[0])},
                                    details)

    return smoothquant

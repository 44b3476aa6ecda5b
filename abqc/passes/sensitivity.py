"""Sensitivity analysis: how much error each linear adds when it alone is quantized.

For every block (FP inputs, propagated through the FP model) and every quantized role, quantize that one
linear (RTN weights at its target pair, activations per token) and measure the block-output error
relative to the block's own contribution: |y_q - y_fp|^2 / |y_fp - x|^2 (so layers are comparable
despite the residual stream's growth). Also each whole layer quantized at once.
Invariant: the model is not modified. ctx.state["sensitivity"] = {"errors": {(layer, role): err},
"layer_errors": {...}, "compensation_layers": [...]}: the layers whose down_proj errs most (they get the
clip-learning pass's rank-1 compensation). With budget_bits set, the most sensitive linears are raised
(w -> 2w bits, at most 8) while the parameter-weighted mean weight bits stay within the budget, and the
overrides are appended to ctx.bits.
"""
from __future__ import annotations

from ..bits import ROLES, BitPair, BitSpec, Selector
from ..calib import BlockMath, batched, embed_inputs, progress, rope_tables
from ..capture import CapturedModel
from .base import PassContext, PassReport


def _rel_err(y, y_fp, x) -> float:
    return float((y - y_fp).pow(2).sum() / (y_fp - x).pow(2).sum().clamp(min=1e-30))


def make_sensitivity(samples: int = 8, seqlen: int = 512, compensate_top: int = 7, budget_bits: float | None = None):
    def sensitivity(captured: CapturedModel, ctx: PassContext):
        from .calibrate import quant_linear_fn
        ids = ctx.need_calib("sensitivity")[:samples, :seqlen]
        dev = ctx.calib_device()
        model = captured.model
        x, rope = embed_inputs(model, ids, dev), rope_tables(model, ids.shape[1], dev)
        errors, layer_errors, sizes = {}, {}, {}
        for block in progress(captured.blocks, ctx, "sensitivity"):
            bm = BlockMath(block.module, model.config)
            w = bm.weights(dev)
            y_fp = batched(lambda xb: bm.forward(xb, rope, w)[0], x)
            pairs = {r: p for r in ROLES if not (p := ctx.bits.for_linear(block.index, r)).is_fp}
            for role, pair in pairs.items():
                fn = quant_linear_fn({role: pair}, {}, ctx.act_symmetric, ctx.weight_symmetric)
                y = batched(lambda xb: bm.forward(xb, rope, w, fn)[0], x)
                errors[(block.index, role)] = _rel_err(y, y_fp, x)
                sizes[(block.index, role)] = w.linears[role][0].numel()
            if pairs:
                fn = quant_linear_fn(pairs, {}, ctx.act_symmetric, ctx.weight_symmetric)
                layer_errors[block.index] = _rel_err(batched(lambda xb: bm.forward(xb, rope, w, fn)[0], x), y_fp, x)
            x = y_fp
        downs = sorted((e, layer) for (layer, role), e in errors.items() if role == "down")
        comp = sorted(layer for _, layer in downs[::-1][:compensate_top])
        proposals = _raise_bits(ctx, errors, sizes, budget_bits) if budget_bits else []
        if proposals:
            extra = tuple((Selector(layer, layer, role), pair) for layer, role, pair in proposals)
            ctx.bits = BitSpec(ctx.bits.default, ctx.bits.overrides + extra)
        ctx.state["sensitivity"] = {"errors": errors, "layer_errors": layer_errors, "compensation_layers": comp}
        ranked = sorted(errors.items(), key=lambda kv: -kv[1])
        details = [{"layer": layer, "role": role, "bits": str(ctx.bits.for_linear(layer, role)),
                    "error": round(e, 6), "rank": i} for i, ((layer, role), e) in enumerate(ranked)]
        summary = {"samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                   "most_sensitive": [f"{layer}.{role}" for (layer, role), _ in ranked[:10]],
                   "layer_errors": {str(k): round(v, 6) for k, v in layer_errors.items()},
                   "compensation_layers": comp,
                   "raised": [f"{layer}.{role}={pair}" for layer, role, pair in proposals]}
        if budget_bits:
            summary["budget_bits"] = budget_bits
        return captured, PassReport("sensitivity", summary, details)

    return sensitivity


def _raise_bits(ctx: PassContext, errors: dict, sizes: dict, budget: float):
    """Greedy mixed precision: raise the most sensitive linears while the mean weight bits fit the budget."""
    total = sum(sizes.values())
    bits = {k: ctx.bits.for_linear(*k).w_bits for k in sizes}
    spent = sum(bits[k] * sizes[k] for k in sizes)
    out = []
    for k in sorted(errors, key=lambda k: -errors[k]):
        new = min(8, 2 * bits[k])
        cost = (new - bits[k]) * sizes[k]
        if new == bits[k] or (spent + cost) / total > budget:
            continue
        spent += cost
        old = ctx.bits.for_linear(*k)
        out.append((k[0], k[1], BitPair(new, old.a_bits, False, old.group_size)))
    return out


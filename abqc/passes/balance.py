"""Bit balance: 2-bit weights on the symmetric five-level grid {-2,-1,0,1,2} instead of {-2,-1,0,1}.

Five levels do not fit in two bit-planes. Like the reference implementation we store and multiply them
as three planes, i.e. as W3 work: the pass reports such layers as W2* with 3-plane storage, never as W2.
(An exact 2-plane encoding of five levels cannot exist: two planes hold four codes.)
Invariant: afterwards every non-balanced 2-bit pair in ctx.bits is balanced (w2 -> w2*); nothing else changes.
Run it before a quantization pass; `bits="w2*a8"` asks for the same thing directly.
"""
from __future__ import annotations

import dataclasses

from ..bits import BitPair, BitSpec
from ..capture import CapturedModel
from .base import PassContext, PassReport


def _balanced(pair: BitPair) -> BitPair:
    return dataclasses.replace(pair, balanced=True) if pair.w_bits == 2 and not pair.balanced else pair


def balance(captured: CapturedModel, ctx: PassContext):
    before = {(layer, role): ctx.bits.for_linear(layer, role) for layer, role, _ in captured.linears()}
    spec = ctx.bits
    ctx.bits = BitSpec(_balanced(spec.default), tuple((sel, _balanced(p)) for sel, p in spec.overrides))
    changed = [f"{layer}.{role}" for (layer, role), p in before.items() if ctx.bits.for_linear(layer, role) != p]
    summary = {"bits_before": str(spec), "bits_after": str(ctx.bits), "balanced_linears": len(changed),
               "storage": "3 bit-planes per balanced weight (reported as W2*)"}
    return captured, PassReport("balance", summary, [{"linear": c} for c in changed])

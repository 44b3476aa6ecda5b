"""Lowering: swap every quantized nn.Linear for a runtime module.

mode "real": QuantLinear (packed bit-planes, abqc::wpaq_linear / abqc::wq_linear ops).
mode "fake": FakeQuantLinear (dequantized float weights, fake-quantized activations).
Invariant: afterwards no annotated linear with a quantized pair is an nn.Linear; linears whose pair
is FP (w16a16) are left as they are.
"""
from __future__ import annotations

from collections import Counter

from ..capture import CapturedModel
from ..runtime.modules import FakeQuantLinear, QuantLinear
from .base import PassContext, PassReport


def make_lower(mode: str = "real"):
    if mode not in ("real", "fake"):
        raise ValueError("lower mode must be 'real' or 'fake'")

    def lower(captured: CapturedModel, ctx: PassContext):
        qweights = ctx.state.get("qweights")
        if qweights is None:
            raise RuntimeError("lower needs quantized weights: run a quantization pass (rtn) before it")
        bits, fp_bytes, q_bytes = Counter(), 0, 0
        for block in captured.blocks:
            for role in list(block.linears):
                if (block.index, role) not in qweights:
                    continue
                pair, qw = qweights[(block.index, role)]
                lin = block.linear(role)
                pre = getattr(lin, "pre", None)     # an online Hadamard (rotate pass) stays on the input
                if mode == "real":
                    new = QuantLinear.from_linear(lin, pair, qw, ctx.act_symmetric, pre)
                    q_bytes += (new.w_planes.numel() * 4 + new.w_scale.numel() * 2
                                + new.w_zero.numel() * (2 if pair.frac_zero else 1))
                else:
                    new = FakeQuantLinear(qw.dequantize().to(lin.weight.dtype), lin.bias, pair, ctx.act_symmetric,
                                          pre)
                fp_bytes += lin.weight.numel() * 2
                new.to(lin.weight.device)
                block.set_linear(role, new)
                bits[str(pair)] += 1
        summary = {"mode": mode, "linears_by_bits": dict(bits), "fp16_weight_bytes": fp_bytes}
        if mode == "real":
            # packed planes + fp16 scales + 8-bit zeros (16-bit where fractional), as a deployed artifact stores them
            summary["packed_weight_bytes"] = q_bytes
            summary["compression_vs_fp16"] = round(fp_bytes / max(q_bytes, 1), 3)
        return captured, PassReport(f"lower[{mode}]", summary)

    return lower

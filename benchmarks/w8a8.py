"""The W8A8 baseline of the benchmarks (SmoothQuant's arithmetic without smoothing): per-channel int8
weights, per-token int8 activations, both symmetric, one torch._int_mm; the quantize and dequantize steps
torch.compile'd on CUDA. e2e.py swaps a model's linears for it; kernels.py times one as a whole linear."""
from __future__ import annotations

import torch
from torch import nn


def quantize_rows(x: torch.Tensor):
    """Per-token symmetric int8: (codes int8 [M, K], scale float32 [M, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_acc(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype):
    return (acc.float() * a_scale * w_scale).to(dtype)


class W8A8Linear(nn.Module):
    """The W8A8 baseline (SmoothQuant's arithmetic, no smoothing): int8 weights per output channel, int8
    activations per token, both symmetric, one torch._int_mm (cuBLASLt int8) with an int32 accumulator."""

    def __init__(self, linear: nn.Linear, quant=quantize_rows, dequant=dequantize_acc):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        self.register_buffer("w_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.quant, self.dequant = quant, dequant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        q, s = self.quant(x2)
        m = q.shape[0]
        if q.is_cuda and m <= 16:
            q = nn.functional.pad(q, (0, 0, 0, 17 - m))     # cuBLASLt's int8 GEMM wants M > 16
        y = self.dequant(torch._int_mm(q, self.w_int8.t())[:m], s, self.w_scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def w8a8_kernels(device: torch.device, eager: bool):
    """(quant, dequant, how): torch.compile'd on CUDA (one fused kernel each) unless that fails or eager."""
    if eager or device.type != "cuda":
        return quantize_rows, dequantize_acc, "eager quantize/dequantize"
    try:
        quant = torch.compile(quantize_rows, dynamic=True)
        dequant = torch.compile(dequantize_acc, dynamic=True)
        _, s = quant(torch.randn(3, 64, device=device, dtype=torch.float16))
        dequant(torch.ones(3, 8, dtype=torch.int32, device=device), s, torch.ones(8, device=device), torch.float16)
        return quant, dequant, "quantize/dequantize fused by torch.compile"
    except Exception as e:  # no working Triton/compiler: the eager ops compute the same numbers
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return quantize_rows, dequantize_acc, f"eager quantize/dequantize (torch.compile failed: {type(e).__name__}: {first})"

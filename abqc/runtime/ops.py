"""torch.library ops of the abqc runtime.

  abqc::bitplane_mm   integer core: bit-planes x bit-planes -> int32 accumulators per K group
  abqc::wpaq_linear   W(p)A(q) linear: per-token activation quantization, bitplane_mm, epilogue
  abqc::wq_linear     weight-only (A16) linear: dequantize packed weights, float matmul
  abqc::tiled_linear  W(p)A(q) linear on the GPU kernels' tiled weight layout: what QuantLinear runs on
                      CUDA under torch.compile (an opaque op in the graph instead of a graph break)

The CPU kernels are the reference. A CUDA kernel registers itself on the same op names
(`torch.library.register_kernel`), so compiled modules dispatch by the tensors' device.

Epilogue (zero-point correction, no two's complement): with codes u and integer zero points z,
    sum_k (u_a - z_a)(u_w - z_w) = acc - z_w*S_a - z_a*S_w + K_g*z_a*z_w
where acc = sum u_a*u_w (the bit-plane product), S_a = sum u_a per token and group, S_w = sum u_w per
channel and group (precomputed at packing). The result is an exact integer per group; only the final
scaling by s_a * s_w is floating point.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import quant
from . import reference

_CPU_IMPL = {"name": "codes"}


@contextlib.contextmanager
def cpu_impl(name: str):
    """Pick the CPU integer core: "codes" (fast, exact) or "bitplane" (literal AND-popcount)."""
    if name not in ("codes", "bitplane"):
        raise ValueError("cpu_impl must be 'codes' or 'bitplane'")
    old, _CPU_IMPL["name"] = _CPU_IMPL["name"], name
    try:
        yield
    finally:
        _CPU_IMPL["name"] = old


def _check_planes(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int) -> None:
    if a_planes.dtype != torch.int32 or w_planes.dtype != torch.int32:
        raise TypeError("bit-planes must be int32 words")
    if a_planes.dim() != 3 or w_planes.dim() != 3 or a_planes.shape[2] != w_planes.shape[2]:
        raise ValueError(f"bit-plane shapes {tuple(a_planes.shape)} and {tuple(w_planes.shape)} do not "
                         "agree: expected [q, M, W] and [p, N, W] with the same word count W")
    if group_words <= 0 or w_planes.shape[2] % group_words:
        raise ValueError(f"group_words {group_words} must divide the word count {w_planes.shape[2]}")
    if (2 ** a_planes.shape[0] - 1) * (2 ** w_planes.shape[0] - 1) * group_words * 32 >= 2 ** 31:
        raise ValueError("K group too long for int32 accumulators at these bit widths; use smaller groups")


@torch.library.custom_op("abqc::bitplane_mm", mutates_args=(), device_types="cpu")
def bitplane_mm(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int) -> torch.Tensor:
    """int32 [M, N, G] = sum over p*q plane pairs of 2^(i+j) * popcount(A_j AND W_i), per K group."""
    _check_planes(a_planes, w_planes, group_words)
    fn = reference.accumulate_bitplane if _CPU_IMPL["name"] == "bitplane" else reference.accumulate_codes
    return fn(a_planes, w_planes, group_words).to(torch.int32)


@bitplane_mm.register_fake
def _(a_planes, w_planes, group_words):
    return a_planes.new_empty(a_planes.shape[1], w_planes.shape[1], w_planes.shape[2] // group_words)


def group_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(group_words, padded K) for a logical group size; per-channel groups round K up to 32."""
    if group_size % 32 == 0 and group_size < in_features:
        gs = group_size
    else:
        gs = -(-in_features // 32) * 32
    return gs // 32, -(-in_features // gs) * gs


def quantize_activation_padded(x2d: torch.Tensor, a_bits: int, group_size: int, in_features: int,
                               symmetric: bool):
    """Per-token codes padded to whole groups (float, exact ints) with sums [M, G], scale and zero [M, 1]."""
    u, s, z = quant.quantize_activation(x2d, a_bits, symmetric)
    gw, kp = group_layout(in_features, group_size)
    up = torch.nn.functional.pad(u, (0, kp - in_features)) if kp > in_features else u
    sums = up.view(up.shape[0], -1, gw * 32).sum(-1).to(torch.int64)
    return up, sums, s, z


def pack_activation(x2d: torch.Tensor, a_bits: int, group_size: int, in_features: int, symmetric: bool):
    """Per-token quantization + packing: (planes int32 [q, M, W], code sums int64 [M, G], scale, zero)."""
    up, sums, s, z = quantize_activation_padded(x2d, a_bits, group_size, in_features, symmetric)
    gw, _ = group_layout(in_features, group_size)
    return quant.pack_bitplanes(up.to(torch.int64), a_bits, pad_to=gw * 32), sums, s, z


def epilogue(acc, a_sum, a_scale, a_zero, w_sum, w_scale, w_zero, group_size, in_features, bias, out_dtype):
    """Zero-point correction in exact integers, then scaling. Shapes: acc [M,N,G], a_* [M,G]/[M,1], w_* [N,G];
    w_zero in fixed point (quant.zero_fixed): t * 2^F = (acc - za*sw) * 2^F - zw_F * (sa - k*za), exact."""
    gw, kp = group_layout(in_features, group_size)
    gs = gw * 32
    k_g = torch.full((acc.shape[2],), gs, dtype=torch.int64, device=acc.device)
    k_g[-1] = in_features - gs * (acc.shape[2] - 1)                      # real elements in the tail group
    za = a_zero.to(torch.int64).view(-1, 1, 1)
    zw = w_zero.to(torch.int64).unsqueeze(0)
    f = quant.ZERO_FRAC_BITS
    t = ((acc.to(torch.int64) - za * w_sum.to(torch.int64).unsqueeze(0)) * 2 ** f
         - zw * (a_sum.unsqueeze(1) - k_g * za))
    y = (t.to(torch.float64) * w_scale.to(torch.float64).unsqueeze(0)).sum(-1) * a_scale.to(torch.float64) / 2 ** f
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def grouped_linear_from_codes(up, a_sum, a_scale, a_zero, uw, w_scale, w_zero, w_sum, group_size, in_features,
                              bias, out_dtype):
    """epilogue(accumulate_from_codes(...)) for grouped weights without the [M, N, G] accumulators: the
    weight scales are folded into the codes (exact in float64: 8-bit codes times a float32 scale) and one
    float64 GEMM plus rank-G corrections give y. Equal to the integer path to float64 rounding (~1e-15
    relative; the same float32/float16 output but in rare last-bit ties) and ~10x faster on the CPU."""
    gw, kp = group_layout(in_features, group_size)
    gs, n = gw * 32, uw.shape[0]
    groups = kp // gs
    ws = w_scale.to(torch.float64)                                                 # [N, G]
    wq = (uw[:, :kp].to(torch.float64).view(n, groups, gs) * ws.unsqueeze(-1)).view(n, kp)
    k_g = torch.full((groups,), float(gs), dtype=torch.float64, device=up.device)
    k_g[-1] = in_features - gs * (groups - 1)                                       # real elements in the tail
    zw, za = quant.zero_of_fixed(w_zero), a_zero.to(torch.float64).view(-1, 1)
    corr = (a_sum.to(torch.float64) @ (ws * zw).T + za * (ws * w_sum.to(torch.float64)).sum(1)
            - za * (ws * k_g * zw).sum(1))
    y = (up.to(torch.float64) @ wq.T - corr) * a_scale.to(torch.float64).view(-1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


@torch.library.custom_op("abqc::wpaq_linear", mutates_args=())
def wpaq_linear(x: torch.Tensor, w_planes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                w_sum: torch.Tensor, bias: Optional[torch.Tensor], a_bits: int, group_size: int,
                in_features: int, act_symmetric: bool) -> torch.Tensor:
    """y[M, N] = dequant(quant_a(x) @ W^T) + bias, x [M, K] float, weights as packed bit-planes."""
    gw, kp = group_layout(in_features, group_size)
    if x.device.type == "cpu" and _CPU_IMPL["name"] == "codes":
        # same integers as bitplane_mm, without packing activations only to unpack them again
        up, a_sum, a_scale, a_zero = quantize_activation_padded(x, a_bits, group_size, in_features, act_symmetric)
        uw = quant.unpack_bitplanes(w_planes)
        if kp // (gw * 32) > 1:
            return grouped_linear_from_codes(up, a_sum, a_scale, a_zero, uw, w_scale, w_zero, w_sum, group_size,
                                             in_features, bias, x.dtype)
        acc = reference.accumulate_from_codes(up, uw, kp // (gw * 32), a_bits, w_planes.shape[0])
    else:
        a_planes, a_sum, a_scale, a_zero = pack_activation(x, a_bits, group_size, in_features, act_symmetric)
        acc = bitplane_mm(a_planes, w_planes, gw)
    return epilogue(acc, a_sum, a_scale, a_zero, w_sum, w_scale, w_zero, group_size, in_features, bias, x.dtype)


@wpaq_linear.register_fake
def _(x, w_planes, w_scale, w_zero, w_sum, bias, a_bits, group_size, in_features, act_symmetric):
    return x.new_empty(x.shape[0], w_planes.shape[1])


def dequantize_planes(w_planes, w_scale, w_zero, group_size, in_features):
    gw, kp = group_layout(in_features, group_size)
    n = w_planes.shape[1]
    u = quant.unpack_bitplanes(w_planes)[:, :kp].to(torch.float32).view(n, -1, gw * 32)
    w = (u - quant.zero_of_fixed(w_zero).to(torch.float32).unsqueeze(-1)) * w_scale.unsqueeze(-1)
    return w.view(n, -1)[:, :in_features]


@torch.library.custom_op("abqc::wq_linear", mutates_args=())
def wq_linear(x: torch.Tensor, w_planes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, in_features: int) -> torch.Tensor:
    """Weight-only linear: dequantize packed p-bit weights and multiply in x's dtype."""
    w = dequantize_planes(w_planes, w_scale, w_zero, group_size, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@wq_linear.register_fake
def _(x, w_planes, w_scale, w_zero, bias, group_size, in_features):
    return x.new_empty(x.shape[0], w_planes.shape[1])


def tile_string(tile) -> str | None:
    """A launch tile as abqc::tiled_linear takes it ("gemv,8,1,4"); None stays None."""
    return None if tile is None else ",".join(str(v) for v in tile)


@torch.library.custom_op("abqc::tiled_linear", mutates_args=())
def tiled_linear(x: torch.Tensor, w_tiled: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                 w_sum: torch.Tensor, bias: Optional[torch.Tensor], n: int, a_bits: int, group_words: int,
                 groups: int, in_features: int, act_symmetric: bool, tile: Optional[str]) -> torch.Tensor:
    """y [M, N] of x [M, K] and tiled weight planes (codegen.layout.tile_weights). CUDA: the planner's (or
    `tile`'s: "family,wk,tm[,channel tiles]") kernels, as runtime.cuda.bmma_linear; CPU: the reference on
    the untiled planes (the same integers). torch.compile keeps it as one node: the launches happen when the
    compiled graph runs, and the rest of the model fuses around it."""
    if x.is_cuda:   # dispatched here, not by register_kernel: a compiled graph may run before cuda.register()
        from . import cuda
        cuda.register()
        return cuda.bmma_linear(x.contiguous(), w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words,
                                groups, in_features, act_symmetric, tile=cuda.parse_tile(tile))
    from ..codegen.layout import untile_weights
    planes = untile_weights(w_tiled, n, groups * group_words, group_words)
    return wpaq_linear(x, planes, w_scale, w_zero, w_sum, bias, a_bits,
                       group_words * 32 if groups > 1 else in_features, in_features, act_symmetric)


@tiled_linear.register_fake
def _(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, groups, in_features, act_symmetric, tile):
    return x.new_empty(x.shape[0], n)

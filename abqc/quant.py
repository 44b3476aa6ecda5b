"""Quantizer math: the one place that maps floats to integer codes and codes to bit-planes.

Convention used everywhere (CPU reference, GPU kernels, export):
    value = scale * (u - zero),   u an unsigned integer code in [0, 2^planes - 1].
Asymmetric quantizers put the range [min(x, 0), max(x, 0)] on the grid, so zero is always a code in
[0, qmax]: integer corrections stay small and exact. Symmetric b-bit quantizers use zero = 2^(b-1)
and the grid [-2^(b-1), 2^(b-1)-1]; the bit-balanced 2-bit grid is symmetric {-2,-1,0,1,2}
(zero = 2, five codes, three planes). The fractional-zero weight grid (bit strings ending in "f") maps
the range [min(w), max(w)] itself, without widening it to 0, and keeps zero = -min / scale rounded to a
multiple of 2^-ZERO_FRAC_BITS (a scale plus a float offset per group, as GGUF's Q4_1 stores weights).

Weight zero points live in the runtime buffers (QuantLinear.w_zero) and kernels in fixed point,
zero * 2^ZERO_FRAC_BITS as int32 (zero_fixed), so the zero-point correction stays exact integer
arithmetic and scales by 2^-ZERO_FRAC_BITS once; for integer zeros every result is bit for bit what an
integer zero point gives. Activation zero points are integers.

Bit-planes: codes [R, K] are packed into int32 words [planes, R, ceil(K/pad)*pad/32]. Plane i holds
bit i of every code (plane 0 = least significant); element k lives in word k // 32 at bit k % 32
(LSB first). Padding elements are 0 in every plane, so they add nothing to an AND-popcount product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLIP_MIN = 1e-8  # smallest scale: an all-zero group would otherwise divide by zero
ZERO_FRAC_BITS = 8   # fraction bits of a weight zero point in fixed point (codegen/templates/common.cuh mirrors it)
# fractional-zero grid: |zero| <= 2^15 (a scale at least max|w| / 2^15), so zero * 2^8 is an integer
# below 2^23, exact in float32 as well as int32, and a constant group still reconstructs (its one code
# sits 2^15 steps from the offset)
FRAC_ZERO_RANGE = 2 ** 15


def zero_fixed(zero: torch.Tensor) -> torch.Tensor:
    """Weight zero points (float, multiples of 2^-ZERO_FRAC_BITS) -> the runtime's int32 fixed point."""
    return torch.round(zero.double() * 2 ** ZERO_FRAC_BITS).to(torch.int32)


def zero_of_fixed(w_zero: torch.Tensor) -> torch.Tensor:
    """Inverse of zero_fixed, as float64 (exact)."""
    return w_zero.double() / 2 ** ZERO_FRAC_BITS


def grid(bits: int, symmetric: bool = False, balanced: bool = False) -> tuple[int, int, int]:
    """(planes, qmax, fixed_zero or -1) of a quantizer. qmax is the largest code."""
    if balanced:
        if bits != 2:
            raise ValueError("bit balance exists only for 2-bit weights")
        return 3, 4, 2
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if symmetric:
        if bits == 1:
            raise ValueError("a symmetric 1-bit grid has no integer zero point; use asymmetric 1-bit")
        return bits, 2 ** bits - 1, 2 ** (bits - 1)
    return bits, 2 ** bits - 1, -1


def weight_grid_of(pair, weight_symmetric: bool = False) -> dict:
    """quantize_weight / fake_quant_weight_ste keyword arguments for a BitPair's weight grid."""
    if pair.frac_zero and weight_symmetric:
        raise ValueError(f"{pair} asks for fractional weight zero points, an asymmetric grid, but the weights are "
                         "to be quantized symmetrically (weight_symmetric=True): drop one of the two")
    return {"bits": pair.w_bits, "group_size": pair.group_size, "symmetric": weight_symmetric or pair.balanced,
            "balanced": pair.balanced, "frac_zero": pair.frac_zero}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c, correctly rounded on every device: CUDA divides by a Python (CPU) scalar as x * (1/c), which
    can be one ulp off, so c goes in as a tensor on x's device (the CPU result is unchanged)."""
    return x / torch.full((), float(c), dtype=x.dtype, device=x.device)


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, balanced: bool,
                round_fn=torch.round, frac_zero: bool = False):
    planes, qmax, fixed_zero = grid(bits, symmetric, balanced)
    if frac_zero and fixed_zero < 0:
        floor = torch.maximum(xmax.abs(), xmin.abs()).detach() / FRAC_ZERO_RANGE
        scale = torch.maximum(_div(xmax - xmin, qmax), floor).clamp(min=CLIP_MIN)
        step = 2 ** ZERO_FRAC_BITS
        zero = round_fn(-xmin / scale * step) / step
    elif fixed_zero >= 0:
        # symmetric: the negative half of the grid has fixed_zero levels below zero
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        pos_levels = qmax - fixed_zero if balanced else fixed_zero - 1
        scale = _div(absmax, max(pos_levels, 1)).clamp(min=CLIP_MIN)
        zero = torch.full_like(scale, float(fixed_zero))
    else:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        scale = _div(xmax - xmin, qmax).clamp(min=CLIP_MIN)
        zero = round_fn(-xmin / scale).clamp(0, qmax)
    return scale, zero, qmax


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                   round_fn=torch.round) -> torch.Tensor:
    """Integer codes u = clamp(round(x / scale + zero), 0, qmax), as float (exact integers). The zero's
    integer part is added after rounding, so for integer zeros this is round(x / scale) + zero exactly
    (the GPU packers' arithmetic); a fractional zero's fraction (exact in float32) goes in before."""
    whole = torch.floor(zero).detach()
    return (round_fn(x / scale + (zero - whole)) + whole).clamp(0, qmax)


@dataclass
class QuantizedWeight:
    """A weight matrix [N, K] as codes plus per-(channel, group) scale and zero point."""

    codes: torch.Tensor   # [N, K] int16 codes in [0, 2^planes - 1]
    scale: torch.Tensor   # [N, G] float32
    zero: torch.Tensor    # [N, G] float32: integers, or multiples of 2^-ZERO_FRAC_BITS (fractional grid)
    planes: int
    group_size: int       # K for per-channel

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.planes,
                               self.group_size)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group_size
        u = _pad_k(self.codes.float(), g).view(n, -1, g)
        w = (u - self.zero.float().unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.view(n, -1)[:, :k]


def _pad_k(x: torch.Tensor, multiple: int) -> torch.Tensor:
    k = x.shape[-1]
    kp = math.ceil(k / multiple) * multiple
    return x if kp == k else torch.nn.functional.pad(x, (0, kp - k))


def _group_range(wg: torch.Tensor, k: int):
    """Per-group (min, max) of weights viewed [N, G, g]; a padded tail group ignores its padding."""
    g = wg.shape[-1]
    if wg.shape[1] * g != k:
        mask = _pad_k(torch.ones(1, k, device=wg.device), g).view(1, -1, g).bool()
        return wg.masked_fill(~mask, math.inf).amin(-1), wg.masked_fill(~mask, -math.inf).amax(-1)
    return wg.amin(-1), wg.amax(-1)


def _weight_grid(w: torch.Tensor, bits: int, group_size, symmetric: bool, balanced: bool, clip_max, clip_min,
                 round_fn, frac_zero: bool = False):
    """Shared by quantize_weight and the trainable path: (codes [N,G,g] float, scale [N,G], zero [N,G], g)."""
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = group_size or k
    wg = _pad_k(w.float(), g).view(n, -1, g)
    xmin, xmax = _group_range(wg, k)
    # clipping shrinks the range toward its point nearest 0: 0 itself where the range holds it (LWC's
    # alpha*max, beta*min); a fractional-zero group entirely on one side of 0 keeps its end nearest 0,
    # so a shrunk range can never turn inside out
    centre = xmin.clamp(min=0) + xmax.clamp(max=0) if frac_zero else None
    if clip_max is not None:
        xmax = xmax * clip_max if centre is None else centre + (xmax - centre) * clip_max
    if clip_min is not None:
        xmin = xmin * clip_min if centre is None else centre + (xmin - centre) * clip_min
    scale, zero, qmax = _scale_zero(xmin, xmax, bits, symmetric, balanced, round_fn, frac_zero)
    codes = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), qmax, round_fn)
    return codes, scale, zero, g


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                    balanced: bool = False, clip_max: torch.Tensor | None = None,
                    clip_min: torch.Tensor | None = None, frac_zero: bool = False) -> QuantizedWeight:
    """Round-to-nearest weight quantization per output channel (group_size None) or per group along K.

    clip_max / clip_min ([N, G] or broadcastable factors in (0, 1]) shrink the range, as learned clipping does.
    frac_zero: the fractional-zero grid (asymmetric weights only; see the module docstring).
    """
    with torch.no_grad():
        codes, scale, zero, g = _weight_grid(w.detach(), bits, group_size, symmetric, balanced,
                                             clip_max, clip_min, torch.round, frac_zero)
    n, k = w.shape
    planes = grid(bits, symmetric, balanced)[0]
    return QuantizedWeight(codes.reshape(n, -1)[:, :k].to(torch.int16), scale, zero.float(), planes, g)


def fake_quant_weight_ste(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                          balanced: bool = False, clip_max: torch.Tensor | None = None,
                          clip_min: torch.Tensor | None = None, frac_zero: bool = False) -> torch.Tensor:
    """Differentiable quantize-dequantize (straight-through rounding) with the exact arithmetic of
    quantize_weight(...).dequantize(): what clipping and smoothing are trained through."""
    codes, scale, zero, g = _weight_grid(w, bits, group_size, symmetric, balanced, clip_max, clip_min, round_ste,
                                         frac_zero)
    n, k = w.shape
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, -1)[:, :k]


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                      balanced: bool = False, frac_zero: bool = False) -> torch.Tensor:
    return quantize_weight(w, bits, group_size, symmetric, balanced, frac_zero=frac_zero).dequantize().to(w.dtype)


def quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, round_fn=torch.round):
    """Per-token dynamic quantization over the last dim. Returns (codes float, scale [..., 1], zero [..., 1])."""
    xf = x.float()
    scale, zero, qmax = _scale_zero(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), bits, symmetric, False,
                                    round_fn)
    return quantize_codes(xf, scale, zero, qmax, round_fn), scale, zero


def fake_quant_activation(x: torch.Tensor, bits: int, symmetric: bool = False, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize per token; ste=True lets gradients through the rounding (calibration)."""
    if bits >= 16:
        return x
    u, s, z = quantize_activation(x, bits, symmetric, round_ste if ste else torch.round)
    return ((u - z) * s).to(x.dtype)


# ---------------------------------------------------------------- bit-planes

def pack_bitplanes(codes: torch.Tensor, planes: int, pad_to: int = 32) -> torch.Tensor:
    """Codes [R, K] (non-negative ints < 2^planes) -> int32 words [planes, R, Kp/32], Kp = K padded to pad_to.

    Packs on the codes' device (a model quantized on the GPU is packed there) with the same integer
    arithmetic everywhere, so the words are bit-identical on every device."""
    if pad_to % 32:
        raise ValueError("pad_to must be a multiple of 32")
    c = codes.to(torch.int64)
    if c.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, K], got shape {tuple(c.shape)}")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** planes):
        raise ValueError(f"codes must lie in [0, {2 ** planes - 1}] for {planes} planes")
    c = _pad_k(c, pad_to)
    r, kp = c.shape
    c = c.view(r, kp // 32, 32)
    shifts = torch.arange(32, dtype=torch.int64, device=c.device)
    out = torch.empty(planes, r, kp // 32, dtype=torch.int32, device=c.device)
    for i in range(planes):
        word = (((c >> i) & 1) << shifts).sum(-1)              # < 2^32, exact in int64
        out[i] = (word - ((word >> 31) << 32)).to(torch.int32)  # reinterpret as two's-complement int32
    return out


def unpack_bitplanes(words: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of pack_bitplanes: int32 [planes, R, W] -> int32 codes [R, k or 32*W] (same device)."""
    planes, r, w = words.shape
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    codes = torch.zeros(r, w, 32, dtype=torch.int32, device=words.device)
    for i in range(planes):
        codes |= ((words[i].unsqueeze(-1) >> shifts) & 1) << i   # arithmetic shift is fine: & 1
    codes = codes.view(r, w * 32)
    return codes if k is None else codes[:, :k]

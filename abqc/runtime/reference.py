"""CPU reference of the bit-plane integer product, written the way the GPU kernels work.

Activations [q planes, M, W words] and weights [p planes, N, W words] are stacked into one binary
matrix each ([q*M, W] and [p*N, W]); one binary GEMM (AND, then popcount, summed over words) gives
all p*q plane products at once, and a reduction applies the shifts 2^(i+j). With per-group weights
the product is kept per group of K: acc[m, n, g] = sum_{k in g} u_a[m, k] * u_w[n, k].

Two implementations with bit-identical results:
  "bitplane": literal AND + popcount on 32-bit words (the reference the GPU must match);
  "codes":    recombines the planes into codes and runs one exact float GEMM per group (float32 when
              every partial sum is below 2^24, float64 otherwise). Same integers, much faster on CPU,
              so compiled models evaluate at FP speed.
"""
from __future__ import annotations

import torch

from ..quant import unpack_bitplanes

_M1, _M2, _M4 = 0x55555555, 0x33333333, 0x0F0F0F0F


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Population count of the low 32 bits of int64 values (SWAR)."""
    x = x & 0xFFFFFFFF
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def binary_gemm(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """popcount(a[i] AND b[j]) summed over words: int32 words [R, W] x [C, W] -> int64 [R, C]."""
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    r, c, w = a64.shape[0], b64.shape[0], a64.shape[1]
    out = torch.empty(r, c, dtype=torch.int64, device=a.device)
    step = max(1, chunk_elems // max(1, c * w))
    for s in range(0, r, step):
        out[s:s + step] = popcount32(a64[s:s + step, None, :] & b64[None, :, :]).sum(-1)
    return out


def _shift_weights(q: int, p: int, device) -> torch.Tensor:
    j = torch.arange(q, device=device).view(q, 1, 1, 1)
    i = torch.arange(p, device=device).view(1, 1, p, 1)
    return (1 << (i + j)).to(torch.int64)


def accumulate_bitplane(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int) -> torch.Tensor:
    q, m, wa = a_planes.shape
    p, n, ww = w_planes.shape
    groups = ww // group_words
    a = a_planes.reshape(q * m, wa)
    b = w_planes.reshape(p * n, ww)
    out = torch.empty(m, n, groups, dtype=torch.int64, device=a_planes.device)
    shifts = _shift_weights(q, p, a_planes.device)
    for g in range(groups):
        sl = slice(g * group_words, (g + 1) * group_words)
        prod = binary_gemm(a[:, sl], b[:, sl]).view(q, m, p, n)   # all p*q plane products
        out[:, :, g] = (prod * shifts).sum((0, 2))
    return out


def exact_dtype(q: int, p: int, group_len: int) -> torch.dtype:
    """float32 if every partial sum of code products stays below 2^24 (exact), else float64."""
    return torch.float32 if (2 ** q - 1) * (2 ** p - 1) * group_len < 2 ** 24 else torch.float64


def accumulate_from_codes(ua: torch.Tensor, uw: torch.Tensor, groups: int, q: int, p: int) -> torch.Tensor:
    """Exact sum_k ua*uw per group from codes [M, Kp], [N, Kp] (Kp = groups * group length) -> int64 [M, N, G]."""
    m, kp = ua.shape
    n = uw.shape[0]
    gs = kp // groups
    dt = exact_dtype(q, p, gs)
    a = ua.to(dt).view(m, groups, gs).transpose(0, 1)     # [G, M, gs]
    b = uw.to(dt).view(n, groups, gs).permute(1, 2, 0)    # [G, gs, N]
    return torch.bmm(a, b).permute(1, 2, 0).round().to(torch.int64)


def accumulate_codes(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int) -> torch.Tensor:
    groups = w_planes.shape[2] // group_words
    return accumulate_from_codes(unpack_bitplanes(a_planes), unpack_bitplanes(w_planes), groups,
                                 a_planes.shape[0], w_planes.shape[0])

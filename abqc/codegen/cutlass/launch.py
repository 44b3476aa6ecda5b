"""Run the CUTLASS path on CUDA: pad K groups, launch the stacked b1 GEMM, then the reduction.

Data flow for a W(P)A(Q) linear, x [M, K] -> y [M, N]:
  1. activation planes [Q, M, G*gw] from the project's quant_pack kernel (abqc.runtime.cuda);
  2. pad_groups: every K group padded with zero bits to the GEMM's K alignment (128 bits for every
     catalogue instance: its 16-byte operand accesses), and zero rows appended up to a multiple of the
     C alignment (8; GemmKernel::can_implement needs the output's contiguous extent, Q*M here, aligned),
     giving rows [roundup(Q*M, 8), G*gwp]; weights are padded the same way once (prepare_weights, no
     extra rows: P*N is not a contiguous extent). Zero bits add nothing to an AND-popcount, and the code
     sums used by the zero-point correction are those of the unpadded codes, so padding never changes y;
  3. stacked_gemm: C[g] int32 [P*N, ldc] holds popcount(A_j AND W_i) of every plane pair at
     (i*N + n, j*M + m), all groups in one launch (split-K-parallel slices, one per group);
     ldc = the padded activation row count;
  4. reduce: y[m, n] = a_scale[m] * sum_g w_scale[n, g] * (sum_{i,j} 2^(i+j) C[g] - zero-point terms) + bias.
Invariant: C and the accumulators are exact integers equal to the CPU reference (abqc.runtime.ops);
only step 4's scaling is floating point (float32, the same group_term code as the bmma kernels).

Kernels compile with NVRTC through abqc.codegen.nvrtc and are loaded and launched with the driver-API
helpers of abqc.runtime.cuda, on torch's current stream.
"""
from __future__ import annotations

import ctypes

import torch

from ...errors import AbqcError
from ...runtime import cuda as rt
from ...runtime import ops
from ...runtime.reference import binary_gemm
from .config import CutlassConfig, GemmConfig, ReduceConfig


class _GemmArgs(ctypes.Structure):
    """Mirror of CutlassArgs in templates/gemm.cu."""
    _fields_ = [("act", ctypes.c_void_p), ("wt", ctypes.c_void_p), ("c", ctypes.c_void_p),
                ("act_rows", ctypes.c_int), ("wt_rows", ctypes.c_int), ("k_group", ctypes.c_int),
                ("groups", ctypes.c_int), ("lda", ctypes.c_longlong), ("ldb", ctypes.c_longlong),
                ("ldc", ctypes.c_longlong)]


class _ReduceArgs(ctypes.Structure):
    """Mirror of ReduceArgs in templates/reduce.cu (the bmma kernels' Args, then C and its stride)."""
    _fields_ = [("e", rt._Args), ("c", ctypes.c_void_p), ("ldc", ctypes.c_longlong)]


REDUCE_THREADS = 256


def padded_group_words(group_words: int, k_align_bits: int) -> int:
    """Words per K group after zero padding to the GEMM's K alignment."""
    align = k_align_bits // 32
    return -(-group_words // align) * align


def pad_groups(planes: torch.Tensor, group_words: int, padded_words: int, row_multiple: int = 1) -> torch.Tensor:
    """Bit-planes [X, R, G*gw] -> stacked rows int32 [roundup(X*R, row_multiple), G*gwp]: each group
    zero-padded to gwp words, zero rows appended after the last plane."""
    x, r, kw = planes.shape
    if kw % group_words:
        raise AbqcError(f"group_words {group_words} must divide the word count {kw}")
    rows = planes.reshape(x * r, kw // group_words, group_words)
    extra = -(x * r) % row_multiple
    if padded_words != group_words or extra:
        rows = torch.nn.functional.pad(rows, (0, padded_words - group_words, 0, 0, 0, extra))
    return rows.reshape(x * r + extra, -1).contiguous()


def prepare_weights(w_planes: torch.Tensor, group_words: int, cfg: GemmConfig | CutlassConfig) -> torch.Tensor:
    """Weight planes [P, N, G*gw] -> the GEMM's B operand [P*N, G*gwp] (pad once, reuse every call)."""
    gemm = cfg.gemm if isinstance(cfg, CutlassConfig) else cfg
    return pad_groups(w_planes, group_words, padded_group_words(group_words, gemm.k_align_bits))


def stacked_reference(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int, c_align: int = 8):
    """What stacked_gemm writes, computed on the CPU: int64 [G, P*N, ldc], columns >= Q*M zero."""
    q, m, kw = a_planes.shape
    p, n, _ = w_planes.shape
    groups = kw // group_words
    ldc = -(-q * m // c_align) * c_align
    out = torch.zeros(groups, p * n, ldc, dtype=torch.int64)
    a, w = a_planes.reshape(q * m, kw), w_planes.reshape(p * n, kw)
    for g in range(groups):
        sl = slice(g * group_words, (g + 1) * group_words)
        out[g, :, :q * m] = binary_gemm(w[:, sl], a[:, sl])
    return out


def recombine(c: torch.Tensor, q: int, m: int, p: int, n: int) -> torch.Tensor:
    """int [G, P*N, ldc] stacked products -> int64 [M, N, G] accumulators: sum_{i,j} 2^(i+j) C (reduce.cu's sum)."""
    g = c.shape[0]
    prod = c[:, :, :q * m].to(torch.int64).reshape(g, p, n, q, m)
    shift = 2 ** (torch.arange(p).view(1, p, 1, 1, 1) + torch.arange(q).view(1, 1, 1, q, 1))
    return (prod * shift.to(prod.device)).sum((1, 3)).permute(2, 1, 0)


def _check_rows(t: torch.Tensor, what: str, words_align: int) -> None:
    if t.dtype != torch.int32 or t.dim() != 2 or not t.is_contiguous():
        raise AbqcError(f"{what} must be contiguous int32 rows [rows, words], got {t.dtype} {tuple(t.shape)}: "
                        "build it with pad_groups / prepare_weights")
    if t.shape[1] % words_align or t.data_ptr() % 16:
        raise AbqcError(f"{what} rows must be 16-byte aligned ({words_align}-word multiples): pad with pad_groups")


def stacked_gemm(a_rows: torch.Tensor, w_rows: torch.Tensor, groups: int, cfg: GemmConfig) -> tuple:
    """One b1 AND-popc GEMM of stacked planes: a_rows [ldc, G*gwp] (Q*M rows, zero rows up to a multiple
    of cfg.c_align), w_rows [P*N, G*gwp] (int32, CUDA) -> (C int32 [G, P*N, ldc], ldc) with
    C[g, i*N + n, j*M + m] = popcount(A_j[m] AND W_i[n]) over group g."""
    rt.require_cuda("abqc.codegen.cutlass.stacked_gemm()", a_rows, w_rows)
    align = cfg.k_align_bits // 32
    _check_rows(a_rows, "activation rows", align)
    _check_rows(w_rows, "weight rows", align)
    kw = a_rows.shape[1]
    if w_rows.shape[1] != kw or kw % groups or (kw // groups) % align:
        raise AbqcError(f"activation rows ({kw} words) and weight rows ({w_rows.shape[1]} words) must share "
                        f"{groups} groups of a multiple of {align} words: pad both with pad_groups")
    arows, wrows = a_rows.shape[0], w_rows.shape[0]
    if arows % cfg.c_align:
        raise AbqcError(f"{arows} activation rows: the output's contiguous extent must be a multiple of "
                        f"{cfg.c_align}; pad with pad_groups(..., row_multiple={cfg.c_align})")
    ldc = arows
    dev = a_rows.device
    c = torch.empty(groups, wrows, ldc, dtype=torch.int32, device=dev)
    if arows == 0 or wrows == 0:
        return c, ldc
    args = _GemmArgs(a_rows.data_ptr(), w_rows.data_ptr(), c.data_ptr(), arows, wrows, kw // groups * 32, groups,
                     kw * 32, kw * 32, ldc)
    _, fn = rt.function(cfg, dev)
    grid = (-(-wrows // cfg.tile[0]), -(-arows // cfg.tile[1]), groups)
    rt._launch(fn, grid, cfg.threads, cfg.smem_bytes, args, dev)
    return c, ldc


def reduce(c: torch.Tensor, ldc: int, m: int, n: int, in_features: int, group_words: int, cfg: ReduceConfig,
           epi: dict | None = None, out_dtype=torch.float16) -> torch.Tensor:
    """Stacked products -> int32 accumulators [M, N, G] (epi None) or y [M, N] in out_dtype (epilogue
    inputs as abqc.runtime.cuda.epilogue_args builds them; group_words is the unpadded group length)."""
    groups = c.shape[0]
    dev = c.device
    integer = epi is None
    out = (torch.empty(m, n, groups, dtype=torch.int32, device=dev) if integer
           else torch.empty(m, n, dtype=out_dtype, device=dev))
    if m == 0 or n == 0:
        return out
    epi = epi or {}
    a_sum = epi.get("a_sum")
    e = rt._Args(None, None, m, n, in_features, groups, group_words, 0,
                 rt._ptr(epi.get("w_scale")), rt._ptr(epi.get("w_zero")), rt._ptr(epi.get("w_sum")),
                 rt._ptr(epi.get("a_scale")), rt._ptr(epi.get("a_zero")), rt._ptr(a_sum), rt._ptr(epi.get("bias")),
                 out.data_ptr(), 0 if integer else rt._DTYPE_CODE[out_dtype], 0,
                 a_sum.shape[1] if a_sum is not None and groups == 1 else 1)
    _, fn = rt.function(cfg, dev)
    rt._launch(fn, (-(-m * n // REDUCE_THREADS), 1), REDUCE_THREADS, 0, _ReduceArgs(e, c.data_ptr(), ldc), dev)
    return out


def _config(cfg: CutlassConfig | None, p: int, q: int, dev) -> CutlassConfig:
    if cfg is None:
        return CutlassConfig(p, q, arch=rt.arch_of(dev))
    if (cfg.w_planes, cfg.a_bits) != (p, q):
        raise AbqcError(f"CutlassConfig is for P={cfg.w_planes}, Q={cfg.a_bits} but the planes are P={p}, Q={q}")
    return cfg


def bitplane_mm(a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int,
                cfg: CutlassConfig | None = None) -> torch.Tensor:
    """abqc::bitplane_mm on the CUTLASS path: int32 [M, N, G], equal to the CPU reference bit for bit."""
    ops._check_planes(a_planes, w_planes, group_words)
    rt.require_cuda("abqc.codegen.cutlass.bitplane_mm()", a_planes, w_planes)
    (q, m, kw), (p, n, _) = a_planes.shape, w_planes.shape
    cfg = _config(cfg, p, q, a_planes.device)
    gwp = padded_group_words(group_words, cfg.gemm.k_align_bits)
    c, ldc = stacked_gemm(pad_groups(a_planes, group_words, gwp, cfg.gemm.c_align),
                          pad_groups(w_planes, group_words, gwp), kw // group_words, cfg.gemm)
    return reduce(c, ldc, m, n, kw * 32, group_words, cfg.reduce)


def linear(x: torch.Tensor, w_rows: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, w_planes: int, a_bits: int,
           group_words: int, groups: int, in_features: int, act_symmetric: bool,
           cfg: CutlassConfig | None = None) -> torch.Tensor:
    """y [M, N] = W(P)A(Q) linear with weights from prepare_weights: quant_pack, stacked GEMM, reduction.
    Arguments as abqc.runtime.cuda.bmma_linear (w_rows replaces the tiled weights)."""
    cfg = _config(cfg, w_planes, a_bits, x.device)
    packed = rt.quant_pack(x, a_bits, group_words, groups, in_features, act_symmetric)   # rejects bad dtypes
    gwp = padded_group_words(group_words, cfg.gemm.k_align_bits)
    if w_rows.shape != (w_planes * n, groups * gwp):
        raise AbqcError(f"weight rows {tuple(w_rows.shape)} do not match P={w_planes}, N={n}, {groups} groups "
                        f"of {gwp} words: build them with prepare_weights")
    c, ldc = stacked_gemm(pad_groups(packed[0], group_words, gwp, cfg.gemm.c_align), w_rows, groups, cfg.gemm)
    epi = rt.epilogue_args(w_scale, w_zero, w_sum, packed, bias)
    return reduce(c, ldc, x.shape[0], n, in_features, group_words, cfg.reduce, epi, x.dtype)

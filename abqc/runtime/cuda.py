"""CUDA implementations of the runtime ops, launched from Python through the CUDA driver API.

Kernels come from abqc.codegen (NVRTC, cached by config). `register()` attaches them to
abqc::bitplane_mm and abqc::wpaq_linear for CUDA tensors; QuantLinear calls `bmma_linear` with
weights it has tiled once. Launches go on torch's current stream, so CUDA graphs capture them.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading

import torch

from ..codegen import layout, planner
from ..codegen.config import (FP8_MAX_BITS, WGMMA8_TOKENS, WGMMA8_WARPGROUPS, WGMMA_WARPGROUPS, KernelConfig,
                              gemv_channel_tiles, gemv_max_tokens, gemv_tokens, token_tile_choices, wgmma8_smem_bytes,
                              wgmma_smem_bytes)
from ..errors import AbqcError, NoCudaError

_LOCK = threading.Lock()
_FUNCS: dict = {}
_REGISTERED = {"done": False}


class _Args(ctypes.Structure):
    _fields_ = [("wt", ctypes.c_void_p), ("act", ctypes.c_void_p),
                ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("G", ctypes.c_int),
                ("gw", ctypes.c_int), ("SG", ctypes.c_int),
                ("w_scale", ctypes.c_void_p), ("w_zero", ctypes.c_void_p), ("w_sum", ctypes.c_void_p),
                ("a_scale", ctypes.c_void_p), ("a_zero", ctypes.c_void_p), ("a_sum", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("mode", ctypes.c_int),
                ("stage_stride", ctypes.c_int), ("a_parts", ctypes.c_int),
                ("x", ctypes.c_void_p), ("x_dtype", ctypes.c_int), ("symmetric", ctypes.c_int)]


class _QArgs(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("in_dtype", ctypes.c_int),
                ("M", ctypes.c_int), ("K", ctypes.c_int), ("KW", ctypes.c_int), ("gw", ctypes.c_int),
                ("G", ctypes.c_int), ("symmetric", ctypes.c_int),
                ("planes", ctypes.c_void_p), ("sums", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("chunk_words", ctypes.c_int), ("nchunks", ctypes.c_int),
                ("codes", ctypes.c_void_p), ("mpad", ctypes.c_int), ("SGW", ctypes.c_int)]


class _UnpackArgs(ctypes.Structure):
    _fields_ = [("wt", ctypes.c_void_p), ("w8", ctypes.c_void_p), ("N", ctypes.c_int), ("K", ctypes.c_int),
                ("KP", ctypes.c_int), ("P", ctypes.c_int), ("S", ctypes.c_int), ("SG", ctypes.c_int),
                ("gw", ctypes.c_int)]


class _Int8GemmArgs(ctypes.Structure):
    _fields_ = [("wt", ctypes.c_void_p), ("a8", ctypes.c_void_p), ("acc", ctypes.c_void_p), ("M", ctypes.c_int),
                ("N", ctypes.c_int), ("KP", ctypes.c_int), ("P", ctypes.c_int), ("S", ctypes.c_int),
                ("ldacc", ctypes.c_int)]


class _Int8EpiArgs(ctypes.Structure):
    _fields_ = [("acc", ctypes.c_void_p), ("M", ctypes.c_int), ("N", ctypes.c_int), ("ldacc", ctypes.c_int),
                ("K", ctypes.c_int), ("ca", ctypes.c_int), ("cw", ctypes.c_int),
                ("w_scale", ctypes.c_void_p), ("w_zero", ctypes.c_void_p), ("w_sum", ctypes.c_void_p),
                ("a_scale", ctypes.c_void_p), ("a_zero", ctypes.c_void_p), ("a8_sum", ctypes.c_void_p),
                ("a_parts", ctypes.c_int), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("mode", ctypes.c_int)]


_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
MAX_SMEM = 160 * 1024     # dynamic shared memory a kernel may ask for (sm_80: 163 KB, sm_90: 227 KB)
SM90_MAX_SMEM = 227 * 1024   # sm_90a builds (the wgmma family's two stages) may ask for this much
STAGE_LIMIT = 96 * 1024   # activation rows staged in shared memory up to this size


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cuda.bindings.driver  # noqa: F401
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def require_cuda(what: str, *tensors: torch.Tensor) -> None:
    """Refuse a GPU entry point up front: no CUDA device, or inputs left on another device."""
    if tensors and all(t is None or t.is_cuda for t in tensors):
        return   # CUDA tensors exist, so a device does: the per-launch cost stays one attribute read
    if not torch.cuda.is_available():
        raise NoCudaError(f"no CUDA device: {what} needs an NVIDIA GPU (sm_80+) but torch sees none (CUDA build: "
                          f"{torch.version.cuda is not None}); keep the model and inputs on the CPU, where the "
                          "reference kernels compute the same integers")
    off = next((t.device for t in tensors if t is not None and not t.is_cuda), None)
    if off is not None:
        raise AbqcError(f"{what} takes CUDA tensors, got one on {off}: move the model and inputs with .cuda()")


@functools.lru_cache(maxsize=None)
def _config(family: str, a_bits: int, w_planes: int, token_tiles: int, arch: str, n_tiles: int = 1,
            w_bulk: bool = False, warpgroups: int = 1) -> KernelConfig:
    """KernelConfig, built (and validated) once per launch kind: launches run per layer per token."""
    return KernelConfig(family, a_bits, w_planes, token_tiles, arch, n_tiles, w_bulk, warpgroups)


_ARCH: dict = {}


def arch_of(device: torch.device) -> str:
    """The compile target of a CUDA device ("sm_90a" for Hopper); memoised per device index."""
    index = device.index if device.index is not None else (torch.cuda.current_device()
                                                           if torch.cuda.is_available() else None)
    arch = _ARCH.get(index)
    if arch is None:
        arch = _ARCH[index] = _arch(device)
    return arch


def _arch(device: torch.device) -> str:
    require_cuda("abqc.runtime.cuda.arch_of()")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise AbqcError(f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) lacks the m16n8k256 binary "
                        "tensor-core MMA abqc's kernels use: an Ampere (sm_80) or newer GPU is needed")
    return "sm_90a" if major == 9 else f"sm_{major}{minor}"


def _drv():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise NoCudaError("no CUDA driver bindings: the GPU runtime needs cuda-bindings, "
                          "`pip install -e \".[gpu]\"`") from e
    return driver


def _check(err, what):
    drv = _drv()
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver error in {what}: {err}")


def function(cfg: KernelConfig, device: torch.device):
    """The loaded CUfunction for cfg on device (compiled with NVRTC on first use)."""
    key = (cfg, device.index)
    f = _FUNCS.get(key)
    if f is not None:
        return f
    with _LOCK:
        if key in _FUNCS:
            return _FUNCS[key]
        from ..codegen.nvrtc import compile_cubin
        cubin = compile_cubin(cfg)
        drv = _drv()
        with torch.cuda.device(device):
            torch.cuda.current_stream().synchronize()   # makes torch's primary context current
            err, mod = drv.cuModuleLoadData(cubin)
            _check(err, f"loading {cfg.name}")
            err, fn = drv.cuModuleGetFunction(mod, cfg.name.encode())
            _check(err, f"finding {cfg.name}")
            err, = drv.cuFuncSetAttribute(
                fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                {"wgmma": SM90_MAX_SMEM, "wgmma8": SM90_MAX_SMEM - 1024}.get(getattr(cfg, "family", None), MAX_SMEM))
            _check(err, "raising the shared-memory limit")
        _FUNCS[key] = (mod, fn)
        return _FUNCS[key]


_PDL = {"off": os.environ.get("ABQC_PDL", "1") == "0", "why": "ABQC_PDL=0" if os.environ.get("ABQC_PDL") == "0" else ""}


def pdl_status() -> str:
    """'on', or why programmatic dependent launches are off (ABQC_PDL=0, not sm_90, a failed launch)."""
    return f"off ({_PDL['why']})" if _PDL["off"] else "on (sm_90)"


def set_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launches off (every launch from now on) or on (launches prepared from now
    on); benchmarks time both in one run."""
    _PDL["off"], _PDL["why"] = (not enabled), ("" if enabled else "turned off")


def _pdl_config(grid, block, smem):
    """A CUlaunchConfig with the programmatic-stream-serialization attribute (its stream set per launch)."""
    drv = _drv()
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid[0], grid[1], grid[2] if len(grid) > 2 else 1
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
    cfg.sharedMemBytes = smem
    cfg.attrs, cfg.numAttrs = [attr], 1
    return cfg


def _prepared(fn, grid, block, smem, args_struct, device, pdl: bool = False):
    """A no-argument callable launching fn with args_struct's contents at call time, on torch's current
    stream then (CUDA-graph capture runs on a side stream). pdl=True (a kernel that calls griddepcontrol.wait
    before it reads its predecessor's outputs, on sm_90): launched as a programmatic dependent, so it starts
    while the kernel before it (which releases it early) still runs; if the driver refuses such a launch,
    PDL is turned off for the process and the launch repeats as a plain one."""
    drv = _drv()
    params = (ctypes.c_void_p * 1)(ctypes.addressof(args_struct))
    z = grid[2] if len(grid) > 2 else 1      # a third grid dimension: the CUTLASS path's K groups
    gx, gy, addr, launch, stream_of, ok = grid[0], grid[1], ctypes.addressof(params), drv.cuLaunchKernel, \
        drv.CUstream, drv.CUresult.CUDA_SUCCESS
    current = torch.cuda.current_stream
    cfg = _pdl_config(grid, block, smem) if pdl and not _PDL["off"] and arch_of(device) == "sm_90a" else None

    def plain():
        err, = launch(fn, gx, gy, z, block, 1, 1, smem, stream_of(current(device).cuda_stream), addr, 0)
        if err != ok:
            raise RuntimeError(f"CUDA driver error in cuLaunchKernel: {err}")

    if cfg is None:
        plain.keep = (params, args_struct)     # the parameter buffer must outlive every launch
        return plain
    launch_ex = drv.cuLaunchKernelEx

    def run():
        if _PDL["off"]:
            return plain()
        cfg.hStream = stream_of(current(device).cuda_stream)
        try:
            err, = launch_ex(cfg, fn, addr, 0)
        except (TypeError, ValueError, RuntimeError) as e:   # bindings that marshal this call differently
            err = f"{type(e).__name__}: {e}"
        if err != ok:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"CUDA driver error in cuLaunchKernelEx (programmatic dependent launch) "
                                   f"during graph capture: {err}; set ABQC_PDL=0 to launch plainly")
            _PDL["off"], _PDL["why"] = True, f"cuLaunchKernelEx refused it: {err}"
            return plain()
    run.keep = (params, args_struct, cfg)
    return run


def _launch(fn, grid, block, smem, args_struct, device):
    _prepared(fn, grid, block, smem, args_struct, device)()


def _ptr(t):
    return None if t is None else t.data_ptr()


PACK_BLOCKS = 512   # packer blocks to aim for (~4 per SM): enough to spread a decode token over many SMs


def pack_chunks(group_words: int, groups: int, m: int = 1) -> tuple[int, int]:
    """(words per packer block, blocks per token). Every block reads its token's whole row (for the row's
    min/max), so a token gets only as many chunks as it takes to fill the GPU: decode rows are split into
    16-word chunks over many SMs, prefill rows (m >= PACK_BLOCKS) go whole to one block each (split into
    16-word chunks at M=2048, every row was re-read 8-22 times). Grouped rows split into whole groups, so
    every group's code sum stays inside one block."""
    kw = group_words * groups
    want = max(1, -(-PACK_BLOCKS // max(m, 1)))          # chunks per token that fill the GPU
    if groups == 1:
        cw = max(16, -(-kw // want))
    else:
        per = min(64, max(max(1, 16 // group_words), -(-groups // want)))   # quant_pack.cu: <= 64 group sums
        cw = group_words * per
    return cw, -(-kw // cw)


def quant_pack(x: torch.Tensor, a_bits: int, group_words: int, groups: int, in_features: int, symmetric: bool):
    """x [M, K] (f32/f16/bf16, CUDA) -> planes int32 [Q, M, G*gw], code sums int32, scale f32 [M], zero int32 [M].

    Sums are [M, G] for grouped layouts and [M, chunks] partials (add them up) when G == 1."""
    return _quantize(x, a_bits, group_words, groups, in_features, symmetric, None)


def quant_int8(x: torch.Tensor, a_bits: int, words: int, in_features: int, symmetric: bool, min_rows: int = 0):
    """x [M, K] -> the INT8 family's activations: centred codes int8 [max(M, min_rows), words*32] (u - 2^(Q-1),
    zero past K and in rows >= M), partial sums of those codes int32 [M, chunks], scale f32 [M], zero int32 [M]."""
    return _quantize(x, a_bits, words, 1, in_features, symmetric, min_rows)


def quant_u8(x: torch.Tensor, a_bits: int, words: int, in_features: int, symmetric: bool):
    """x [M, K] -> the wgmma8 family's activations: uncentred codes uint8 [8 * steps, roundup(M, 8), 32] in its
    K order (wgmma8.cu; steps = ceil(words / 8); bytes past K and rows >= M unspecified: they meet zero
    weights or unused columns), partial code sums int32 [M, chunks], scale f32 [M], zero int32 [M]."""
    return _quantize(x, a_bits, words, 1, in_features, symmetric, None, u8=True)


def _quantize(x, a_bits, group_words, groups, in_features, symmetric, int8_rows, u8=False):
    require_cuda("abqc.runtime.cuda.quant_pack()", x)
    x = x.contiguous()
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    m = x.shape[0]
    kw = groups * group_words
    cw, nchunks = pack_chunks(group_words, groups, m)
    dev = x.device
    mpad = -(-m // 8) * 8
    if u8:
        out = torch.empty(8 * layout.steps_per_group(kw), mpad, 32, dtype=torch.uint8, device=dev)
    elif int8_rows is None:
        out = torch.empty(a_bits, m, kw, dtype=torch.int32, device=dev)
    else:
        rows = max(m, int8_rows)
        out = (torch.zeros if rows > m else torch.empty)(rows, kw * 32, dtype=torch.int8, device=dev)
    sums = torch.empty(m, nchunks if groups == 1 else groups, dtype=torch.int32, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    zero = torch.empty(m, dtype=torch.int32, device=dev)
    if m == 0:
        return out, sums, scale, zero
    family = "quant_u8" if u8 else "quant_pack" if int8_rows is None else "quant_int8"
    _, fn = function(_config(family, a_bits, 0, 1, arch_of(dev)), dev)
    planes, codes = (out.data_ptr(), None) if family == "quant_pack" else (None, out.data_ptr())
    args = _QArgs(x.data_ptr(), _DTYPE_CODE[x.dtype], m, in_features, kw, group_words, groups, int(symmetric),
                  planes, sums.data_ptr(), scale.data_ptr(), zero.data_ptr(), cw, nchunks, codes, mpad,
                  layout.steps_per_group(kw))
    _launch(fn, (m, nchunks), 256, 0, args, dev)
    return out, sums, scale, zero


INT8_MIN_ROWS = 17   # torch._int_mm on CUDA needs more than 16 rows: fewer tokens are padded with zero rows


def int8_weights(w_tiled: torch.Tensor, n: int, in_features: int, words: int, row_multiple: int = 8) -> torch.Tensor:
    """Tiled per-channel weight planes -> centred int8 codes [roundup(N, row_multiple), words*32]
    (u - 2^(P-1); zero past K and in rows >= N, which pad N to torch._int_mm's multiple of 8)."""
    require_cuda("abqc.runtime.cuda.int8_weights()", w_tiled)
    nt, steps, p = w_tiled.shape[:3]
    sg = layout.steps_per_group(words)
    if steps != sg or nt * 16 < n:
        raise ValueError("the INT8 family serves per-channel weights: tiled weights do not match one K group")
    dev = w_tiled.device
    rows = -(-n // row_multiple) * row_multiple
    w8 = torch.empty(rows, words * 32, dtype=torch.int8, device=dev)
    if rows > n:
        w8[n:].zero_()
    total = nt * steps * 128
    _, fn = function(_config("int8_unpack", 8, 0, 1, arch_of(dev)), dev)
    _launch(fn, (-(-total // 256), 1), 256, 0,
            _UnpackArgs(w_tiled.data_ptr(), w8.data_ptr(), n, in_features, words * 32, p, steps, sg, words), dev)
    return w8


INT8_GEMM_WARPS, INT8_GEMM_TOKENS = 4, 32    # int8.cu's GEMM_WARPS and 8 * TMI: 64 channels x 32 tokens a block


def int8_gemm(a8: torch.Tensor, w_tiled: torch.Tensor, n: int, m: int | None = None) -> torch.Tensor:
    """acc [M, N] int32 = a8 [M, KP] (centred activation codes, zero past K) times the centred weight codes
    of the tiled planes, unpacked in shared memory (int8.cu INT8_GEMM): equal to
    torch._int_mm(a8, int8_weights(...).t()) without the int8 weights in memory. m: rows of a8 to use."""
    require_cuda("abqc.runtime.cuda.int8_gemm()", a8, w_tiled)
    nt, steps, p = w_tiled.shape[:3]
    m = a8.shape[0] if m is None else m
    if a8.dtype != torch.int8 or not a8.is_contiguous() or a8.shape[1] % 32 or nt * 16 < n or m > a8.shape[0]:
        raise ValueError("int8_gemm needs contiguous int8 codes [M, 32*words] and tiled weights covering N")
    if steps * 256 < a8.shape[1]:
        raise ValueError("tiled weights are shorter along K than the activation codes")
    acc = torch.empty(m, n, dtype=torch.int32, device=a8.device)
    if m == 0 or n == 0:
        return acc
    _, fn = function(_config("int8_gemm", 8, 0, 1, arch_of(a8.device)), a8.device)
    _launch(fn, (-(-nt // INT8_GEMM_WARPS), -(-m // INT8_GEMM_TOKENS)), 32 * INT8_GEMM_WARPS, 0,
            _Int8GemmArgs(w_tiled.data_ptr(), a8.data_ptr(), acc.data_ptr(), m, n, a8.shape[1], p, steps, n),
            a8.device)
    return acc


def wgmma8(w_tiled: torch.Tensor, u8_codes: torch.Tensor, m: int, n: int, in_features: int, words: int, mode: int,
           epi: dict | None = None, tile: tuple = ("wgmma8", 2, 16), out_dtype=torch.float16) -> torch.Tensor:
    """The wgmma8 family (sm_90a, per-channel): Hopper INT8 warpgroup MMA of quant_u8's byte codes with the
    weights' bit-planes unpacked in registers. mode 0: int32 acc [M, N, 1] = sum_k u_a * u_w (the bit-plane
    kernels' integer); otherwise y [M, N] in out_dtype through their epilogue (epi: epilogue_args).
    tile = ("wgmma8", consumer warpgroups, tokens / 8)."""
    require_cuda("abqc.runtime.cuda.wgmma8()", w_tiled, u8_codes)
    nt, p, sg = _tiled_shape(w_tiled, n, 1, words)
    dev = u8_codes.device
    if u8_codes.dtype != torch.uint8 or tuple(u8_codes.shape) != (8 * sg, -(-m // 8) * 8, 32):
        raise ValueError(f"wgmma8 takes quant_u8's codes uint8 [{8 * sg}, {-(-m // 8) * 8}, 32] for M={m}, "
                         f"got {u8_codes.dtype} {tuple(u8_codes.shape)}")
    out = (torch.empty(m, n, 1, dtype=torch.int32, device=dev) if mode == 0
           else torch.empty(m, n, dtype=out_dtype, device=dev))
    if m == 0 or n == 0:
        return out
    epi = epi or {}
    a_sum = epi.get("a_sum")
    args = _Args(w_tiled.data_ptr(), u8_codes.data_ptr(), m, n, in_features, 1, words, sg,
                 _ptr(epi.get("w_scale")), _ptr(epi.get("w_zero")), _ptr(epi.get("w_sum")),
                 _ptr(epi.get("a_scale")), _ptr(epi.get("a_zero")), _ptr(a_sum),
                 _ptr(epi.get("bias")), out.data_ptr(), mode if mode == 0 else _DTYPE_CODE[out_dtype], 0,
                 a_sum.shape[1] if a_sum is not None else 1)
    _wgmma8_launch(args, m, p, nt, tile, dev)()
    return out


def _wgmma8_launch(args: _Args, m: int, p: int, nt: int, tile: tuple, dev):
    """Check a wgmma8 launch and prepare it (grid: blocks of 64*warpgroups channels x token tiles of 8*tm)."""
    _, wgs, tm = tile[:3]
    arch = arch_of(dev)
    if arch != "sm_90a":
        raise ValueError(f"the wgmma8 family needs sm_90a (Hopper warpgroup MMA), not {arch}: use int8 or bmma")
    if wgs not in WGMMA8_WARPGROUPS or 8 * tm not in WGMMA8_TOKENS:
        raise ValueError(f"wgmma8 tile {tile}: warpgroups in {WGMMA8_WARPGROUPS}, tokens / 8 in "
                         f"{tuple(t // 8 for t in WGMMA8_TOKENS)}")
    _, fn = function(_config("wgmma8", 8, p, tm, arch, warpgroups=wgs), dev)
    grid = (-(-nt // (4 * wgs)), -(-m // (8 * tm)))
    return _prepared(fn, grid, 128 * wgs + 32, wgmma8_smem_bytes(p, 8 * tm, wgs), args, dev, pdl=True)


def wgmma8_linear(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                  words: int, in_features: int, act_symmetric: bool, tile: tuple, integer: bool = False):
    """quant_u8 then the wgmma8 GEMM with the fused epilogue: y [M, N] in x's dtype (integer=True: the int32
    accumulators [M, N, 1])."""
    m = x.shape[0]
    packed = quant_u8(x, a_bits, words, in_features, act_symmetric)
    epi = epilogue_args(w_scale, w_zero, w_sum, packed, bias)
    return wgmma8(w_tiled, packed[0], m, n, in_features, words, 0 if integer else 1, epi, tile, x.dtype)


FP8_ROWS = 16      # torch._scaled_mm's operands: rows of both padded to a multiple of this


def fp8_applicable(p: int, q: int, device: torch.device) -> bool:
    """Whether the FP8 family can serve W(p)A(q) here: both sides' centred codes exact in e4m3, FP8 tensor
    cores (sm_89+) and torch._scaled_mm present."""
    return (p <= FP8_MAX_BITS and q <= FP8_MAX_BITS and hasattr(torch, "float8_e4m3fn")
            and hasattr(torch, "_scaled_mm") and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_gemm(a8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    """float32 [Ma, Nw] = a8 @ w8^T for centred int8 codes of at most FP8_MAX_BITS bits, as float8_e4m3fn on
    torch._scaled_mm (unit scales, float32 out, no fast accumulation). Every product and partial sum is an
    integer far below 2^24, so float32 holds the exact sum wherever the tensor cores accumulate in full
    float32 (checked bit for bit against torch._int_mm by tests/test_int8_family.py on the GPU).
    Rows of a8 and w8: multiples of FP8_ROWS; columns: a multiple of 16 (zero past K on at least one side)."""
    if a8.shape[0] % FP8_ROWS or w8.shape[0] % FP8_ROWS or a8.shape[1] % 16 or a8.shape[1] != w8.shape[1]:
        raise ValueError(f"fp8_gemm needs int8 codes [Ma, K] and [Nw, K] with Ma, Nw multiples of {FP8_ROWS} and "
                         f"K of 16, got {tuple(a8.shape)} and {tuple(w8.shape)}")
    one = torch.ones((), dtype=torch.float32, device=a8.device)
    return torch._scaled_mm(a8.to(torch.float8_e4m3fn), w8.to(torch.float8_e4m3fn).t(), scale_a=one, scale_b=one,
                            out_dtype=torch.float32, use_fast_accum=False)


def int8_linear(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                words: int, in_features: int, act_symmetric: bool, integer: bool = False,
                gemm: str = "int8") -> torch.Tensor:
    """The INT8 family: y [M, N] (or, integer=True, the int32 accumulators sum_k u_a * u_w [M, N, 1] that the
    bit-plane kernels give) from centred int8 codes of both sides and one integer GEMM, then an epilogue
    that undoes the centring. Per-channel weights only. gemm, the planner family: "int8" (torch._int_mm on
    the INT8 tensor cores, weights unpacked to int8 on every call, no int8 copy kept), "int8k" (abqc's own
    INT8 GEMM that unpacks the bit-planes in shared memory: int8_gemm) or "fp8" (the same codes as
    float8_e4m3fn on torch._scaled_mm, exact for p, q <= FP8_MAX_BITS: fp8_gemm)."""
    if gemm not in INT8_FAMILIES:
        raise ValueError(f"gemm must be one of {INT8_FAMILIES}, got {gemm!r}")
    m, dev, p = x.shape[0], x.device, w_tiled.shape[2]
    if gemm == "fp8" and not fp8_applicable(p, a_bits, dev):
        raise ValueError(f"the fp8 family serves W{p}A{a_bits} only with p, q <= {FP8_MAX_BITS} on an sm_89+ GPU")
    rows = -(-max(m, 1) // FP8_ROWS) * FP8_ROWS if gemm == "fp8" else INT8_MIN_ROWS
    a8, a_sum, a_scale, a_zero = quant_int8(x, a_bits, words, in_features, act_symmetric, rows)
    if gemm == "int8k":
        acc = int8_gemm(a8, w_tiled, n, m)
    elif gemm == "fp8":
        # float32 holding exact integers -> int32 for the INT8 epilogue (the GPU-verified kernel, unchanged)
        acc = fp8_gemm(a8, int8_weights(w_tiled, n, in_features, words, FP8_ROWS)).round().to(torch.int32)
    else:
        acc = torch._int_mm(a8, int8_weights(w_tiled, n, in_features, words).t())
    out = (torch.empty(m, n, 1, dtype=torch.int32, device=dev) if integer
           else torch.empty(m, n, dtype=x.dtype, device=dev))
    if m == 0 or n == 0:
        return out
    args = _Int8EpiArgs(acc.data_ptr(), m, n, acc.shape[1], in_features, 1 << (a_bits - 1), 1 << (p - 1),
                        _ptr(w_scale), _ptr(w_zero), _ptr(w_sum), _ptr(a_scale), _ptr(a_zero), _ptr(a_sum),
                        a_sum.shape[1], _ptr(bias), out.data_ptr(), 0 if integer else _DTYPE_CODE[x.dtype])
    _, fn = function(_config("int8_epilogue", 8, 0, 1, arch_of(dev)), dev)
    _launch(fn, (-(-m * n // 256), 1), 256, 0, args, dev)
    return out


# Tuned on the H200 (benchmarks/results/kernels.md), the INT8 family beat the bit-plane GEMM at every
# M >= 128 for all seven bit pairs and three LLaMA-7B shapes (1.4-10x), so the untuned default takes it there.
INT8_DEFAULT_MIN_M = 128


def default_tile(m: int, p: int, q: int, n: int, k_steps: int, groups: int = 1) -> tuple:
    """(family, warps splitting K, token tiles) used when no tuned plan exists. Per-channel decode
    (the GEMV build exists for m tokens) takes the GEMV family, whose MMA columns are activation
    planes, after the packer ("gemvq", quantizing in every block, measured 1.5-3x slower on the H200 at
    LLaMA-7B shapes, is left to tuning); per-channel prefill (m >= INT8_DEFAULT_MIN_M) the INT8 family;
    otherwise the GEMM family, reusing each weight fragment across more tokens as m grows."""
    mt = gemv_tokens(m, p, q) if groups == 1 else None
    if mt:
        return "gemv", 8 if k_steps >= 8 else 2, mt, max(gemv_channel_tiles(p, q, mt))
    if groups == 1 and m >= INT8_DEFAULT_MIN_M:
        return ("int8", 0, 0)
    tm = max(t for t in token_tile_choices(p, q) if t * 8 <= max(8, m))
    return "bmma", 4 if k_steps >= 8 else 2, tm


_TILES: dict = {}   # launch_tile memo: it runs on every launch, so a repeat costs one dict lookup


def launch_tile(m: int, p: int, q: int, n: int, kw: int, group_words: int, arch: str) -> tuple:
    """The tile a launch without an explicit one uses: the planner's tuned choice for this (shape, bits,
    M bucket, arch) from plans.json, else default_tile. Memoised per cache folder and plans generation."""
    key = (os.environ.get("ABQC_CACHE"), planner.generation(), m, p, q, n, kw, group_words, arch)
    tile = _TILES.get(key)
    if tile is None:
        groups = kw // group_words
        tile = _TILES[key] = (planner.cached_tile(n, kw, group_words, p, q, m, arch)
                              or default_tile(m, p, q, n, groups * layout.steps_per_group(group_words), groups))
    return tile


PACKED_FAMILIES = ("gemv", "gemvt", "bmma", "wgmma")   # bit-plane kernels fed by the activation packer (an online Hadamard can fuse into it)
GEMVQ_FAMILIES = ("gemvq", "gemvqt")         # the GEMV quantizing its activations in-kernel (one launch)
BULK_FAMILIES = ("gemvt", "gemvqt")          # GEMV builds streaming weights by bulk copies (sm_90a)
INT8_FAMILIES = ("int8", "int8k", "fp8")   # centred codes of both sides and one integer GEMM (int8_linear)
BYTE_FAMILIES = ("wgmma8",)   # byte codes of the activations (quant_u8), weights unpacked in registers (sm_90a)
TILE_FAMILIES = PACKED_FAMILIES + GEMVQ_FAMILIES + INT8_FAMILIES + BYTE_FAMILIES


def parse_tile(text: str | None) -> tuple | None:
    """The inverse of ops.tile_string; a malformed string is a ValueError naming the expected form."""
    if text is None:
        return None
    family, *nums = text.split(",")
    try:
        values = tuple(int(v) for v in nums)
    except ValueError:
        values = None
    if family not in TILE_FAMILIES or values is None or not values:
        raise ValueError(f"launch tile {text!r}: expected 'family,wk,tm[,channel tiles]' with family one of "
                         f"{', '.join(TILE_FAMILIES)} and integers after it, e.g. 'gemv,8,1,4'")
    return (family, *values)


def _tiled_shape(w_tiled: torch.Tensor, n: int, groups: int, group_words: int) -> tuple[int, int, int]:
    """(channel tiles, weight planes, steps per group) of tiled weights, checked against N and the K layout."""
    nt, steps, p = w_tiled.shape[:3]
    sg = layout.steps_per_group(group_words)
    if steps != groups * sg or nt * 16 < n:
        raise ValueError("tiled weights do not match the activation planes' K layout")
    return nt, p, sg


def bmma(w_tiled: torch.Tensor, a_planes: torch.Tensor, n: int, in_features: int, group_words: int,
         mode: int, epi: dict | None = None, tile: tuple | None = None, out_dtype=torch.float16):
    """Launch a bit-plane kernel. mode 0: int32 acc [M, N, G]; otherwise y [M, N] in out_dtype.
    tile = (family, warps splitting K, token tiles[, channel tiles per warp (gemv)]): "bmma" GEMM,
    "gemv" / "gemvt" (per-channel, few tokens; t: weights by bulk copies, sm_90a) or ("wgmma",
    WGMMA_WARPGROUPS, tokens / 8) (per-channel, Hopper warpgroup MMA, sm_90a); None: launch_tile (tuned
    plan, else default)."""
    require_cuda("abqc.runtime.cuda.bmma()", w_tiled, a_planes)
    q, m, kw = a_planes.shape
    groups = kw // group_words
    nt, p, sg = _tiled_shape(w_tiled, n, groups, group_words)
    dev = a_planes.device
    family, wk, tm, *rest = tile or launch_tile(m, p, q, n, kw, group_words, arch_of(dev))
    # bmma() takes packed planes: the quantizing GEMV builds read them like their packer-fed twins
    family = {"gemvq": "gemv", "gemvqt": "gemvt"}.get(family, family)
    if family not in PACKED_FAMILIES:
        raise ValueError(f"bmma() launches the bit-plane families {', '.join(PACKED_FAMILIES)}, not {family!r} "
                         "(bmma_linear does)")
    out = (torch.empty(m, n, groups, dtype=torch.int32, device=dev) if mode == 0
           else torch.empty(m, n, dtype=out_dtype, device=dev))
    if m == 0 or n == 0:
        return out
    epi = epi or {}
    a_sum = epi.get("a_sum")
    args = _Args(w_tiled.data_ptr(), a_planes.data_ptr(), m, n, in_features, groups, group_words, sg,
                 _ptr(epi.get("w_scale")), _ptr(epi.get("w_zero")), _ptr(epi.get("w_sum")),
                 _ptr(epi.get("a_scale")), _ptr(epi.get("a_zero")), _ptr(a_sum),
                 _ptr(epi.get("bias")), out.data_ptr(), mode if mode == 0 else _DTYPE_CODE[out_dtype], 0,
                 a_sum.shape[1] if a_sum is not None and groups == 1 else 1)
    _plane_launch(args, (family, wk, tm, *rest), m, q, p, nt, groups, kw, dev)()
    return out


def _plane_launch(args: _Args, tile: tuple, m: int, q: int, p: int, nt: int, groups: int, kw: int, dev):
    """Check and prepare one launch of a packer-fed bit-plane family (PACKED_FAMILIES): a no-argument callable
    launching it with args' contents at call time (bmma() fills args once; PackedLauncher per call)."""
    family, wk, tm, *rest = tile
    stride = _stage_stride(kw)
    if family in ("gemv", "gemvt"):
        return _gemv_launch(args, m, q, p, nt, groups, (wk, tm, rest[0] if rest else 1), stride, dev,
                            bulk=family == "gemvt")
    if family == "wgmma":
        return _wgmma_launch(args, m, q, p, nt, groups, wk, tm, dev)
    _, fn = function(_config("bmma", q, p, tm, arch_of(dev)), dev)
    red = wk * 32 * tm * 4 * 4
    stage = q * min(8 * tm, m) * stride * 4
    if red + stage <= min(STAGE_LIMIT, MAX_SMEM):
        args.stage_stride = stride
    else:
        args.stage_stride, stage = 0, 0
    return _prepared(fn, (nt, -(-m // (8 * tm))), wk * 32, red + stage, args, dev)


def _wgmma_launch(args: _Args, m: int, q: int, p: int, nt: int, groups: int, wk: int, tm: int, dev):
    """Check a wgmma launch and prepare it (grid: 64-channel warpgroup tiles x token tiles of 8*tm)."""
    if groups != 1:
        raise ValueError("the wgmma family serves per-channel weights only")
    arch = arch_of(dev)
    if arch != "sm_90a":
        raise ValueError(f"the wgmma family needs sm_90a (Hopper warpgroup MMA), not {arch}: use bmma")
    if wk != WGMMA_WARPGROUPS:
        raise ValueError(f"wgmma tiles are built for {WGMMA_WARPGROUPS} warpgroups per block, not {wk}")
    cfg = _config("wgmma", q, p, tm, arch)    # validates tm
    _, fn = function(cfg, dev)
    grid = (-(-nt // (4 * WGMMA_WARPGROUPS)), -(-m // (8 * tm)))
    return _prepared(fn, grid, 128 * WGMMA_WARPGROUPS, wgmma_smem_bytes(p, q, 8 * tm), args, dev)


def _stage_stride(kw: int) -> int:
    return kw + ((4 - kw) % 32)       # stride = 4 (mod 32): the 8 rows x 4 words a warp reads hit 32 banks


GEMVQ_XSTAGE_BYTES = 64 * 1024   # gemv.cu's XSTAGE_BYTES: gemvq copies x rows up to this size to shared memory


def _gemv_launch(args: _Args, m: int, q: int, p: int, nt: int, groups: int, tile: tuple, stride: int, dev,
                 x_bytes: int = 0, bulk: bool = False):
    """Check a gemv launch and prepare it: a no-argument callable launching it with args' current contents.
    x_bytes: gemvq's input size in bytes (its rows share the K-split partials' shared memory when they fit).
    bulk: the build whose weights stream into shared memory by bulk copies (sm_90a; the whole block's
    weights must fit there next to the staged activations)."""
    wk, tm, ntw = tile
    if groups != 1 or m > tm or tm not in gemv_max_tokens(p, q):
        raise ValueError(f"the gemv family serves per-channel weights and at most {tm} tokens")
    arch = arch_of(dev)
    if bulk and arch != "sm_90a":
        raise ValueError(f"the bulk-copy GEMV builds (gemvt, gemvqt) need sm_90a (Hopper), not {arch}: use gemv")
    red = wk * 16 * ntw * (-(-tm * q // 8) * 8) * 4
    staged = x_bytes if 0 < x_bytes <= GEMVQ_XSTAGE_BYTES and (x_bytes // m) % 16 == 0 else 0   # 16-byte rows
    weights = ntw * args.G * args.SG * p * 512 if bulk else 0
    smem = weights + m * q * stride * 4 + max(red, staged)
    if smem > MAX_SMEM:
        raise ValueError(f"{'gemvt' if bulk else 'gemv'} needs {smem} bytes of shared memory for this shape "
                         f"(at most {MAX_SMEM}); use {'gemv or ' if bulk else ''}the bmma family")
    args.stage_stride = stride
    _, fn = function(_config("gemv", q, p, tm, arch, ntw, bulk), dev)
    return _prepared(fn, (-(-nt // ntw), 1), wk * 32, smem, args, dev, pdl=True)


class GemvqLauncher:
    """One "gemvq" launch with everything prepared except the activation and output pointers: the eager
    decode path of a layer (HF generate() runs eagerly) costs one allocation and one cuLaunchKernel.
    Built for one (M, dtype, device); it holds references to the tensors it points at."""

    def __init__(self, x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                 words: int, in_features: int, act_symmetric: bool, tile: tuple, integer: bool = False):
        require_cuda("abqc.runtime.cuda.gemv_quant()", x, w_tiled)
        if x.dtype not in _DTYPE_CODE:
            raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
        nt, steps, p = w_tiled.shape[:3]
        if steps != layout.steps_per_group(words) or nt * 16 < n:
            raise ValueError("the gemvq family serves per-channel weights: tiled weights do not match one K group")
        self.m, self.n, self.dev, self.integer = x.shape[0], n, x.device, integer
        self.dtype = torch.int32 if integer else x.dtype
        self.keep = (w_tiled, w_scale, w_zero, w_sum, bias)
        self.args = _Args(w_tiled.data_ptr(), None, self.m, n, in_features, 1, words, steps,
                          _ptr(w_scale), _ptr(w_zero), _ptr(w_sum), None, None, None, _ptr(bias), None,
                          0 if integer else _DTYPE_CODE[x.dtype], 0, 1, None, _DTYPE_CODE[x.dtype],
                          int(act_symmetric))
        self.launch = None
        if self.m and n:
            self.launch = _gemv_launch(self.args, self.m, a_bits, p, nt, 1, tuple(tile[1:4]), _stage_stride(words),
                                       self.dev, x.numel() * x.element_size(), bulk=tile[0] in BULK_FAMILIES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.m, self.n, 1) if self.integer else (self.m, self.n), dtype=self.dtype,
                          device=self.dev)
        if self.launch is not None:
            self.args.x, self.args.out = x.data_ptr(), out.data_ptr()
            self.launch()       # the driver copies the parameters at launch: the struct may change afterwards
        return out


class PackedLauncher:
    """The activation packer and one packer-fed bit-plane kernel (PACKED_FAMILIES: gemv at decode) prepared
    once for (M, dtype, device): an eager call costs two allocations and two cuLaunchKernel, where
    bmma_linear rebuilds both launches' parameters and configs in Python on every call. The packer's four
    outputs share one int32 buffer per call. Holds references to the tensors it points at."""

    def __init__(self, x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                 group_words: int, groups: int, in_features: int, act_symmetric: bool, tile: tuple):
        require_cuda("abqc.runtime.cuda.PackedLauncher()", x, w_tiled)
        if x.dtype not in _DTYPE_CODE:
            raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
        if tile[0] not in PACKED_FAMILIES:
            raise ValueError(f"PackedLauncher launches the packer-fed families {', '.join(PACKED_FAMILIES)}, "
                             f"not {tile[0]!r}")
        nt, p, sg = _tiled_shape(w_tiled, n, groups, group_words)
        kw = groups * group_words
        self.m, self.n, self.dev, self.dtype = x.shape[0], n, x.device, x.dtype
        cw, nchunks = pack_chunks(group_words, groups, self.m)
        nsum = nchunks if groups == 1 else groups
        # int32 words of planes [Q, M, KW], code sums [M, nsum], scale (float32) [M], zero [M]
        self.offsets = list(itertools.accumulate((0, a_bits * self.m * kw, self.m * nsum, self.m, self.m)))
        self.keep = (w_tiled, w_scale, w_zero, w_sum, bias)
        self.qargs = _QArgs(None, _DTYPE_CODE[x.dtype], self.m, in_features, kw, group_words, groups,
                            int(act_symmetric), None, None, None, None, cw, nchunks, None)
        self.args = _Args(w_tiled.data_ptr(), None, self.m, n, in_features, groups, group_words, sg,
                          _ptr(w_scale), _ptr(w_zero), _ptr(w_sum), None, None, None, _ptr(bias), None,
                          _DTYPE_CODE[x.dtype], 0, nsum if groups == 1 else 1)
        self.pack = self.gemm = None
        if self.m and n:
            _, fq = function(_config("quant_pack", a_bits, 0, 1, arch_of(self.dev)), self.dev)
            self.pack = _prepared(fq, (self.m, nchunks), 256, 0, self.qargs, self.dev)
            self.gemm = _plane_launch(self.args, tuple(tile), self.m, a_bits, p, nt, groups, kw, self.dev)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.m, self.n, dtype=self.dtype, device=self.dev)
        if self.pack is not None:
            buf = torch.empty(self.offsets[-1], dtype=torch.int32, device=self.dev)
            planes, sums, scale, zero = (buf.data_ptr() + 4 * o for o in self.offsets[:4])
            q, a = self.qargs, self.args
            q.x, q.planes, q.sums, q.scale, q.zero = x.data_ptr(), planes, sums, scale, zero
            self.pack()
            a.act, a.a_sum, a.a_scale, a.a_zero, a.out = planes, sums, scale, zero, out.data_ptr()
            self.gemm()
        return out


def gemv_quant(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
               words: int, in_features: int, act_symmetric: bool, tile: tuple, integer: bool = False):
    """The "gemvq" family: one gemv launch that quantizes and packs x [M, K] itself (per-channel weights,
    M <= the build's tokens). y [M, N] in x's dtype, or integer=True: the int32 accumulators [M, N, 1].
    tile = ("gemvq" or "gemvqt" (weights by bulk copies, sm_90a), warps splitting K, max tokens, channel
    tiles per warp)."""
    x = x.contiguous()
    return GemvqLauncher(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, words, in_features, act_symmetric,
                         tile, integer)(x)


def linear_launcher(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                    group_words: int, groups: int, in_features: int, act_symmetric: bool, tile=None,
                    hadamard_block: torch.Tensor | None = None):
    """A callable x -> y equal to bmma_linear(x, ...) for inputs of x's shape, dtype and device: a prepared
    GemvqLauncher where the tile is "gemvq", a PackedLauncher (packer + bit-plane kernel) for the packer-fed
    families, else bmma_linear with the tile resolved once. hadamard_block:
    the input first goes through that online Hadamard, fused into the activation quantizer (per-call-site
    row counters) where the planner chose so (planner.hadamard_fused), else as a launch of its own."""
    arch = arch_of(x.device)
    tile = tile or launch_tile(x.shape[0], w_tiled.shape[2], a_bits, n, groups * group_words, group_words, arch)
    if tile[0] in GEMVQ_FAMILIES and groups == 1:
        run = GemvqLauncher(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, in_features,
                            act_symmetric, tile)
        if hadamard_block is None:
            return run
        from .hadamard import hadamard_cuda
        return lambda x2: run(hadamard_cuda(x2, hadamard_block))
    args = (w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, groups, in_features, act_symmetric, tile)
    if hadamard_block is None:
        if tile[0] in PACKED_FAMILIES:
            return PackedLauncher(x, *args)
        return lambda x2: bmma_linear(x2, *args)
    fused = tile[0] in PACKED_FAMILIES and planner.hadamard_fused(
        n, groups * group_words, group_words, w_tiled.shape[2], a_bits, x.shape[0], arch, hadamard_block.shape[0])
    if fused:
        from .hadamard import fresh_counters
        counter = fresh_counters(x.shape[0], x.device)
    else:
        counter = None
    return lambda x2: hadamard_linear(x2, *args, block=hadamard_block, fused=fused, counter=counter)


def hadamard_linear(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                    group_words: int, groups: int, in_features: int, act_symmetric: bool, tile, *,
                    block: torch.Tensor, fused: bool, counter: torch.Tensor | None = None) -> torch.Tensor:
    """bmma_linear of x's online Hadamard (block: its float32 dense factor): fused into the activation
    quantizer (one launch; counter: that call site's row counters) or as a launch of its own first."""
    args = (w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, groups, in_features, act_symmetric, tile)
    if fused:
        return bmma_linear(x, *args, hadamard_block=block, counter=counter)
    from .hadamard import hadamard_cuda
    return bmma_linear(hadamard_cuda(x, block), *args)


def epilogue_args(w_scale, w_zero, w_sum, packed, bias=None) -> dict:
    """The fused epilogue's inputs: weight scale/zero/code sums and quant_pack's (planes, sums, scale, zero)."""
    _, a_sum, a_scale, a_zero = packed
    return {"w_scale": w_scale, "w_zero": w_zero, "w_sum": w_sum, "a_scale": a_scale, "a_zero": a_zero,
            "a_sum": a_sum, "bias": bias}


def bmma_linear(x: torch.Tensor, w_tiled: torch.Tensor, w_scale, w_zero, w_sum, bias, n: int, a_bits: int,
                group_words: int, groups: int, in_features: int, act_symmetric: bool, tile=None,
                hadamard_block: torch.Tensor | None = None, counter: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = fused W(p)A(q) linear on CUDA: one quantize-and-pack launch, one bit-plane GEMM launch
    (or, for a ("gemvq", ...) tile, one GEMV launch that quantizes in-kernel: gemv_quant; for an
    ("int8", ...) tile, the INT8 family: int8_linear; "int8k" / "fp8": the same codes through abqc's
    in-kernel-unpack INT8 GEMM / FP8 torch._scaled_mm; ("wgmma8", ...): wgmma8_linear). hadamard_block (float32 [m, m]): y = W(H x), the
    online Hadamard fused into the quantize-and-pack launch (hadamard.hadamard_pack; counter: its row
    counters), or, for the gemvq and INT8 families, a launch of its own before them."""
    require_cuda("abqc.runtime.cuda.bmma_linear()", x, w_tiled)
    tile = tile or launch_tile(x.shape[0], w_tiled.shape[2], a_bits, n, groups * group_words, group_words,
                               arch_of(x.device))
    if hadamard_block is not None and tile[0] not in PACKED_FAMILIES:   # families that quantize x themselves
        from .hadamard import hadamard_cuda
        x, hadamard_block = hadamard_cuda(x, hadamard_block), None
    if tile[0] in GEMVQ_FAMILIES:
        if groups != 1:
            raise ValueError(f"the {tile[0]} family serves per-channel weights only")
        return gemv_quant(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, in_features,
                          act_symmetric, tile)
    if tile[0] in BYTE_FAMILIES:
        if groups != 1:
            raise ValueError(f"the {tile[0]} family serves per-channel weights only")
        return wgmma8_linear(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, in_features,
                             act_symmetric, tile)
    if tile[0] in INT8_FAMILIES:
        if groups != 1:
            raise ValueError(f"the {tile[0]} family serves per-channel weights only")
        return int8_linear(x, w_tiled, w_scale, w_zero, w_sum, bias, n, a_bits, group_words, in_features,
                           act_symmetric, gemm=tile[0])
    if hadamard_block is None:
        packed = quant_pack(x, a_bits, group_words, groups, in_features, act_symmetric)   # rejects other dtypes
    else:
        from .hadamard import hadamard_pack
        packed = hadamard_pack(x, hadamard_block, a_bits, group_words, groups, act_symmetric, counter)
    epi = epilogue_args(w_scale, w_zero, w_sum, packed, bias)
    return bmma(w_tiled, packed[0], n, in_features, group_words, 1, epi, tile, x.dtype)


def register() -> None:
    """Attach the CUDA kernels to the abqc ops (idempotent)."""
    if _REGISTERED["done"]:
        return
    require_cuda("abqc.runtime.cuda.register()")
    from . import ops

    @torch.library.register_kernel("abqc::bitplane_mm", "cuda")
    def _bitplane_mm_cuda(a_planes, w_planes, group_words):
        ops._check_planes(a_planes, w_planes, group_words)
        wt = layout.tile_weights(w_planes, group_words)
        return bmma(wt, a_planes.contiguous(), w_planes.shape[1], a_planes.shape[2] * 32, group_words, 0)

    @torch.library.register_kernel("abqc::wpaq_linear", "cuda")
    def _wpaq_linear_cuda(x, w_planes, w_scale, w_zero, w_sum, bias, a_bits, group_size, in_features, act_symmetric):
        gw, kp = ops.group_layout(in_features, group_size)
        wt = layout.tile_weights(w_planes, gw)
        return bmma_linear(x, wt, w_scale, w_zero, w_sum, bias, w_planes.shape[1], a_bits, gw, kp // (gw * 32),
                           in_features, act_symmetric)

    _REGISTERED["done"] = True

"""Kernel planner: for (N, K layout, bit pair, M bucket, arch) pick the launch tile (warps splitting K,
token tiles per warp) by timing every candidate on first use; plans are cached in
ABQC_CACHE/plans.json. With tuning off, `abqc.runtime.cuda.default_tile` is used (documented there).
The runtime launches the cached plan's tile when there is one (`runtime.cuda.launch_tile`); nothing tunes
implicitly.

Families now: "bmma" (GEMM, tokens in the MMA N dimension), "gemv" (per-channel decode, activation
planes in the MMA N dimension), "gemvq" (the same GEMV build quantizing its activations in-kernel, no
packing launch), "gemvt" / "gemvqt" (those two GEMV builds with their weights streamed into shared memory
by the Hopper bulk-copy engine, sm_90a only: exact on the H200, slower there, so not tuned:
BULK_GEMV_ENABLED), "int8" (per-channel, M >= 16: centred int8 codes of both sides and one
torch._int_mm on the INT8 tensor cores; weights unpacked to int8 on every call), "int8k" (the same
codes through abqc's own INT8 GEMM, which unpacks the weight bit-planes in shared memory: no int8 weight
copy, one launch fewer) and "fp8" (p, q <= 5: the same codes as float8_e4m3fn on torch._scaled_mm, whose
FP8 tensor cores run ~1.5x torch._int_mm; exact on the H200, but its whole linear measured 1.4-4.1x slower
than "int8" there, so not tuned: FP8_FAMILY_ENABLED) and "wgmma" (per-channel, M >= WGMMA_MIN_BUCKET,
sm_90a: the bit-plane GEMM on the Hopper warpgroup MMA, m64nNk256 b1 AND-popc, N = 32, 64 or 128 tokens) and
"wgmma8" (per-channel, M >= WGMMA_MIN_BUCKET, sm_90a: byte codes of the activations on the Hopper INT8
warpgroup MMA with the weight bit-planes unpacked in registers; N = 32, 64 or 128 tokens, 1 or 2 warpgroups).

plans.json maps plan_key(...) to {"family", "tile", "us", "tuned"} ("us": the winner's measured time of
one `run` call in microseconds; abqc's callers time cuda.bmma_linear, activation packing included), plus
"device" (the GPU that measured it) and "candidates" (how many tiles were timed) in plans tuned since
those two were added; readers use .get for them, so older caches stay valid. An entry without a usable
tile is ignored (re-tuned or defaulted). abqc.codegen.plan_report lists a model's choices.

A linear whose input first goes through an online Hadamard (the rotate pass's down_proj) has a second
choice, stored under hadamard_key(...): run the Hadamard inside the activation quantizer (one launch,
runtime.hadamard.hadamard_pack) or as a launch of its own before the linear. {"fused", "us_fused",
"us_separate", "tuned", "device"}; untuned, HADAMARD_FUSED_DEFAULT holds.
"""
from __future__ import annotations

import json
import threading

import torch

from ..errors import AbqcError
from ..models import cache_dir
from .config import (FP8_MAX_BITS, WGMMA8_TOKENS, WGMMA8_WARPGROUPS, WGMMA_TOKENS, WGMMA_WARPGROUPS, gemv_channel_tiles,
                     gemv_tokens, token_tile_choices)
from .layout import steps_per_group

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WARPS_K = (2, 4, 8)   # the kernels are built for at most 256 threads a block
# Untuned: the Hadamard runs as its own launch. Measured on the H200 (benchmarks/results/kernels.md,
# K = 11008, M 1..8) the fused one-launch Hadamard+quantizer is slower than the separate Hadamard plus the
# plain packer: each fused block recomputes a share of the dense factor and the row's last block packs it.
HADAMARD_FUSED_DEFAULT = False
WGMMA_MIN_BUCKET = 16  # below this a block's 32 or 64 token columns would be mostly padding
# wgmma8 (runtime.cuda.wgmma8): exact on an H100 (tests/test_wgmma8.py); measured there faster than the int8
# family at M = 16-512 on most LLaMA-7B shapes and slower at M = 2048, so a tuning candidate, not a default
WGMMA8_ENABLED = True
INT8_MIN_BUCKET = 16  # below this the INT8 family (torch._int_mm pads to 17 rows, unpacks all weights) is not timed
# The FP8 family (runtime.cuda.fp8_gemm) is exact only where the tensor cores accumulate these small integers
# in full float32: tests/test_int8_family.py's FP8 checks passed on the H200 (code 24ac1d4), but there its
# linear (quantize, unpack to e4m3, _scaled_mm, epilogue) measured 1.4-4.1x slower than the int8 family at
# M = 16..2048 (W4A4 / W2A4, benchmarks/results/kernels_fp8.md), so tuning skips it.
FP8_FAMILY_ENABLED = False
# The bulk-copy GEMV builds (gemvt, gemvqt; sm_90a) are exact on the H200 (tests/test_cuda.py test_bulk_gemv_*)
# but measured slower than their register-load twins at every decode shape and bit pair timed
# (benchmarks/results/kernels_bulk.md: gemvt 1.0-1.35x, gemvqt 1.04-1.9x the time), so tuning skips them;
# kernels.py still times them.
BULK_GEMV_ENABLED = False
_LOCK = threading.Lock()
_PLANS: dict = {}   # plans.json path -> its plans, read once per path (ABQC_CACHE may change between calls)
_GENERATION = [0]   # bumped whenever a plan is stored, so memoised launch choices (runtime.cuda) are redone


def generation() -> int:
    return _GENERATION[0]


def m_bucket(m: int) -> int:
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def _path():
    return cache_dir() / "plans.json"


def _load() -> dict:
    p = _path()
    if p not in _PLANS:
        try:
            plans = json.loads(p.read_text()) if p.exists() else {}
        except (OSError, json.JSONDecodeError):
            plans = {}      # a damaged cache only costs re-tuning
        _PLANS[p] = plans if isinstance(plans, dict) else {}
    return _PLANS[p]


def _usable(plan) -> bool:
    """A cached plan names a tile the runtime can launch: [family, ints...]."""
    tile = plan.get("tile") if isinstance(plan, dict) else None
    return (isinstance(tile, list) and len(tile) >= 3 and isinstance(tile[0], str)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in tile[1:]))


def plan_key(n, kw, group_words, p, q, m, arch) -> str:
    return f"{arch}|n{n}|kw{kw}|gw{group_words}|w{p}a{q}|m{m_bucket(m)}"


def cached_tile(n, kw, group_words, p, q, m, arch) -> tuple | None:
    """The tuned tile plans.json holds for this launch, or None (never tunes, never touches a GPU)."""
    plan = _load().get(plan_key(n, kw, group_words, p, q, m, arch))
    return tuple(plan["tile"]) if _usable(plan) else None


def hadamard_key(n, kw, group_words, p, q, m, arch, block: int) -> str:
    return plan_key(n, kw, group_words, p, q, m, arch) + f"|h{block}"


def _cached_hadamard(key: str) -> dict | None:
    """The stored Hadamard plan under key if it names a choice ({"fused": bool, ...}), else None."""
    plan = _load().get(key)
    return plan if isinstance(plan, dict) and isinstance(plan.get("fused"), bool) else None


def hadamard_fused(n, kw, group_words, p, q, m, arch, block: int) -> bool:
    """Whether a linear behind an online Hadamard (dense factor of size `block`) fuses it into the
    activation quantizer: the tuned choice in plans.json, else HADAMARD_FUSED_DEFAULT. Never tunes."""
    plan = _cached_hadamard(hadamard_key(n, kw, group_words, p, q, m, arch, block))
    return HADAMARD_FUSED_DEFAULT if plan is None else plan["fused"]


def choose_hadamard(run, n, kw, group_words, p, q, m, arch, block: int, tune: bool = True) -> dict:
    """run(fused: bool) launches the linear with its Hadamard fused or separate. Returns the plan
    {"fused", "us_fused", "us_separate", "tuned"}: cached, timed now (tune) and stored, or the default."""
    key = hadamard_key(n, kw, group_words, p, q, m, arch, block)
    cached = _cached_hadamard(key)
    if cached is not None:
        return cached
    if not tune:
        return {"fused": HADAMARD_FUSED_DEFAULT, "us_fused": None, "us_separate": None, "tuned": False}
    us = {fused: time_us(lambda: run(fused)) for fused in (True, False)}
    plan = {"fused": us[True] < us[False], "us_fused": round(us[True], 3), "us_separate": round(us[False], 3),
            "tuned": True, "device": torch.cuda.get_device_name()}
    _store(key, plan)
    return plan


def _store(key: str, plan: dict) -> None:
    plans = _load()
    with _LOCK:
        plans[key] = plan
        _GENERATION[0] += 1
        try:
            _path().parent.mkdir(parents=True, exist_ok=True)
            _path().write_text(json.dumps(plans, indent=1))
        except OSError:
            pass


def candidates(p: int, q: int, m: int, groups: int = 1, include_disabled: bool = False,
               arch: str | None = None) -> list[tuple]:
    """(family, warps splitting K, token tiles) worth timing for this shape on arch (None: only the
    families every arch has); include_disabled: also the families not yet enabled for tuning (benchmarks
    time them separately)."""
    tms = [t for t in token_tile_choices(p, q) if t == 1 or 8 * t <= m_bucket(m)]
    out = [("bmma", wk, tm) for wk in WARPS_K for tm in tms]
    mt = gemv_tokens(m, p, q)
    if groups == 1 and mt:
        families = ["gemv", "gemvq"]
        if arch == "sm_90a" and (BULK_GEMV_ENABLED or include_disabled):
            families += ["gemvt", "gemvqt"]
        out += [(f, wk, mt, u) for f in families for wk in WARPS_K for u in gemv_channel_tiles(p, q, mt)]
    if groups == 1 and arch == "sm_90a" and m_bucket(m) >= WGMMA_MIN_BUCKET:
        out += [("wgmma", WGMMA_WARPGROUPS, tn // 8) for tn in WGMMA_TOKENS if tn <= 2 * m_bucket(m)]
    if groups == 1 and arch == "sm_90a" and m_bucket(m) >= WGMMA_MIN_BUCKET and (WGMMA8_ENABLED or include_disabled):
        out += [("wgmma8", wg, tn // 8) for wg in WGMMA8_WARPGROUPS for tn in WGMMA8_TOKENS if tn <= 2 * m_bucket(m)]
    if groups == 1 and m_bucket(m) >= INT8_MIN_BUCKET:
        out.append(("int8", 0, 0))      # no launch parameters: cuBLASLt picks the INT8 GEMM's tiles
        out.append(("int8k", 0, 0))     # abqc's INT8 GEMM unpacking the bit-planes in-kernel (one tile)
        if (FP8_FAMILY_ENABLED or include_disabled) and p <= FP8_MAX_BITS and q <= FP8_MAX_BITS:
            out.append(("fp8", 0, 0))   # the same codes as float8_e4m3fn on torch._scaled_mm (sm_89+)
    return out


def time_us(fn, iters: int = 20, reps: int = 5) -> float:
    """Median over reps of a CUDA-graph replay of `iters` calls, per call, in microseconds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return sorted(times)[len(times) // 2]


def choose(run, n, kw, group_words, p, q, m, arch, tune: bool = True) -> dict:
    """run(tile) launches the kernel with tile=(family, wk, tm). Returns {"family", "tile", "us" or None, "tuned"}."""
    from ..runtime.cuda import default_tile
    key = plan_key(n, kw, group_words, p, q, m, arch)
    plans = _load()
    if _usable(plans.get(key)):
        return plans[key]
    groups = kw // group_words
    if not tune:
        tile = default_tile(m, p, q, n, groups * steps_per_group(group_words), groups)
        return {"family": tile[0], "tile": list(tile), "us": None, "tuned": False}
    best, timed = None, 0
    for tile in candidates(p, q, m, groups, arch=arch):
        try:
            us = time_us(lambda: run(tile))
        except (RuntimeError, ValueError):   # a tile this shape cannot launch is simply not a candidate
            continue
        if best is None or us < best[1]:
            best = (tile, us)
        timed += 1
    if best is None:
        raise AbqcError(f"no kernel tile could run for {key}: every candidate failed to launch; run without "
                        "tuning (runtime.cuda.default_tile) and report this shape")
    plan = {"family": best[0][0], "tile": list(best[0]), "us": round(best[1], 3), "tuned": True,
            "device": torch.cuda.get_device_name(), "candidates": timed}
    _store(key, plan)
    return plan

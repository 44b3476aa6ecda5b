"""Kernel plan report: for every quantized linear of a model and each token count M of interest, the GPU
kernel family and tile the planner picks, with the measured time when the choice was tuned.

An entry's choice is the tuned plan in plans.json when one exists for its planner key (N, K layout, bit
pair, M bucket, arch), else `runtime.cuda.default_tile`, marked "default (untuned)". Weight-only linears
run dequantize + matmul and name no bit-plane kernel. Without tune= nothing touches a GPU (the arch is
only a name), so a plan for any target can be listed on a CPU machine; tune=True times the candidates on
the GPU the model sits on (planner.choose) and stores the winners in plans.json.
Invariant: one entry per (quantized linear, M), in module order then M order; "us" is set only on
entries whose source is "tuned".
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..capture import ROLE_OF
from ..errors import AbqcError
from ..runtime.hadamard import OnlineHadamard
from ..runtime.modules import QuantLinear
from . import planner
from .config import ARCHS

DEFAULT_M = (1, 8, 32, 128, 2048)
WEIGHT_ONLY = "dequantize + matmul (no bit-plane kernel)"
TUNED, UNTUNED = "tuned", "default (untuned)"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def location(path: str) -> tuple[int | None, str | None]:
    """(decoder layer, role) of a linear's module path, with or without a wrapper's prefix."""
    found = _LAYER.search(path)
    if found is None:
        return None, None
    return int(found[1]), ROLE_OF.get(path.rpartition(".")[2])


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, QuantLinear)]


def resolve_arch(linears: list, arch: str | None) -> str:
    """arch as given (checked), else the GPU the model sits on, else the local GPU."""
    if arch is not None:
        if arch not in ARCHS:
            raise AbqcError(f"unknown GPU arch {arch!r}: abqc's kernels are built for {', '.join(ARCHS)}")
        return arch
    device = next((ql.device for _, ql in linears if ql.device.type == "cuda"), None)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is None:
        raise AbqcError("a kernel plan needs a target GPU and torch sees none: pass arch= (one of "
                        f"{', '.join(ARCHS)}), e.g. kernel_plan(arch='sm_90a')")
    from ..runtime.cuda import arch_of
    return arch_of(device)


def check_tunable(linears: list, arch: str) -> None:
    """tune=True times kernels where the model is: refuse up front what cannot be timed."""
    from ..runtime import cuda
    cuda.require_cuda("kernel_plan(tune=True)")
    for path, ql in linears:
        if ql.pair.weight_only:
            continue
        if ql.device.type != "cuda":
            raise AbqcError(f"kernel_plan(tune=True) times the kernels on the model's GPU, but {path} is on "
                            f"{ql.device}: move the model first (compiled.to('cuda'))")
        if cuda.arch_of(ql.device) != arch:
            raise AbqcError(f"kernel_plan(tune=True, arch={arch!r}) but the model's GPU is "
                            f"{cuda.arch_of(ql.device)}: leave arch=None to tune for the GPU at hand")


def _runner(ql: QuantLinear, m: int):
    """run(tile) for planner.choose: ql's fused linear (packing included) on m float16 tokens."""
    from ..runtime import cuda
    dev = ql.device
    x = torch.randn(m, ql.in_features, device=dev, dtype=torch.float16,
                    generator=torch.Generator(device=dev).manual_seed(0))   # leaves the global RNG alone
    gw, groups = ql.group_words_and_count()
    wt = ql.tiled_weights()
    return lambda tile: cuda.bmma_linear(x, wt, ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features,
                                         ql.pair.a_bits, gw, groups, ql.in_features, ql.act_symmetric, tile=tile)


def _hadamard_runner(ql: QuantLinear, m: int, tile: tuple):
    """run(fused) for planner.choose_hadamard: ql's online Hadamard + linear on m float16 tokens."""
    from ..runtime import cuda
    from ..runtime.hadamard import fresh_counters
    dev = ql.device
    x = torch.randn(m, ql.in_features, device=dev, dtype=torch.float16,
                    generator=torch.Generator(device=dev).manual_seed(0))
    gw, groups = ql.group_words_and_count()
    wt, block, counter = ql.tiled_weights(), ql.pre.kernel_block(dev), fresh_counters(m, dev)
    return lambda fused: cuda.hadamard_linear(x, wt, ql.w_scale, ql.w_zero, ql.w_sum, ql.bias, ql.out_features,
                                              ql.pair.a_bits, gw, groups, ql.in_features, ql.act_symmetric, tile,
                                              block=block, fused=fused, counter=counter)


def _hadamard_choice(ql: QuantLinear, m: int, arch: str, tune: bool, tile: tuple) -> dict:
    """How ql's online Hadamard runs at m tokens with the launched tile: fused into the activation
    quantizer or as its own launch (planner.choose_hadamard); None where ql has no online Hadamard."""
    if not isinstance(ql.pre, OnlineHadamard):
        return {"hadamard": None, "hadamard_us": None}
    from ..runtime.cuda import PACKED_FAMILIES
    if tile[0] not in PACKED_FAMILIES:           # the gemvq and INT8 families quantize x themselves
        return {"hadamard": "separate (the family quantizes in-kernel)", "hadamard_us": None}
    gw, groups = ql.group_words_and_count()
    run = _hadamard_runner(ql, m, tile) if tune else None
    plan = planner.choose_hadamard(run, ql.out_features, gw * groups, gw, ql.pair.w_planes, ql.pair.a_bits, m, arch,
                                   ql.pre.block.shape[0], tune=tune)
    how = "fused" if plan["fused"] else "separate"
    if not plan.get("tuned"):
        return {"hadamard": f"{how} ({UNTUNED})", "hadamard_us": None}
    return {"hadamard": how, "hadamard_us": {"fused": plan.get("us_fused"), "separate": plan.get("us_separate")}}


def _choice(ql: QuantLinear, m: int, arch: str, tune: bool) -> dict:
    """family / tile / us / source of one bit-plane linear at m tokens, the tile its runtime launches, and
    how an online Hadamard on its input runs."""
    from ..runtime.cuda import launch_tile
    gw, groups = ql.group_words_and_count()
    p, q, n = ql.pair.w_planes, ql.pair.a_bits, ql.out_features
    run = _runner(ql, m) if tune else None
    plan = planner.choose(run, n, gw * groups, gw, p, q, m, arch, tune=tune)
    tuned = bool(plan.get("tuned", True))       # every cached entry was tuned; "tuned" may be absent in old ones
    us = plan.get("us")
    launched = ql.tile or launch_tile(m, p, q, n, gw * groups, gw, arch)
    return {"family": plan["tile"][0], "tile": list(plan["tile"]),
            "us": us if tuned and isinstance(us, (int, float)) and us > 0 else None,
            "source": TUNED if tuned else UNTUNED, "device": plan.get("device") if tuned else None,
            "runtime_tile": list(launched), **_hadamard_choice(ql, m, arch, tune, tuple(launched))}


def _check_m(ms) -> tuple[int, ...]:
    ms = tuple(ms)
    if not ms or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        raise AbqcError(f"m must be token counts >= 1, e.g. m=(1, 8, 128); got {ms!r}")
    return ms


def kernel_plan(model: nn.Module, arch: str | None = None, m=DEFAULT_M, tune: bool = False) -> list[dict]:
    """Per quantized linear and token count M: {path, layer, role, n, k, bits, group_size (None: per
    channel), m, m_bucket, arch, family, tile, us, source, device, runtime_tile, hadamard, hadamard_us}.

    runtime_tile is the tile QuantLinear launches for that M: its fixed .tile, else the tuned plan, else
    default_tile (runtime.cuda.launch_tile). hadamard: how an online Hadamard on the input runs with that
    tile ("fused" into the activation quantizer or "separate", "(default (untuned))" appended when not
    tuned; None without one); hadamard_us: both ways' measured µs when tuned."""
    ms = _check_m(m)
    linears = quantized_linears(model)
    arch = resolve_arch(linears, arch)
    if tune:
        check_tunable(linears, arch)
    out = []
    for path, ql in linears:
        layer, role = location(path)
        base = {"path": path, "layer": layer, "role": role, "n": ql.out_features, "k": ql.in_features,
                "bits": str(ql.pair), "group_size": ql.group_size if ql.group_size < ql.in_features else None}
        for mm in ms:
            row = {**base, "m": mm, "m_bucket": planner.m_bucket(mm), "arch": arch}
            if ql.pair.weight_only:
                row.update(family=WEIGHT_ONLY, tile=None, us=None, source="weight-only", device=None,
                           runtime_tile=None, hadamard=None, hadamard_us=None)
            else:
                row.update(_choice(ql, mm, arch, tune))
            out.append(row)
    return out

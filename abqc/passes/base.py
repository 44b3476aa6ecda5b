"""Pass protocol and the pass manager.

A pass is a callable `pass_(captured, ctx) -> (captured, PassReport)`. It may rewrite the captured
model's modules and read or write `ctx.state` (e.g. the RTN pass leaves quantized weights there for
the lowering pass). Its report is plain JSON data.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..bits import BitSpec
from ..capture import CapturedModel
from ..errors import AbqcError


@dataclass
class PassContext:
    bits: BitSpec
    calib: torch.Tensor | None = None      # LongTensor [n, seqlen] of calibration token ids
    seed: int = 0
    weight_symmetric: bool = False
    act_symmetric: bool = False
    progress: bool = True
    device: str | None = None              # where calibration runs; None: CUDA when available, else CPU
    state: dict[str, Any] = field(default_factory=dict)

    def calib_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def need_calib(self, pass_name: str) -> torch.Tensor:
        if self.calib is None:
            raise AbqcError(f"pass {pass_name!r} needs calibration token ids: pass calib=abqc.data."
                            "calibration_samples(tokenizer) (or tokenizer=...) to abqc.compile, or use method='rtn'")
        return self.calib


@dataclass
class PassReport:
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


Pass = Callable[[CapturedModel, PassContext], "tuple[CapturedModel, PassReport]"]


def run_passes(captured: CapturedModel, ctx: PassContext, passes: list) -> tuple[CapturedModel, list[PassReport]]:
    reports = []
    for p in passes:
        t = time.perf_counter()
        captured, rep = p(captured, ctx)
        rep.seconds = round(time.perf_counter() - t, 3)
        reports.append(rep)
    return captured, reports

"""abqc.compile: capture -> passes -> runnable module, plus the compile report."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__, artifact, data
from .bits import parse_bits
from .capture import capture
from .errors import AbqcError, DataError
from .models import check_finite, check_supported
from .passes import CALIBRATED, METHODS, REGISTRY, PassContext, run_passes


class CompiledModel(nn.Module):
    """The quantized HF model (its linears lowered) with the compile report: a drop-in for the HF model.

    forward / generate (HF KV cache included) go to the wrapped model, and so does every other public
    attribute nn.Module does not have (config, device, generation_config, get_input_embeddings ...).
    .to(device) / .half() / .to(torch.bfloat16) / eval() recurse into it as for any nn.Module; QuantLinear
    keeps its float32 scales under dtype casts. save() / load() write and read an abqc artifact.
    """

    def __init__(self, model: nn.Module, report: dict):
        super().__init__()
        self.model = model
        self.report = report
        self.training = model.training   # a wrapper of an eval-mode model is in eval mode too

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # private and dunder names stay ours, so copy/pickle protocols never reach the wrapped model
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

    def save(self, directory: str | Path, tokenizer=None) -> Path:
        """Write an abqc artifact (safetensors + plan.json, see abqc.artifact) that abqc.load(directory) reads."""
        return artifact.save(self.model, self.report, directory, tokenizer)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """(CompiledModel, tokenizer or None, ModelInfo) from an artifact folder; no calibration or FP weights."""
        model, report, tokenizer, info = artifact.load(directory, device, dtype)
        return cls(model, report), tokenizer, info

    def fuse_projections(self) -> list[str]:
        """Run q/k/v and gate/up as one quantized linear each where their layouts agree (one activation
        quantization and one kernel per group; outputs bit-identical). Returns the fused paths; undo with
        unfuse_projections() (save() needs the separate projections). See abqc.runtime.fuse."""
        from .runtime.fuse import fuse_projections
        return fuse_projections(self.model)

    def unfuse_projections(self) -> int:
        from .runtime.fuse import unfuse_projections
        return unfuse_projections(self.model)

    def kernel_plan(self, arch: str | None = None, m=None, tune: bool = False) -> list[dict]:
        """Every quantized linear's GPU kernel family and tile per token count M (default 1, 8, 32, 128, 2048):
        the tuned plan from plans.json with its measured µs, else the default tile (abqc.codegen.plan_report).
        arch: e.g. "sm_90a" (default: the model's or the local GPU). tune=True times the candidates on the
        model's GPU first; nothing tunes implicitly (.to("cuda") does not). Stored in report["kernels"]."""
        from .codegen.plan_report import DEFAULT_M, kernel_plan
        self.report["kernels"] = kernel_plan(self.model, arch, DEFAULT_M if m is None else m, tune)
        return self.report["kernels"]

    def write_report(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "report.json"
        path.write_text(json.dumps(self.report, indent=1))
        return path


def _resolve_passes(passes, options: dict) -> list:
    out = []
    for p in passes:
        if isinstance(p, str):
            if p not in REGISTRY:
                raise AbqcError(f"unknown pass {p!r}: available passes are {', '.join(REGISTRY)}")
            out.append(REGISTRY[p](options))
        elif callable(p):
            out.append(p)
        else:
            raise AbqcError(f"a pass must be a name or a callable, got {type(p).__name__}")
    return out


def _pipeline(method: str | None, passes) -> tuple:
    if passes is not None and method is not None:
        raise AbqcError("give either method= (a preset pipeline) or passes= (your own list), not both")
    if passes is not None:
        return tuple(passes)
    method = method or "abq"
    if method not in METHODS:
        raise AbqcError(f"unknown method {method!r}; known: {', '.join(METHODS)} (or pass passes=[...])")
    return METHODS[method]


def _default_calib(model: nn.Module, tokenizer) -> torch.Tensor:
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    return data.calibration_samples(tokenizer, n=128, seqlen=min(2048, max_len))


def _check_inputs(model: nn.Module, calib: torch.Tensor | None) -> None:
    """Refuse what compile cannot quantize before any copy or capture: clear errors, never torch's."""
    if isinstance(model, CompiledModel):
        raise AbqcError("the model is already compiled by abqc; compile the floating-point model instead")
    check_supported(model)
    check_finite(model)
    if calib is None:
        return
    if not torch.is_tensor(calib) or calib.dim() != 2:
        got = tuple(calib.shape) if torch.is_tensor(calib) else type(calib).__name__
        raise DataError(f"calib must be a LongTensor of token ids [n_samples, seqlen], got {got} "
                        "(see abqc.data.calibration_samples)")
    data.check_ids(calib, getattr(model.config, "vocab_size", None), "calib")
    n, seqlen = calib.shape
    max_len = getattr(model.config, "max_position_embeddings", None)
    if n < 1 or seqlen < 2:
        raise DataError(f"calib has shape {tuple(calib.shape)}: pass at least one sample of at least 2 tokens")
    if max_len is not None and seqlen > max_len:
        raise DataError(f"calib seqlen {seqlen} exceeds the model's maximum of {max_len} positions: "
                        f"use calibration_samples(..., seqlen<={max_len})")


def compile(model: nn.Module, bits="w4a8", overrides: dict | None = None, calib: torch.Tensor | None = None,
            method: str | None = None, passes=None, calib_options: dict | None = None,
            pass_options: dict | None = None, tokenizer=None, device: str | None = None,
            inplace: bool = False, seed: int = 0, act_symmetric: bool = False,
            weight_symmetric: bool = False, report_dir: str | Path | None = None,
            progress: bool = True) -> CompiledModel:
    """Quantize a Hugging Face causal LM (Llama / Qwen2 / Mistral family).

    bits: "w4a8", "w2*a8", "w4a16g128", "w2a8,down=w4a8" ... (see abqc.bits); overrides: {selector: pair}.
    method: "abq" (default: sensitivity -> clip-learning with DLC+AKL -> lower), "lwc-mse", "smoothquant"
        or "rtn" (abqc.passes.METHODS); passes=[names or callables] replaces the preset (not both).
    calib: LongTensor [n, seqlen] of calibration ids; calibrating passes need it, or give tokenizer= and
        128 x 2048-token samples of the shipped Wikipedia text are drawn.
    calib_options: clip-learning recipe (abqc.passes.CalibOptions fields: epochs, lr_clip, lr_smooth,
        samples, batch, compensation, loss, checkpoint_dir, ...); pass_options: {"sensitivity": {...},
        "smoothquant": {...}, "gptq": {"act_order": True}}. device: where calibration runs (default CUDA when available).
    inplace: rewrite `model` itself instead of a deep copy.
    """
    spec = parse_bits(bits, overrides)
    pipeline = _pipeline(method, passes)
    _check_inputs(model, calib)
    if calib is None and any(isinstance(p, str) and p in CALIBRATED for p in pipeline):
        if tokenizer is None:
            needs = [p for p in pipeline if isinstance(p, str) and p in CALIBRATED]
            raise AbqcError(f"the passes {needs} need calibration data: pass calib=abqc.data.calibration_samples("
                            "tokenizer) or tokenizer=tok, or choose method='rtn' (no calibration)")
        calib = _default_calib(model, tokenizer)
        _check_inputs(model, calib)
    options = dict(pass_options or {})
    if calib_options:
        options["calibrate"] = calib_options
    resolved = _resolve_passes(pipeline, options)
    t0 = time.perf_counter()
    target = model if inplace else copy.deepcopy(model)
    captured = capture(target)
    spec.check_layers(len(captured.blocks))
    torch.manual_seed(seed)
    ctx = PassContext(spec, calib=calib, seed=seed, weight_symmetric=weight_symmetric,
                      act_symmetric=act_symmetric, progress=progress, device=device)
    captured, reports = run_passes(captured, ctx, resolved)
    report = {
        "abqc_version": __version__,
        "bits": str(ctx.bits),
        "method": (method or "abq") if passes is None else None,
        "pipeline": [p if isinstance(p, str) else getattr(p, "__name__", repr(p)) for p in pipeline],
        "model_type": target.config.model_type,
        "n_layers": len(captured.blocks),
        "relations": {"norm_groups": captured.blocks[0].norm_groups, "v_to_o": list(captured.blocks[0].v_to_o or []),
                      "gated_mlp": list(captured.blocks[0].gated_mlp or [])} if captured.blocks else {},
        "passes": [r.to_json() for r in reports],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    compiled = CompiledModel(target, report)
    if report_dir is not None:
        compiled.write_report(report_dir)
    return compiled

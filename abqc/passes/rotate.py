"""Rotation: fold RMSNorm scales into the linears they feed, rotate the residual stream by a randomised
Hadamard Q, and put an online Hadamard on every down_proj input.

With Q = D H^T / sqrt(n) (D a seeded random +-1 diagonal, H the Hadamard of abqc.runtime.hadamard,
n the hidden size) the residual stream x becomes x Q: embeddings E <- E Q; q/k/v/gate/up and lm_head
W <- W Q (they read the residual); o/down W <- Q^T W, b <- Q^T b (they write it). RMSNorm commutes
with Q once its weight is folded into the linears it feeds (weights set to 1): ||x Q|| = ||x||.
down_proj becomes a HadamardLinear: down(x) = (W H^T)(H x) with H the orthonormal Hadamard of the
intermediate size, applied online (abqc::hadamard) and kept by lowering as the quantized module's `pre`.
Tied embeddings are untied first: E and lm_head differ afterwards.

Invariant: the floating-point model computes the same function (to float rounding; the weights are
rotated in float64), and the returned CapturedModel is a fresh capture of the rotated model. On that
capture down's input is the online Hadamard's output, so the act(gate)*up -> down relation is gone:
scaling up's outputs no longer commutes with down's input. The report gives, per layer, the kurtosis
of the inputs of q/k/v, gate/up and down (after the online Hadamard) before and after rotation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..capture import CapturedModel, capture
from ..errors import UnsupportedModelError
from ..runtime.hadamard import HadamardLinear, OnlineHadamard, factorize
from .base import PassContext, PassReport

_READERS = ("q", "k", "v", "gate", "up")    # linears that read the residual stream (through a norm)
_WRITERS = ("o", "down")                    # linears that write it
_CHUNK = 4096                               # rows rotated at once (bounds float64 temporaries)


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None


def _check_foldable(captured: CapturedModel) -> None:
    """Every residual reader must sit behind an RMSNorm with a weight, or the fold is not exact."""
    for b in captured.blocks:
        fed = {r for roles in b.norm_groups.values() for r in roles}
        missing = [r for r in _READERS if r not in fed]
        if missing:
            raise UnsupportedModelError(f"layer {b.index}: the inputs of {missing} do not come from a norm, so "
                                        "rotate cannot fold it; run without the rotate pass")
        for path in b.norm_groups:
            norm = b.module.get_submodule(path)
            if not _is_rmsnorm(norm):
                raise UnsupportedModelError(f"layer {b.index}: {path} is {type(norm).__name__}, not an RMSNorm with "
                                            "a weight; rotation needs RMSNorm (LayerNorm's mean subtraction does not "
                                            "commute with it); run without the rotate pass")
    norm = getattr(captured.model.model, "norm", None)
    if norm is None or not _is_rmsnorm(norm):
        raise UnsupportedModelError("rotate needs the final norm model.model.norm to be an RMSNorm with a weight")


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _rotate_rows(w: torch.Tensor, signs: torch.Tensor, transform: OnlineHadamard) -> torch.Tensor:
    """w Q (float64) for w [rows, n], Q = diag(signs) H^T / sqrt(n): each row v -> hadamard(v * signs)."""
    out = torch.empty(w.shape, dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], _CHUNK):
        out[i:i + _CHUNK] = transform(w[i:i + _CHUNK].to(torch.float64) * signs)
    return out


def _untie(model: nn.Module) -> bool:
    """Give lm_head its own weight if it shares the embedding's; True if it did."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False     # so save / reload does not tie them again
    return True


@torch.no_grad()
def _fold_norms(captured: CapturedModel) -> None:
    """W <- W diag(g) for every linear a norm with weight g feeds; g <- 1."""
    pairs = [(b.module.get_submodule(path), [b.linear(r) for r in roles])
             for b in captured.blocks for path, roles in b.norm_groups.items()]
    pairs.append((captured.model.model.norm, [captured.model.get_output_embeddings()]))
    for norm, linears in pairs:
        g = norm.weight.detach().to(torch.float64)
        for lin in linears:
            _set(lin.weight, lin.weight.to(torch.float64) * g)
        norm.weight.fill_(1.0)


def _probe_ids(model: nn.Module, ctx: PassContext) -> torch.Tensor:
    """A few calibration sequences, or a fixed random-token batch without calibration data."""
    if ctx.calib is not None:
        return ctx.calib[:4, :256]
    g = torch.Generator().manual_seed(ctx.seed)
    return torch.randint(0, model.config.vocab_size, (2, 64), generator=g)


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all values (3 for a Gaussian; large when a few channels carry outliers)."""
    c = x.detach().to(torch.float64).flatten()
    c = c - c.mean()
    var = c.pow(2).mean()
    return float(c.pow(4).mean() / var.pow(2)) if var > 0 else 0.0


@torch.no_grad()
def input_kurtosis(captured: CapturedModel, ids: torch.Tensor) -> dict[tuple[int, str], float]:
    """{(layer, "qkv" | "gate_up" | "down"): kurtosis of what that linear quantizes} on one forward.
    For a down_proj with an online Hadamard that is the Hadamard's output."""
    seen: dict[tuple[int, str], float] = {}
    handles = []

    def record(key, output=False):
        def fn(module, args, out=None):
            seen[key] = kurtosis(out if output else args[0])
        return fn

    for b in captured.blocks:
        handles.append(b.linear("q").register_forward_pre_hook(record((b.index, "qkv"))))
        handles.append(b.linear("gate").register_forward_pre_hook(record((b.index, "gate_up"))))
        down = b.linear("down")
        pre = getattr(down, "pre", None)
        handles.append(pre.register_forward_hook(record((b.index, "down"), output=True)) if pre is not None
                       else down.register_forward_pre_hook(record((b.index, "down"))))
    model = captured.model
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def _rotate_residual(captured: CapturedModel, signs: torch.Tensor, q: OnlineHadamard) -> None:
    model = captured.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    _set(emb.weight, _rotate_rows(emb.weight, signs, q))
    _set(head.weight, _rotate_rows(head.weight, signs, q))
    for b in captured.blocks:
        for role in _READERS:
            lin = b.linear(role)
            _set(lin.weight, _rotate_rows(lin.weight, signs, q))
        for role in _WRITERS:
            lin = b.linear(role)
            _set(lin.weight, _rotate_rows(lin.weight.T, signs, q).T)      # Q^T W = (W^T Q)^T
            if lin.bias is not None:
                _set(lin.bias, _rotate_rows(lin.bias[None], signs, q)[0])


@torch.no_grad()
def _online_down(captured: CapturedModel, seed: int) -> None:
    """down(x) = (W H^T)(H x): rotate down's input dim, move H onto the input as a HadamardLinear."""
    for b in captured.blocks:
        lin = b.linear("down")
        pre = OnlineHadamard.of_size(lin.in_features, seed).to(lin.weight.device)
        new = HadamardLinear.from_linear(lin, pre)
        ones = torch.ones(lin.in_features, dtype=torch.float64, device=lin.weight.device)
        _set(new.weight, _rotate_rows(lin.weight, ones, pre))      # rows v -> v H^T / sqrt(n)
        b.set_linear("down", new)


def _factor_note(n: int) -> str:
    pow2, m, kind = factorize(n)
    return f"{n} = {pow2} x {m}: " + ("Sylvester" if m == 1 else kind)


def rotate(captured: CapturedModel, ctx: PassContext):
    _check_foldable(captured)
    model = captured.model
    if any(isinstance(b.linear("down"), HadamardLinear) for b in captured.blocks):
        raise UnsupportedModelError("the model is already rotated (down_proj has an online Hadamard); "
                                    "list the rotate pass once")
    ids = _probe_ids(model, ctx)
    before = input_kurtosis(captured, ids)
    untied = _untie(model)
    _fold_norms(captured)
    hidden = model.get_input_embeddings().weight.shape[1]
    device = model.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(ctx.seed)
    signs = (torch.randint(0, 2, (hidden,), generator=g) * 2 - 1).to(torch.float64).to(device)
    q = OnlineHadamard.of_size(hidden, ctx.seed).to(device)
    _rotate_residual(captured, signs, q)
    _online_down(captured, ctx.seed)
    captured = capture(model)
    after = input_kurtosis(captured, ids)
    details = [{"layer": layer, "input_of": {"qkv": "q/k/v", "gate_up": "gate/up", "down": "down"}[key],
                "kurtosis_before": round(before[(layer, key)], 4), "kurtosis_after": round(after[(layer, key)], 4)}
               for layer, key in sorted(before)]
    inter = captured.blocks[0].linear("down").in_features if captured.blocks else 0

    def mean(key, when):
        vals = [d[when] for d in details if d["input_of"] == key]
        return round(sum(vals) / max(len(vals), 1), 4)

    summary = {"residual_rotation": _factor_note(hidden) + ", random signs (seed %d)" % ctx.seed,
               "online_hadamard_down": _factor_note(inter) if inter else None,
               "untied_embeddings": untied,
               "kurtosis_probe": f"{'calibration' if ctx.calib is not None else 'random-token'} batch "
                                 f"{list(ids.shape)}",
               **{f"mean_kurtosis_{k.replace('/', '')}_{w}": mean(k, f"kurtosis_{w}")
                  for k in ("q/k/v", "gate/up", "down") for w in ("before", "after")}}
    return captured, PassReport("rotate", summary, details)

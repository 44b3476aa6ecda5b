"""Clip-learning: ABQ-LLM's block-wise calibration of weight clipping, smoothing and compensation.

Per decoder block, in order, on calibration samples (x_fp = FP model's input to the block, x_q = the
already-quantized model's input to it):
  * learnable weight clipping (LWC): range [sigmoid(l)·min W, sigmoid(u)·max W] per output channel or
    group, init sigmoid(4) ≈ 0.982;
  * learnable smoothing (LET) on the pairs norm→{q,k,v}, v→o (GQA-aware), norm→{gate,up}, up→down,
    initialised from SmoothQuant's max|X|^α / max|W|^(1-α);
  * rank-1 compensation W_down + a·bᵀ (a = 0, b = 1 at init) on down_proj of the chosen layers;
  * trained with AdamW (no weight decay), straight-through rounding, on the loss
      abq:     DLC(y_q; y_fp, y_fp*) + AKL(attn_q, attn_fp) + MSE(y_q, y_fp) + MSE(y_q, y_fp*)
      lwc-mse: MSE(y_q, y_fp)                       (OmniQuant's LWC+LET recipe)
    where y_fp = FP block(x_fp), y_fp* = FP block(x_q); every term's weight is configurable.
Invariant: afterwards each block's float weights are the learned smoothed (+ compensated) ones, and
ctx.state["qweights"] holds every quantized linear quantized with its learned clipping; no weight is NaN
(a non-finite loss reverts the block to its best parameters so far, reported as a warning). With
keep_rtn_if_better (default) no block ends with a higher loss, over all its samples, than plain RTN of
the same block: a block where training lost to RTN keeps RTN (reported as a warning, both losses in the
details).
With checkpoint_dir set, each finished block is saved and a rerun with the same inputs resumes after the
last finished block and yields bit-identical weights (same arithmetic on the same values).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..bits import ROLES, BitPair
from ..calib import BlockMath, BlockWeights, akl_loss, batched, dlc_loss, embed_inputs, progress, rope_tables
from ..capture import CapturedModel
from ..errors import AbqcError, NumericalError
from .base import PassContext, PassReport
from .smooth import PAIRS, apply_smoothing, init_scales, input_absmax

LOSSES = {"abq": {"dlc": 1.0, "akl": 1.0, "mse": 1.0, "mse_star": 1.0}, "lwc-mse": {"mse": 1.0}}
KNOWN_TERMS = ("dlc", "akl", "mse", "mse_star")


@dataclass
class CalibOptions:
    """The recipe; defaults follow the reference implementation (128 x 2048 samples are the caller's ids)."""

    epochs: int = 20                   # passes over the samples per block
    epochs_2bit: int = 40              # ... for a block holding weights of 2 bits or fewer (W2, W2*)
    lr_clip: float = 1e-2
    lr_smooth: float = 5e-3
    batch: int = 1                     # samples per optimisation step
    samples: int | None = None         # use at most this many of the calibration samples
    alpha: float = 0.5                 # migration strength of the smoothing initialisation
    pairs: tuple = PAIRS
    learn_clip: bool = True
    learn_smooth: bool = True
    compensation: bool | None = None   # None: on for abq, off for lwc-mse
    compensation_layers: tuple | None = None   # None: the sensitivity pass's choice, else first 3 + last 4
    clip_init: float = 4.0
    keep_rtn_if_better: bool = True    # a block whose calibrated loss is above its plain-RTN loss keeps RTN
    loss: dict = field(default_factory=dict)   # term -> weight; empty: the method's default
    checkpoint_dir: str | None = None

    def validate(self, method: str) -> "CalibOptions":
        loss = dict(self.loss or LOSSES[method])
        bad = set(loss) - set(KNOWN_TERMS)
        if bad:
            raise AbqcError(f"unknown loss terms {sorted(bad)}; known: {', '.join(KNOWN_TERMS)}")
        if self.epochs < 0 or self.epochs_2bit < 0:
            raise AbqcError("epochs must be >= 0")
        if self.batch < 1:
            raise AbqcError("batch must be >= 1")
        if set(self.pairs) - set(PAIRS):
            raise AbqcError(f"unknown smoothing pairs {sorted(set(self.pairs) - set(PAIRS))}; known: {', '.join(PAIRS)}")
        comp = (method == "abq") if self.compensation is None else self.compensation
        return dataclasses.replace(self, loss=loss, pairs=tuple(self.pairs), compensation=comp)


def quant_linear_fn(pairs: dict[str, BitPair], clips: dict, act_symmetric: bool, weight_symmetric: bool):
    """linear_fn for BlockMath.forward: fake-quantized activations and clipped fake-quantized weights with the
    exact arithmetic of the deployed modules (straight-through rounding only changes gradients)."""
    def fn(role, x, w, b):
        pair = pairs.get(role)
        if pair is None or pair.is_fp:
            return F.linear(x, w, b)
        if not pair.weight_only:
            x = quant.fake_quant_activation(x, pair.a_bits, act_symmetric, ste=True)
        cmax, cmin = clips.get(role, (None, None))
        wq = quant.fake_quant_weight_ste(w, **quant.weight_grid_of(pair, weight_symmetric), clip_max=cmax,
                                         clip_min=cmin)
        return F.linear(x, wq, b)
    return fn


class BlockParams(nn.Module):
    """The learnable state of one block: clipping logits, smoothing scales, compensation vectors."""

    def __init__(self, bm: BlockMath, w0: BlockWeights, pairs: dict[str, BitPair], opts: CalibOptions,
                 scales: dict[str, torch.Tensor], compensate: bool):
        super().__init__()
        self.bm, self.w0, self.pairs = bm, w0, pairs
        self.clip_u, self.clip_l = nn.ParameterDict(), nn.ParameterDict()
        if opts.learn_clip:
            for role, pair in pairs.items():
                n, k = w0.linears[role][0].shape
                groups = -(-k // (pair.group_size or k))
                dev = w0.norm_attn.device
                self.clip_u[role] = nn.Parameter(torch.full((n, groups), opts.clip_init, device=dev))
                self.clip_l[role] = nn.Parameter(torch.full((n, groups), opts.clip_init, device=dev))
        self.smooth = nn.ParameterDict({p: nn.Parameter(s.clone()) for p, s in scales.items()}
                                       if opts.learn_smooth else {})
        self.fixed_scales = {} if opts.learn_smooth else scales
        self.comp = None
        if compensate:
            wd = w0.linears["down"][0]
            self.comp = nn.ParameterList([nn.Parameter(torch.zeros(wd.shape[0], device=wd.device)),
                                          nn.Parameter(torch.ones(wd.shape[1], device=wd.device))])

    def float_weights(self) -> BlockWeights:
        scales = {p: s.abs().clamp(min=1e-5) for p, s in self.smooth.items()} | self.fixed_scales
        w = apply_smoothing(self.bm, self.w0, scales)
        if self.comp is not None:
            wd, bd = w.linears["down"]
            w = w.replace(down=(wd + self.comp[0][:, None] * self.comp[1][None, :], bd))
        return w

    def clips(self) -> dict:
        return {r: (torch.sigmoid(self.clip_u[r]), torch.sigmoid(self.clip_l[r])) for r in self.clip_u}

    def groups(self):
        clip = list(self.clip_u.values()) + list(self.clip_l.values())
        rest = list(self.smooth.values()) + (list(self.comp) if self.comp is not None else [])
        return clip, rest


def _quantiles(t: torch.Tensor, n: int = 33) -> list[float]:
    t = t.detach().float().flatten().cpu()
    if t.numel() > 2 ** 24:
        t = t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:2 ** 24]]
    return [round(float(v), 5) for v in torch.quantile(t, torch.linspace(0, 1, n))]


def _block_key(ids: torch.Tensor, ctx: PassContext, opts: CalibOptions, method: str, index: int,
               w_fp: BlockWeights) -> str:
    h = hashlib.sha256()
    h.update(ids.cpu().numpy().tobytes())
    fp = torch.stack([w.double().sum() for w, _ in w_fp.linears.values()]).cpu().numpy().tobytes()
    h.update(fp)
    rec = {"bits": str(ctx.bits), "method": method, "seed": ctx.seed, "index": index,
           "sym": [ctx.weight_symmetric, ctx.act_symmetric],
           "opts": {k: v for k, v in dataclasses.asdict(opts).items() if k != "checkpoint_dir"}}
    h.update(json.dumps(rec, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _save_checkpoint(path: Path, key: str, w: BlockWeights, clips: dict, info: dict) -> None:
    from safetensors.torch import save_file
    t = {f"w.{r}": wt.detach().cpu().contiguous() for r, (wt, _) in w.linears.items()}
    t |= {f"b.{r}": b.detach().cpu().contiguous() for r, (_, b) in w.linears.items() if b is not None}
    t |= {"norm_attn": w.norm_attn.detach().cpu(), "norm_mlp": w.norm_mlp.detach().cpu()}
    for r, (cmax, cmin) in clips.items():
        t[f"clip_max.{r}"], t[f"clip_min.{r}"] = cmax.detach().cpu().contiguous(), cmin.detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(t, str(tmp), metadata={"key": key, "info": json.dumps(info)})
    tmp.replace(path)   # atomic: an interrupted save never leaves a half-written checkpoint


def _load_checkpoint(path: Path, key: str, device):
    from safetensors import safe_open
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            t = {k: f.get_tensor(k).to(device) for k in f.keys()}
    except Exception:  # a corrupt checkpoint is recomputed, never trusted
        return None
    lin = {r: (t[f"w.{r}"], t.get(f"b.{r}")) for r in ROLES}
    clips = {k[9:]: (t[k], t[f"clip_min.{k[9:]}"]) for k in t if k.startswith("clip_max.")}
    return BlockWeights(lin, t["norm_attn"], t["norm_mlp"]), clips, json.loads(meta["info"])


def _block_loss(bm: BlockMath, data: dict, idx, rope, weights: BlockWeights, q_fn, loss_w: dict,
                w_fp: BlockWeights) -> torch.Tensor:
    """The calibration loss of the quantized block (weights, q_fn) on the samples idx."""
    y, logp = bm.forward(data["x_q"][idx], rope, weights, q_fn, want_logp="akl" in loss_w)
    loss = y.new_zeros(())
    if "dlc" in loss_w:
        loss = loss + loss_w["dlc"] * dlc_loss(y, data["y_fp"][idx], data["y_fps"][idx])
    if "mse" in loss_w:
        loss = loss + loss_w["mse"] * F.mse_loss(y, data["y_fp"][idx])
    if "mse_star" in loss_w:
        loss = loss + loss_w["mse_star"] * F.mse_loss(y, data["y_fps"][idx])
    if "akl" in loss_w:
        with torch.no_grad():
            logp_fp = bm.forward(data["x_fp"][idx], rope, w_fp, want_logp=True)[1]
        loss = loss + loss_w["akl"] * akl_loss(logp, logp_fp)
    return loss


@torch.no_grad()
def _mean_loss(bm: BlockMath, data: dict, rope, weights: BlockWeights, q_fn, opts: CalibOptions,
               w_fp: BlockWeights) -> float:
    """_block_loss over every calibration sample (batches of opts.batch), averaged: one number to compare
    two settings of a block by."""
    n = data["x_q"].shape[0]
    batches = [slice(i, min(i + opts.batch, n)) for i in range(0, n, opts.batch)]
    total = sum(float(_block_loss(bm, data, b, rope, weights, q_fn, opts.loss, w_fp)) * (b.stop - b.start)
                for b in batches)
    return total / max(n, 1)


def _train(params: BlockParams, data: dict, rope, opts: CalibOptions, epochs: int, gen: torch.Generator,
           w_fp: BlockWeights, act_sym: bool, w_sym: bool):
    """AdamW over the block's parameters; returns (loss curve per epoch, status). Keeps the best epoch."""
    bm = params.bm
    loss_w = opts.loss
    clip_p, rest_p = params.groups()
    groups = [g for g in ({"params": clip_p, "lr": opts.lr_clip}, {"params": rest_p, "lr": opts.lr_smooth}) if g["params"]]
    if not groups or epochs == 0:
        return [], "not trained"
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    x_q = data["x_q"]
    n = x_q.shape[0]
    curve, status = [], "ok"
    best, best_state = float("inf"), {k: v.detach().clone() for k, v in params.state_dict().items()}
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x_q.device)
        total, steps = 0.0, 0
        for i in range(0, n, opts.batch):
            idx = perm[i:i + opts.batch]
            loss = _block_loss(bm, data, idx, rope, params.float_weights(),
                               quant_linear_fn(params.pairs, params.clips(), act_sym, w_sym), loss_w, w_fp)
            if not torch.isfinite(loss):
                status = "non-finite loss: reverted to the best parameters so far"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        if status != "ok":
            break
        curve.append(total / max(steps, 1))
        if curve[-1] < best:
            best = curve[-1]
            best_state = {k: v.detach().clone() for k, v in params.state_dict().items()}
    params.load_state_dict(best_state)
    return curve, status


def make_calibrate(method: str = "abq", options: CalibOptions | dict | None = None):
    """The clip-learning pass with the loss of `method` ("abq" or "lwc-mse")."""
    if method not in LOSSES:
        raise AbqcError(f"unknown calibration method {method!r}; known: {', '.join(LOSSES)}")
    if isinstance(options, CalibOptions):
        opts = options
    else:
        unknown = set(options or {}) - {f.name for f in dataclasses.fields(CalibOptions)}
        if unknown:
            raise AbqcError(f"unknown calibration options {sorted(unknown)}; known: "
                            f"{', '.join(f.name for f in dataclasses.fields(CalibOptions))}")
        opts = CalibOptions(**(options or {}))
    opts = opts.validate(method)

    def calibrate(captured: CapturedModel, ctx: PassContext):
        ids = ctx.need_calib(method)[:opts.samples]
        dev = ctx.calib_device()
        model = captured.model
        n_layers = len(captured.blocks)
        comp_layers = opts.compensation_layers
        if comp_layers is None:
            comp_layers = ctx.state.get("sensitivity", {}).get("compensation_layers")
        if comp_layers is None:
            comp_layers = [i for i in range(n_layers) if i <= 2 or i >= n_layers - 4]
        comp_layers = set(comp_layers) if opts.compensation else set()
        x_fp = embed_inputs(model, ids, dev)
        x_q = x_fp.clone()
        rope = rope_tables(model, ids.shape[1], dev)
        qweights = ctx.state.setdefault("qweights", {})
        ckpt = Path(opts.checkpoint_dir) if opts.checkpoint_dir else None
        if ckpt:
            ckpt.mkdir(parents=True, exist_ok=True)
        details, warnings, resumed = [], [], 0
        for block in progress(captured.blocks, ctx, method):
            t0 = time.perf_counter()
            bm = BlockMath(block.module, model.config)
            pairs = {r: p for r in ROLES if not (p := ctx.bits.for_linear(block.index, r)).is_fp}
            w_fp = bm.weights(dev)
            fp_fn = lambda xb, w=w_fp: bm.forward(xb, rope, w)[0]  # noqa: E731
            y_fp = batched(fp_fn, x_fp)
            key = _block_key(ids, ctx, opts, method, block.index, w_fp)
            path = ckpt / f"block_{block.index:04d}.safetensors" if ckpt else None
            loaded = _load_checkpoint(path, key, dev) if path else None
            if loaded is not None:
                w_final, clips, info = loaded
                resumed += 1
            else:
                info = {"layer": block.index, "compensation": block.index in comp_layers}
                if not torch.isfinite(x_q).all() or not torch.isfinite(y_fp).all():
                    raise NumericalError(f"block {block.index}: non-finite activations in calibration (NaN/inf) even "
                                    "before quantizing this block; check the model's FP outputs on the calibration data")
                w_final, clips = w_fp, {}
                if pairs:
                    epochs = opts.epochs_2bit if min(p.w_bits for p in pairs.values()) <= 2 else opts.epochs
                    scales = init_scales(bm, w_fp, input_absmax(bm, w_fp, x_q, rope), opts.alpha,
                                         bm.smoothing_pairs(opts.pairs))
                    params = BlockParams(bm, w_fp, pairs, opts, scales, block.index in comp_layers)
                    data = {"x_q": x_q, "x_fp": x_fp, "y_fp": y_fp, "y_fps": batched(fp_fn, x_q)}
                    gen = torch.Generator().manual_seed(ctx.seed * 100003 + block.index)
                    curve, status = _train(params, data, rope, opts, epochs, gen, w_fp,
                                           ctx.act_symmetric, ctx.weight_symmetric)
                    with torch.no_grad():
                        w_final = params.float_weights()
                        w_final = BlockWeights({r: (w.detach(), None if b is None else b.detach())
                                                for r, (w, b) in w_final.linears.items()},
                                               w_final.norm_attn.detach(), w_final.norm_mlp.detach())
                        clips = {r: (a.detach(), b.detach()) for r, (a, b) in params.clips().items()}
                    finite = all(torch.isfinite(w).all() for w, _ in w_final.linears.values()) and \
                        torch.isfinite(w_final.norm_attn).all() and torch.isfinite(w_final.norm_mlp).all()
                    if not finite:
                        status = "non-finite weights after training: fell back to RTN for this block"
                        w_final, clips = w_fp, {}
                    elif opts.keep_rtn_if_better and curve:
                        # never worse than the starting point a user could have had for free: the same loss,
                        # over every sample, of the trained block and of plain RTN (no smoothing, no clipping)
                        loss_cal = _mean_loss(bm, data, rope, w_final, quant_linear_fn(
                            pairs, clips, ctx.act_symmetric, ctx.weight_symmetric), opts, w_fp)
                        loss_rtn = _mean_loss(bm, data, rope, w_fp, quant_linear_fn(
                            pairs, {}, ctx.act_symmetric, ctx.weight_symmetric), opts, w_fp)
                        info |= {"loss_calibrated": round(loss_cal, 6), "loss_rtn": round(loss_rtn, 6)}
                        if loss_rtn < loss_cal:
                            status = (f"calibrated loss {loss_cal:.4g} above plain RTN's {loss_rtn:.4g}: kept RTN "
                                      "for this block")
                            w_final, clips = w_fp, {}
                    del data
                    if status != "ok":
                        warnings.append(f"layer {block.index}: {status}")
                    info |= {"epochs": epochs, "status": status, "loss_curve": [round(v, 6) for v in curve]}
                    info |= {"clip_alpha": _quantiles(torch.cat([c[0].flatten() for c in clips.values()]))
                             if clips else [],
                             "clip_beta": _quantiles(torch.cat([c[1].flatten() for c in clips.values()]))
                             if clips else [],
                             "smooth_scales": _quantiles(torch.cat([s.detach().abs().flatten()
                                                                    for s in params.smooth.values()]))
                             if len(params.smooth) else []}
                if path:
                    _save_checkpoint(path, key, w_final, clips, info)
            # finish: the same arithmetic whether the block was trained now or loaded from a checkpoint
            bm.write(w_final)
            for role, pair in pairs.items():
                cmax, cmin = clips.get(role, (None, None))
                qw = quant.quantize_weight(w_final.linears[role][0], **quant.weight_grid_of(pair, ctx.weight_symmetric),
                                           clip_max=cmax, clip_min=cmin)
                qweights[(block.index, role)] = (pair, qw.to(bm.module(role).weight.device))
            q_fn = quant_linear_fn(pairs, clips, ctx.act_symmetric, ctx.weight_symmetric)
            x_q = batched(lambda xb: bm.forward(xb, rope, w_final, q_fn)[0], x_q)
            x_fp = y_fp
            details.append(info | {"seconds": round(time.perf_counter() - t0, 3)})
        summary = {"method": method, "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "device": str(dev),
                   "compensation_layers": sorted(comp_layers), "warnings": warnings, "resumed_blocks": resumed,
                   "options": {k: v for k, v in dataclasses.asdict(opts).items()}}
        final = [d["loss_curve"][-1] for d in details if d.get("loss_curve")]
        if final:
            summary["mean_final_loss"] = round(sum(final) / len(final), 6)
        return captured, PassReport(method, summary, details)

    return calibrate

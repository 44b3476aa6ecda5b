"""End-to-end benchmark: prefill latency (TTFT), decode time per output token (TPOT) and GPU memory of a
whole LLaMA-7B-shaped model (random weights) in FP16, a torch._int_mm W8A8 baseline and abqc W2A8/W4A4/W4A8.

    python benchmarks/e2e.py [--layers 32] [--batches 1 8 32] [--prompt 512] [--steps 64] [--deadline 450]
    python benchmarks/e2e.py --check-ppl       # the real default model: abqc W4A8 (RTN) PPL on GPU vs CPU
    python benchmarks/e2e.py --render          # rewrite e2e.md from e2e.json (+ e2e_ppl.json, e2e_compiled.json's targets)
    python benchmarks/e2e.py --dry-run         # the whole flow on CPU, tiny shape, written to the temp folder

Every implementation starts from the same random FP16 weights (seeded; built on the meta device and filled
on the GPU, so building takes seconds) and runs the Hugging Face forward with its KV cache:
  fp16   the HF model as is (cuBLAS, SDPA attention)
  w8a8   every decoder linear swapped for W8A8Linear: per-channel int8 weights, per-token int8 activations,
         torch._int_mm, quantize and dequantize steps fused by torch.compile when it works (else eager)
  abqc   abqc.compile(model, bits, method="rtn"): RTN weights (no calibration; speed does not depend on it),
         the generated bit-plane kernels on the GPU, q/k/v and gate/up fused (fuse_projections; --no-fuse)
Per (impl, batch): TTFT = prefill of a `--prompt`-token prompt into a fresh DynamicCache plus the first
greedy token; TPOT = mean time of `--steps` greedy decode steps after it (eager HF loop, what generate()
does); both the median of `--repeats` runs after a warm-up, CUDA-synchronised. TPOT (graph) replays one
decode step captured in a CUDA graph with a StaticCache: the same kernels without Python launch overhead,
what a serving engine sees. Peak memory is torch.cuda.max_memory_allocated, reset before each batch.
Invariant: every record of a run shares the weights, the prompt tokens and the GPU; results are rewritten
after each record, so a run stopped by --deadline or a failure keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
# benchmarks/ is never on the import path: its kernels.py would shadow Hugging Face's `kernels` package,
# which transformers imports; sibling scripts are imported as benchmarks.<name> from the repository root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(ROOT.parent))

import abqc  # noqa: E402
from benchmarks.provenance import software  # noqa: E402
from benchmarks.w8a8 import W8A8Linear, quantize_rows, w8a8_kernels  # noqa: E402,F401 (quantize_rows: tests)

IMPLS = ("fp16", "w8a8", "w2a8", "w4a4", "w4a8")
GIB = 1024 ** 3
WARM_STEPS = 3            # eager decode steps before a CUDA-graph capture (loads kernels, fills the cache)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    heads: int
    layers: int
    vocab: int

    def describe(self) -> str:
        return (f"{self.name} (hidden {self.hidden}, intermediate {self.inter}, {self.heads} heads, "
                f"{self.layers} layers, vocab {self.vocab}), random weights")


LLAMA_7B = Shape("LLaMA-7B-shaped", 4096, 11008, 32, 32, 32000)
TINY = Shape("tiny Llama (dry run)", 256, 688, 4, 2, 1024)


# ---------------------------------------------------------------- models

def llama_config(shape: Shape):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, num_hidden_layers=shape.layers, vocab_size=shape.vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The HF Llama of `shape` with seeded random weights, built on the meta device and filled in place
    (initialising 6.7B parameters the HF way on the CPU would take minutes)."""
    from transformers import AutoModelForCausalLM
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)                                     # RMSNorm gains
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
    # to_empty left the rotary inverse frequencies (a computed, non-persistent buffer) uninitialised
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, type(mod)(cfg).to(device))
    return model.eval()


def to_w8a8(model: nn.Module, quant, dequant) -> nn.Module:
    """Swap every decoder-layer nn.Linear (q k v o gate up down) for W8A8Linear; lm_head stays FP16."""
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent), leaf, W8A8Linear(mod, quant, dequant))
    return model


def build(impl: str, shape: Shape, device, dtype, seed: int, w8a8_eager: bool,
          fuse: bool = True, compile_rest: bool = False) -> tuple[nn.Module, str]:
    """(model on device, note) for one implementation, from the same seeded random FP16 weights."""
    t0 = time.perf_counter()
    model = random_model(shape, device, dtype, seed)
    if impl == "fp16":
        note = "HF model as is"
    elif impl == "w8a8":
        quant, dequant, how = w8a8_kernels(device, w8a8_eager)
        model, note = to_w8a8(model, quant, dequant), f"torch._int_mm W8A8 (on CUDA M <= 16 padded to 17), {how}"
    else:
        # inplace: a 7B model and its deep copy would not both need to fit; the FP16 weights go as they are lowered
        model = abqc.compile(model, bits=impl, method="rtn", progress=False, inplace=True).to(device)
        note = "abqc RTN (no calibration; speed does not depend on it), bit-plane kernels"
        if fuse:
            note += f", q/k/v and gate/up fused ({len(model.fuse_projections())} groups)"
    if compile_rest:   # every impl alike: the model's own ops fused by Inductor; abqc's linears are opaque nodes
        # prefill, decode and each batch are new shapes: at dynamo's default limit (8) the H200 run's FP16 model
        # hit it at batch 8 and ran its later shapes eagerly, so the limit is raised for this benchmark
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        model.forward = torch.compile(model.forward)
        note += ("; model forward torch.compile'd" + ("" if impl in ("fp16", "w8a8") else
                                                      " (abqc linears: abqc::tiled_linear nodes, no graph break)"))
    gc.collect()    # the replaced FP16 linears may sit in reference cycles (export graphs): free them before timing
    return model, f"{note}; built in {time.perf_counter() - t0:.1f} s"


def weight_bytes(model: nn.Module) -> int:
    """Resident weight bytes: parameters, buffers and QuantLinear's tiled planes (on CUDA its only copy)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) + tiled_bytes(model)


def tiled_bytes(model: nn.Module) -> int:
    """Bytes of the GPU kernels' tiled weight layout (QuantLinear drops its canonical planes once tiled)."""
    return sum(m._w_tiled.numel() * m._w_tiled.element_size() for m in model.modules()
               if m.__dict__.get("_w_tiled") is not None)


# ---------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def eager_run(model, ids: torch.Tensor, steps: int) -> tuple[float, float, torch.Tensor]:
    """(TTFT s, TPOT s, generated tokens [B, steps + 1]): prefill into a fresh DynamicCache, then greedy steps."""
    dev = ids.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    tok = _next(out.logits)
    _sync(dev)
    t1 = time.perf_counter()
    cache, toks = out.past_key_values, [tok]
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = _next(out.logits)
        toks.append(tok)
    _sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(steps, 1), torch.cat(toks, 1)


def _positions(model, pos: torch.Tensor) -> dict:
    """Explicit positions for a StaticCache step (never read back from the cache: that would sync)."""
    kw = {"position_ids": pos.view(1, -1)}
    if "cache_position" in inspect.signature(type(model.model).forward).parameters:
        kw["cache_position"] = pos      # transformers releases whose static cache is indexed by it
    return kw


@torch.no_grad()
def static_decode(model, ids: torch.Tensor, steps: int, graph: bool) -> tuple[float | None, torch.Tensor]:
    """Greedy decode with a StaticCache. Returns (TPOT s of CUDA-graph replays or None, the first tokens,
    decoded eagerly on the static cache: min(WARM_STEPS, steps) + 1). graph=False stops after those."""
    from transformers import StaticCache
    dev, p = ids.device, ids.shape[1]
    warm = min(WARM_STEPS, steps)
    cache = StaticCache(config=model.config, max_cache_len=p + warm + steps + 1)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                **_positions(model, torch.arange(p, device=dev)))
    tok = _next(out.logits)
    cur = torch.full((1,), p, dtype=torch.long, device=dev)
    toks = [tok.clone()]

    def step():
        o = model(tok, past_key_values=cache, use_cache=True, **_positions(model, cur))
        tok.copy_(_next(o.logits))
        cur.add_(1)

    side = torch.cuda.Stream(dev) if graph else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(warm):
            step()
            toks.append(tok.clone())
    if not graph:
        return None, torch.cat(toks, 1)
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        g.replay()
    _sync(dev)
    tpot = (time.perf_counter() - t0) / max(steps, 1)
    if int(cur) != p + warm + steps:   # the position update is inside the graph: replays must advance it
        raise RuntimeError(f"graph replays advanced the position to {int(cur)}, not {p + warm + steps}")
    del g
    return tpot, torch.cat(toks, 1)


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if n.startswith("abqc_"):
        return "abqc " + n.split("_")[1] + ("" if n.split("_")[1] not in ("quant", "int8") else "_" + n.split("_")[2])
    if any(t in n for t in ("gemv", "gemm", "xmma", "nvjet", "cutlass", "splitk", "matmul", "int8", "cublas")):
        return "GEMM/GEMV (cuBLAS & co.)"
    if "attention" in n or "fmha" in n or "flash" in n or "sdpa" in n:
        return "attention"
    return "other (elementwise, norms, copies, reductions)"


@torch.no_grad()
def profile_decode(model, ids: torch.Tensor, steps: int = 4) -> dict:
    """GPU kernel time of eager static-cache decode steps by kernel kind and name (torch.profiler, CUPTI):
    what a CUDA-graph step cannot be faster than. Batch = ids rows; launches per step counted too."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache
    dev, p = ids.device, ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + steps + WARM_STEPS + 1)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                **_positions(model, torch.arange(p, device=dev)))
    tok, cur = _next(out.logits), torch.full((1,), p, dtype=torch.long, device=dev)

    def step():
        o = model(tok, past_key_values=cache, use_cache=True, **_positions(model, cur))
        tok.copy_(_next(o.logits))
        cur.add_(1)

    for _ in range(WARM_STEPS):
        step()
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(dev)
    names: dict = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = getattr(e, "cuda_time_total", 0) if us is None else us
        if us and e.count:
            names[e.key] = (names.get(e.key, (0, 0))[0] + us / steps, names.get(e.key, (0, 0))[1] + e.count / steps)
    kinds: dict = {}
    for name, (us, n) in names.items():
        k = kinds.setdefault(_kernel_kind(name), [0.0, 0.0])
        k[0] += us
        k[1] += n
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:15]
    return {"steps": steps, "kernel_us_per_step": round(sum(v[0] for v in names.values()), 1),
            "launches_per_step": round(sum(v[1] for v in names.values()), 1),
            "kinds": {k: {"us": round(v[0], 1), "launches": round(v[1], 1)} for k, v in
                      sorted(kinds.items(), key=lambda kv: -kv[1][0])},
            "top": [{"name": n[:90], "us": round(v[0], 1), "launches": round(v[1], 1)} for n, v in top]}


def write_profile(profiles: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_profile.json").write_text(json.dumps(profiles, indent=1))
    lines = ["# Decode step: GPU kernel time by kind (torch.profiler)", "",
             "Eager static-cache decode steps, averaged; the sum of kernel times is a floor for the CUDA-graph "
             "step (a graph removes launch gaps, not kernels).", ""]
    for p in profiles:
        lines += [f"## {p['impl']} batch {p['batch']} ({p['gpu']})", ""] + ([p["note"], ""] if p.get("note") else [])
        lines += [
                  f"{p['kernel_us_per_step']:.0f} µs of kernels in {p['launches_per_step']:.0f} launches per step.", "",
                  "| kind | µs / step | launches / step |", "|---|---|---|"]
        lines += [f"| {k} | {v['us']:.1f} | {v['launches']:.0f} |" for k, v in p["kinds"].items()]
        lines += ["", "| kernel | µs / step | launches / step |", "|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['us']:.1f} | {t['launches']:.0f} |" for t in p["top"]] + [""]
    (out / "e2e_profile.md").write_text("\n".join(lines))


def measure(model, ids: torch.Tensor, steps: int, repeats: int, graphs: bool) -> dict:
    """Timings of one (impl, batch): medians over repeats after one warm-up, plus the static-cache check."""
    dev = ids.device
    eager_run(model, ids, min(steps, WARM_STEPS))               # warm-up: kernels compiled, caches allocated
    runs = [eager_run(model, ids, steps) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    tpot = statistics.median(r[1] for r in runs)
    eager_tokens = runs[0][2]
    out = {"ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "tpot_graph_ms": None, "notes": []}
    use_graph = graphs and dev.type == "cuda"
    try:
        g_tpot, static_tokens = static_decode(model, ids, steps, use_graph)
        n = min(static_tokens.shape[1], eager_tokens.shape[1])
        same = bool(torch.equal(static_tokens[:, :n], eager_tokens[:, :n]))
        out["static_tokens_match"] = same
        out["notes"].append(f"static-cache greedy tokens {'=' if same else '!='} eager ones over {n} steps")
        if g_tpot is not None:
            out["tpot_graph_ms"] = g_tpot * 1e3
    except Exception as e:  # a capture failure must not cost the eager numbers of this run
        out["notes"].append(f"CUDA-graph decode failed: {_line(e)}")
    return out


# ---------------------------------------------------------------- results

def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _ratio(num, den) -> str:
    return "" if not num or not den else f"{num / den:.2f}"


def _fmt(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def write_results(records: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(records, indent=1))
    (out / "e2e.md").write_text(markdown(records, out))


def markdown(records: list[dict], out: Path) -> str:
    """The table: per (impl, batch) times, memory and speed-ups against FP16 and W8A8 of the same run,
    the issue's targets, the targets of the --compile run when out/e2e_compiled.json exists (kept beside
    the eager table: its every model pays minutes of Inductor compilation), and the PPL check when
    out/e2e_ppl.json exists."""
    records = sorted(records, key=lambda r: (IMPLS.index(r["impl"]), r["batch"]))
    ran = [r for r in records if r["status"] != "skipped"]
    ref = {(r["impl"], r["batch"]): r for r in ran}
    first = records[0] if records else {}
    runs = list(dict.fromkeys(f"`{r['command']}` ({r['software']}, {r['gpu']})" for r in records))
    lines = [f"# End-to-end benchmark ({', '.join(sorted({r['gpu'] for r in records})) or '?'})", "",
             ("Command: " if len(runs) == 1 else "Commands (merged with --append): ") + "; ".join(runs), "",
             f"Model: {first.get('model_shape', '?')} ({first.get('layers', '?')} layers run); "
             f"prompt {first.get('prompt', '?')} tokens, {first.get('steps', '?')} greedy decode steps, median of "
             f"{first.get('repeats', '?')} runs after a warm-up. Random weights: speed and memory only, the tokens "
             "mean nothing. abqc rows are RTN-quantized (no calibration). TTFT = prefill + first token; TPOT = "
             "eager HF decode loop with a DynamicCache (Python launch overhead included, as generate() has it); "
             "TPOT graph = one decode step with a StaticCache captured in a CUDA graph and replayed. "
             "× = reference time / this time (above 1: faster), for TTFT and for decode (graph TPOT where both "
             "rows have one, eager otherwise). Peak memory: torch.cuda.max_memory_allocated, reset before each "
             "batch (weights + KV caches + activations of that batch's runs). Weights: resident weight bytes "
             "(parameters, buffers and abqc's tiled bit-planes, which on the GPU replace its canonical planes; "
             "tiled column: that part).", "",
             "| impl | bits | batch | TTFT ms | TPOT ms | TPOT graph ms | tok/s | TTFT × FP16 | decode × FP16 | "
             "decode × W8A8 | peak GiB | weights GiB | weights / FP16 | tiled GiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ran:
        fp, i8 = ref.get(("fp16", r["batch"]), {}), ref.get(("w8a8", r["batch"]), {})
        best = r.get("tpot_graph_ms") or r.get("tpot_ms")
        tok_s = "" if not best else f"{r['batch'] * 1e3 / best:.0f}"
        lines.append(
            f"| {r['impl']} | {r['bits']} | {r['batch']} | {_fmt(r['ttft_ms'])} | {_fmt(r['tpot_ms'])} | "
            f"{_fmt(r.get('tpot_graph_ms'))} | {tok_s} | {_ratio(fp.get('ttft_ms'), r['ttft_ms'])} | "
            f"{_ratio(*_decode_pair(fp, r))} | {_ratio(*_decode_pair(i8, r))} | {_fmt(r['peak_mem_gib'])} | "
            f"{_fmt(r['weight_gib'], 3)} | {_ratio(r['weight_gib'], fp.get('weight_gib'))} | "
            f"{_fmt(r.get('tiled_copy_gib'), 3)} | {r['note']} |")
    lines += ["", "## Issue 5 targets (batch 1)", ""] + targets(ref)
    skipped = [f"{r['impl']} batch {r['batch']}" for r in records if r["status"] == "skipped"]
    if skipped:
        lines += ["", f"Not run (--deadline reached): {', '.join(skipped)}."]
    compiled = out / "e2e_compiled.json"
    if compiled.exists() and not any("--compile" in r["command"] for r in records):
        crecs = [r for r in json.loads(compiled.read_text()) if r["status"] != "skipped"]
        cruns = list(dict.fromkeys(f"`{r['command']}` ({r['software']}, {r['gpu']})" for r in crecs))
        lines += ["", "## Issue 5 targets with torch.compile (batch 1; table: e2e_compiled.md)", "",
                  "The same model and measurements with every model's forward torch.compile'd (norms, rotary, "
                  "residuals fused by Inductor; abqc linears as abqc::tiled_linear nodes): " + "; ".join(cruns),
                  ""] + targets({(r["impl"], r["batch"]): r for r in crecs})
    ppl = out / "e2e_ppl.json"
    if ppl.exists():
        p = json.loads(ppl.read_text())
        lines += ["", "## Correctness: real default model on GPU vs CPU", "",
                  f"{p['model']} ({p.get('model_source', 'the shipped Q4_1 GGUF, dequantized to FP by transformers')}), "
                  f"corpus {p.get('corpus', 'wiki')} (held-out split), abqc {p['bits']} ({p['method']}), "
                  f"{p['windows']} windows x {p['seqlen']} tokens: "
                  f"PPL CPU {p['ppl_cpu']:.4f}, GPU ({p['gpu']}) {p['ppl_gpu']:.4f}, relative difference "
                  f"{p['rel_diff'] * 100:.3f}% (target <= 0.5%: {'met' if p['ok'] else 'NOT met'}). "
                  f"Command: `{p['command']}`" + (f" ({p['software']})" if p.get("software") else "")]
    return "\n".join(lines) + "\n"


def _decode_pair(ref: dict, r: dict):
    """(reference TPOT, this TPOT) on the same footing: graph times when both have them."""
    if ref.get("tpot_graph_ms") and r.get("tpot_graph_ms"):
        return ref["tpot_graph_ms"], r["tpot_graph_ms"]
    return ref.get("tpot_ms"), r.get("tpot_ms")


def targets(ref: dict) -> list[str]:
    w2, fp, i8 = ref.get(("w2a8", 1)), ref.get(("fp16", 1)), ref.get(("w8a8", 1))
    if not (w2 and fp and w2.get("tpot_ms") and fp.get("tpot_ms")):
        return ["W2A8 or FP16 at batch 1 was not measured."]
    rows = []
    for name, base, goal in (("FP16", fp, 2.0), ("W8A8", i8, 1.6)):
        if base and base.get("tpot_ms"):
            b, t = _decode_pair(base, w2)
            verdict = "met" if b / t >= goal else "not met"
            rows.append(f"- W2A8 decode vs {name}: {b / t:.3f}× (target ≥ {goal}×: {verdict})")
    frac = w2["weight_gib"] / fp["weight_gib"]
    rows.append(f"- W2A8 weights / FP16 weights: {frac:.3f} (target ≤ 0.2: {'met' if frac <= 0.2 else 'not met'}; "
                "resident bytes, the tiled planes included)")
    return rows


# ---------------------------------------------------------------- runs

def hardware(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"


def measure_record(model, base: dict, ids: torch.Tensor, args, build_note: str, wgib: float) -> dict:
    """One (impl, batch) record; a failure is recorded, not raised, so the other points still run."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rec = {**base, "batch": ids.shape[0], "weight_gib": round(wgib, 4), "tpot_graph_ms": None}
    try:
        m = measure(model, ids, args.steps, args.repeats, not args.no_graphs)
        rec.update(status="ok", ttft_ms=round(m["ttft_ms"], 3), tpot_ms=round(m["tpot_ms"], 3),
                   static_tokens_match=m.get("static_tokens_match"), note="; ".join([build_note, *m["notes"]]))
        if m["tpot_graph_ms"] is not None:
            rec["tpot_graph_ms"] = round(m["tpot_graph_ms"], 3)
    except Exception as e:
        rec.update(status="failed", ttft_ms=None, tpot_ms=None, note=f"{build_note}; failed: {_line(e)}")
    rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None
    tiled = tiled_bytes(model)
    rec["tiled_copy_gib"] = round(tiled / GIB, 4) if tiled else None
    return rec


def bench(args, device: torch.device, dtype: torch.dtype, shape: Shape, command: str) -> list[dict]:
    out, records, profiles = Path(args.out), [], []
    if args.append and (out / "e2e.json").exists():
        redo = {(i, b) for i in args.impls for b in args.batches}
        records = [r for r in json.loads((out / "e2e.json").read_text()) if (r["impl"], r["batch"]) not in redo]
    t_start = time.perf_counter()
    # one generator per batch size: a point's prompt does not depend on which other points run
    prompts = {b: torch.randint(0, shape.vocab, (b, args.prompt), generator=torch.Generator().manual_seed(
        args.seed * 1000 + b)) for b in args.batches}

    def late() -> bool:
        return bool(args.deadline) and time.perf_counter() - t_start > args.deadline

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    for impl in args.impls:
        base = {"gpu": hardware(device), "model_shape": shape.describe(), "impl": impl,
                "bits": "w16a16" if impl == "fp16" else impl, "layers": shape.layers, "prompt": args.prompt,
                "steps": args.steps, "repeats": args.repeats, "command": command, "software": software()}
        empty = {"ttft_ms": None, "tpot_ms": None, "peak_mem_gib": None, "weight_gib": None}
        if late():
            records += [{**base, **empty, "batch": b, "status": "skipped", "note": "not run: --deadline reached"}
                        for b in args.batches]
            write_results(records, out)
            continue
        log(f"building {impl}")
        try:
            model, build_note = build(impl, shape, device, dtype, args.seed, args.w8a8_eager, not args.no_fuse,
                                      args.compile)
        except Exception as e:
            records += [{**base, **empty, "batch": b, "status": "failed", "note": f"build failed: {_line(e)}"}
                        for b in args.batches]
            write_results(records, out)
            continue
        wgib = weight_bytes(model) / GIB
        for b in args.batches:
            if late():
                records.append({**base, **empty, "batch": b, "status": "skipped",
                                "note": "not run: --deadline reached"})
                continue
            rec = measure_record(model, base, prompts[b].to(device), args, build_note, wgib)
            records.append(rec)
            if args.profile and b in args.profile and device.type == "cuda":
                try:
                    prof = profile_decode(model, prompts[b].to(device))
                    profiles.append({"impl": impl, "batch": b, "gpu": base["gpu"], "note": build_note, **prof})
                    write_profile(profiles, out)
                except Exception as e:   # the profile is extra: never lose the timings for it
                    log(f"profile of {impl} batch {b} failed: {_line(e)}")
            write_results(records, out)
            log(f"{impl:>5} batch {b:>3}: TTFT {_fmt(rec['ttft_ms'])} ms, TPOT {_fmt(rec['tpot_ms'])} ms "
                f"(graph {_fmt(rec['tpot_graph_ms'])}), peak {_fmt(rec['peak_mem_gib'])} GiB, weights {wgib:.3f} GiB"
                + ("" if rec["status"] == "ok" else f" -- {rec['note']}"))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_results(records, out)
    return records


def ppl_check(model: nn.Module, ids: torch.Tensor, bits: str, limit: int, seqlen: int, device: str) -> dict:
    """abqc `bits` (RTN) perplexity of `model` on CPU, then of the same compiled model moved to `device`."""
    qmodel = abqc.compile(model, bits=bits, method="rtn", progress=False)
    cpu = abqc.evaluate(qmodel, ids=ids, limit=limit, seqlen=seqlen, progress=False)
    other = abqc.evaluate(qmodel.to(device), ids=ids, limit=limit, seqlen=seqlen, progress=False)
    rel = abs(other["ppl"] - cpu["ppl"]) / cpu["ppl"]
    return {"bits": bits, "method": "rtn", "windows": cpu["windows"], "seqlen": seqlen, "ppl_cpu": cpu["ppl"],
            "ppl_gpu": other["ppl"], "rel_diff": rel, "ok": rel <= 0.005}


def run_check_ppl(args, command: str) -> int:
    from abqc import data
    model, tok, info = abqc.load()
    ids = data.tokenize(tok, data.split_text("wiki", "eval"))
    rec = ppl_check(model, ids, "w4a8", args.ppl_limit, args.ppl_seqlen, "cuda")
    rec.update(model=info.name, gpu=torch.cuda.get_device_name(), command=command, software=software(), corpus="wiki")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_ppl.json").write_text(json.dumps(rec, indent=1))
    print(f"{info.name} abqc w4a8 (RTN), {rec['windows']} windows x {rec['seqlen']}: PPL CPU {rec['ppl_cpu']:.4f}, "
          f"GPU {rec['ppl_gpu']:.4f}, relative difference {rec['rel_diff'] * 100:.3f}% "
          f"({'within' if rec['ok'] else 'OUTSIDE'} 0.5%)", flush=True)
    return 0 if rec["ok"] else 1


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; the dry run uses 2)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 32 (dry run: 1)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens for TTFT (default 512; dry run 8)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps for TPOT (default 64; dry run 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per point (default 3; dry run 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph decode timing")
    ap.add_argument("--w8a8-eager", action="store_true", help="do not torch.compile the W8A8 quantize/dequantize")
    ap.add_argument("--no-fuse", action="store_true", help="abqc rows: keep q/k/v and gate/up as separate linears")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every model's forward (norms, rotary, residuals fused by Inductor; abqc "
                         "linears as abqc::tiled_linear nodes, no graph breaks); compile time is paid in the warm-up")
    ap.add_argument("--profile", nargs="*", type=int, default=None, metavar="BATCH",
                    help="also profile decode kernels at these batches (default: batch 1) -> e2e_profile.{json,md}")
    ap.add_argument("--deadline", type=float, default=0, help="start no new (impl, batch) after this many seconds")
    ap.add_argument("--append", action="store_true",
                    help="keep the records of --out/e2e.json that this run does not redo (finish a run in parts)")
    ap.add_argument("--out", default=None, help="folder for e2e.json / e2e.md / e2e_ppl.json (default "
                    "benchmarks/results; a dry run writes to the temp folder unless told)")
    ap.add_argument("--check-ppl", action="store_true",
                    help="only the correctness run: real default model, abqc w4a8 RTN, PPL on GPU vs CPU")
    ap.add_argument("--ppl-limit", type=int, default=8, help="evaluation windows of the PPL check")
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape (2 layers, hidden 256), batch 1")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite --out/e2e.md from --out/e2e.json (and e2e_ppl.json when present)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    for name, full, small in (("batches", [1, 8, 32], [1]), ("prompt", 512, 8), ("steps", 64, 2),
                              ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if dry else full)
    if args.profile is not None and not args.profile:
        args.profile = [1]
    if args.out is None:   # a dry run must not overwrite the committed GPU results
        args.out = str(Path(tempfile.gettempdir()) / "abqc-e2e-dry-run" if dry else ROOT / "results")
    if min(args.batches) < 1 or args.prompt < 1 or args.steps < 1 or args.repeats < 1:
        ap.error("batches, --prompt, --steps and --repeats must be positive")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be positive")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python benchmarks/e2e.py " + " ".join(shlex.quote(a) for a in argv)
    out = Path(args.out)
    if args.render:
        if not (out / "e2e.json").exists():
            print(f"benchmarks/e2e.py: error: {out / 'e2e.json'} does not exist: run the benchmark first",
                  file=sys.stderr)
            return 2
        write_results(json.loads((out / "e2e.json").read_text()), out)
        return 0
    if not args.dry_run:
        from abqc.runtime import cuda as rcuda
        if not torch.cuda.is_available():
            print("benchmarks/e2e.py: error: no CUDA device (torch sees no GPU); run it on an sm_80+ NVIDIA GPU, or "
                  "pass --dry-run to exercise the flow on the CPU", file=sys.stderr)
            return 2
        if not rcuda.available():
            print("benchmarks/e2e.py: error: abqc's GPU runtime is unavailable (needs an sm_80+ GPU and "
                  "cuda-bindings): pip install -e \".[gpu]\"", file=sys.stderr)
            return 2
    if args.check_ppl:
        if args.dry_run:
            print("benchmarks/e2e.py: error: --check-ppl compares GPU with CPU and has no dry run", file=sys.stderr)
            return 2
        return run_check_ppl(args, command)
    base = TINY if args.dry_run else LLAMA_7B
    shape = dataclasses.replace(base, layers=args.layers or base.layers)
    device = torch.device("cpu" if args.dry_run else "cuda")
    records = bench(args, device, torch.float16, shape, command)
    count = {k: sum(r["status"] == k for r in records) for k in ("ok", "failed", "skipped")}
    print("\n".join(targets({(r["impl"], r["batch"]): r for r in records if r["status"] == "ok"})))
    print(f"{count['ok']} measured, {count['failed']} failed, {count['skipped']} skipped: {out / 'e2e.json'}, "
          f"{out / 'e2e.md'}")
    return 1 if count["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

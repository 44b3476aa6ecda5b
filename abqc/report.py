"""Render a compile report (report.json) as one self-contained HTML page with matplotlib plots.

Input: the dict `abqc.compile` writes ("passes": [{name, summary, details, seconds}], "bits", "eval", ...).
Each section reads only the pass details it needs and says "not run" when they are absent, so a
report from any pipeline renders (missing keys are skipped, never fatal).
Invariant: the page references nothing outside itself (plots are inline base64 PNGs, CSS inline).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from .bits import ROLES, parse_bits
from .errors import AbqcError, BitSpecError

CALIB_PASSES = ("abq", "lwc-mse", "calibrate")
_CSS = """body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.na{color:#999;font-style:italic}img{max-width:100%}
code{background:#f5f5f5;padding:1px 3px}"""


def _rows(report: dict, *names: str) -> list[dict]:
    """details rows (dicts) of every pass whose name is one of names (a "lower[real]" matches "lower")."""
    out = []
    for p in report.get("passes") or []:
        if isinstance(p, dict) and str(p.get("name", "")).split("[")[0] in names:
            out += [r for r in p.get("details") or [] if isinstance(r, dict)]
    return out


def _floats(values) -> list[float]:
    if not isinstance(values, (list, tuple)):
        return []
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out += _floats(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _na(what: str) -> str:
    return f'<p class="na">not run: {html.escape(what)}</p>'


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{html.escape(str(c))}</td>'
                                     for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


# ------------------------------------------------------------------ sections

def section_overview(report: dict) -> str:
    keys = ["model", "bits", "method", "model_type", "n_layers", "abqc_version", "seconds"]
    rows = []
    for k in keys:
        v = report.get(k)
        if v is not None:
            rows.append([k, v.get("name", json.dumps(v)) if isinstance(v, dict) else v])
    passes = [[p.get("name", "?"), p.get("seconds", ""), json.dumps(p.get("summary", {}))[:160]]
              for p in report.get("passes") or [] if isinstance(p, dict)]
    out = _table(["field", "value"], rows) if rows else _na("no model information in the report")
    return out + "<h2>Passes</h2>" + (_table(["pass", "seconds", "summary"], passes) if passes
                                      else _na("the report lists no passes"))


def section_ppl(report: dict) -> str:
    ev = report.get("eval")
    rows = []
    if isinstance(ev, dict):
        fp = ev.get("fp") if isinstance(ev.get("fp"), dict) else {}
        for name, res in ev.items():
            if isinstance(res, dict) and isinstance(res.get("ppl"), (int, float)):
                label = "fp (baseline)" if name == "fp" else (report.get("bits", name) if name == "quantized" else name)
                rel = f"{(res['ppl'] / fp['ppl'] - 1) * 100:+.1f}%" if fp.get("ppl") else ""
                rows.append([label, f"{res['ppl']:.3f}", rel, res.get("windows", ""), res.get("seqlen", ""),
                             res.get("corpus", "")])
    if not rows:
        return _na("perplexity was not evaluated (abqc compile --no-eval, or the Python API)")
    return _table(["bits", "PPL", "vs FP", "windows", "seqlen", "corpus"], rows)


def section_sensitivity(report: dict) -> str:
    rows = [r for r in _rows(report, "sensitivity") if isinstance(r.get("layer"), int)
            and isinstance(r.get("error"), (int, float))]
    if not rows:
        return _na("no 'sensitivity' pass in this pipeline")
    plt = _plt()
    layers = sorted({r["layer"] for r in rows})
    roles = [ro for ro in ROLES if any(r.get("role") == ro for r in rows)] or ["all"]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    width = 0.8 / len(roles)
    for i, ro in enumerate(roles):
        val = {r["layer"]: r["error"] for r in rows if r.get("role", "all") == ro}
        ax.bar([lay + i * width for lay in layers], [val.get(lay, 0) for lay in layers], width, label=ro)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("quantization error")
    ax.set_xticks([lay + 0.4 - width / 2 for lay in layers], layers, fontsize=7)
    ax.legend(ncol=len(roles), fontsize=8)
    return _png(fig)


def bit_map(report: dict) -> tuple[list[int], dict[tuple[int, str], str]]:
    """(layers, {(layer, role): pair}) from passes' per-linear rows, else from the report's bit spec."""
    cells = {}
    for r in _rows(report, "rtn", *CALIB_PASSES):
        if isinstance(r.get("layer"), int) and r.get("role") in ROLES and isinstance(r.get("bits"), str):
            cells[(r["layer"], r["role"])] = r["bits"]
    n = report.get("n_layers")
    if not cells and isinstance(n, int) and isinstance(report.get("bits"), str):
        try:
            spec = parse_bits(report["bits"])
        except BitSpecError:
            return [], {}
        cells = {(lay, ro): str(spec.for_linear(lay, ro)) for lay in range(n) for ro in ROLES}
    return sorted({lay for lay, _ in cells}), cells


def section_bitmap(report: dict) -> str:
    layers, cells = bit_map(report)
    if not cells:
        return _na("no per-linear bits in the report")
    plt = _plt()
    import numpy as np
    wbits = np.full((len(ROLES), len(layers)), np.nan)
    for (lay, ro), pair in cells.items():
        digits = pair.lower().lstrip("w").split("a")[0].rstrip("*")
        if digits.isdigit():
            wbits[ROLES.index(ro), layers.index(lay)] = int(digits)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.45 * len(layers)), 3.2))
    im = ax.imshow(wbits, aspect="auto", cmap="viridis_r", vmin=1, vmax=16)
    ax.set_yticks(range(len(ROLES)), ROLES)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("decoder layer")
    for (lay, ro), pair in cells.items():
        ax.text(layers.index(lay), ROLES.index(ro), pair.split("g")[0].replace("w", "").replace("a", "/"),
                ha="center", va="center", fontsize=6, color="white" if wbits[ROLES.index(ro), layers.index(lay)] < 6
                else "black")
    fig.colorbar(im, ax=ax, label="weight bits")
    return _png(fig) + "<p>Cells: weight/activation bits per layer and role (w16 = kept FP).</p>"


def section_clip_smooth(report: dict) -> str:
    rows = _rows(report, *CALIB_PASSES)
    series = {k: [v for r in rows for v in _floats(r.get(k))] for k in ("clip_alpha", "clip_beta", "smooth_scales")}
    sq = [r for r in _rows(report, "smoothquant") if all(isinstance(r.get(k), (int, float))
                                                         for k in ("scale_min", "scale_max"))]
    if not any(series.values()) and not sq:
        return _na("no learned clipping or smoothing in this pipeline (abq / lwc-mse / smoothquant passes)")
    plt = _plt()
    shown = [k for k, v in series.items() if v]
    out = ""
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.7 * len(shown), 2.8), squeeze=False)
        for ax, k in zip(axes[0], shown):
            ax.hist(series[k], bins=40, color="#457b9d")
            ax.set_title(k.replace("_", " ") + f" (n={len(series[k])})", fontsize=9)
            ax.set_yscale("log")
        out += _png(fig)
    else:
        out += _na("no learned clipping α/β (abq / lwc-mse passes)")
    if sq:
        fig, ax = plt.subplots(figsize=(11, 2.8))
        labels = [f"{r.get('layer', '?')}:{r.get('pair', '')}" for r in sq]
        lo, hi = [r["scale_min"] for r in sq], [r["scale_max"] for r in sq]
        ax.vlines(range(len(sq)), lo, hi, lw=4, color="#e76f51")
        ax.set_yscale("log")
        ax.set_ylabel("smoothing scale range")
        ax.set_xticks(range(len(sq)), labels, rotation=90, fontsize=6)
        out += _png(fig)
    return out


def section_loss(report: dict) -> str:
    rows = [r for r in _rows(report, *CALIB_PASSES) if _floats(r.get("loss_curve"))]
    if not rows:
        return _na("no calibration loss curves (abq / lwc-mse passes)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.4))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        ax.plot(_floats(r["loss_curve"]), color=cmap(i / max(len(rows) - 1, 1)), lw=1,
                label=f"layer {r.get('layer', i)}" if len(rows) <= 12 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("block loss")
    ax.set_yscale("log")
    if len(rows) <= 12:
        ax.legend(fontsize=7, ncol=4)
    else:
        ax.set_title("one curve per block, dark = first layer, yellow = last", fontsize=9)
    return _png(fig)


def _kernel_row(e: dict) -> list:
    """layer, role, bits, N×K, M, family, tile, µs (tuned) / "default" (untuned) / "—" (no bit-plane kernel),
    and how an online Hadamard on the input runs (fused / separate, with both times when tuned)."""
    tile = e.get("tile")
    us = e.get("us")
    if isinstance(us, (int, float)) and not isinstance(us, bool):
        timing = f"{us:.2f}"
    else:
        timing = "default" if str(e.get("source", "")).startswith("default") else "—"
    shape = f"{e['n']}×{e['k']}" if "n" in e and "k" in e else e.get("shape", "")
    had, hus = e.get("hadamard") or "", e.get("hadamard_us")
    if had and isinstance(hus, dict) and all(isinstance(hus.get(k), (int, float)) for k in ("fused", "separate")):
        had += f" (fused {hus['fused']:.2f} / separate {hus['separate']:.2f} µs)"
    return [e.get("layer", ""), e.get("role", ""), e.get("bits", ""), shape, e.get("m", ""), e.get("family", ""),
            ",".join(map(str, tile)) if isinstance(tile, (list, tuple)) else (tile or ""), timing, had]


def section_kernels(report: dict) -> str:
    entries = [e for e in report.get("kernels") or [] if isinstance(e, dict)]
    if not entries:   # reports without report["kernels"]: kernel rows a pass put in its details
        entries = [{**r, "family": r.get("kernel", "")} for p in report.get("passes") or [] if isinstance(p, dict)
                   for r in p.get("details") or [] if isinstance(r, dict) and ("tile" in r or "kernel" in r)]
    if not entries:
        return _na("no kernel plan in the report (CompiledModel.kernel_plan(arch=...) or abqc compile --kernel-plan)")
    sources = {}
    for e in entries:
        src = str(e.get("source", "unspecified"))
        sources[src] = sources.get(src, 0) + 1
    archs = sorted({str(e["arch"]) for e in entries if e.get("arch")})
    devices = sorted({str(e["device"]) for e in entries if e.get("device")})
    head = (f"<p>Target {html.escape(', '.join(archs) or '?')}; "
            + html.escape(", ".join(f"{n} {s}" for s, n in sorted(sources.items())))
            + (f"; times measured on {html.escape(', '.join(devices))}" if devices else "")
            + ". µs: one call (activation packing + bit-plane kernel) of the tuned choice.</p>")
    differ = sum(1 for e in entries if e.get("runtime_tile") is not None and e.get("runtime_tile") != e.get("tile"))
    note = (f"<p>{differ} choices differ from the tile QuantLinear launches: those layers carry a fixed "
            "QuantLinear.tile, which the runtime prefers to the plan.</p>" if differ else "")
    table = _table(["layer", "role", "bits", "N×K", "M", "family", "tile", "µs", "online Hadamard"],
                   [_kernel_row(e) for e in entries])
    return head + table + note


SECTIONS = [("Overview", section_overview), ("Perplexity", section_ppl),
            ("Per-layer sensitivity", section_sensitivity), ("Bit map (layer × role)", section_bitmap),
            ("Learned clipping α/β and smoothing scales", section_clip_smooth),
            ("Calibration loss per block", section_loss), ("Kernel configs chosen", section_kernels)]


def render(report: dict) -> str:
    """The HTML page of one report dict. A section that fails on malformed data says so instead of raising."""
    if not isinstance(report, dict):
        raise AbqcError("a report must be a JSON object as written by abqc compile (report.json)")
    parts = []
    for title, fn in SECTIONS:
        try:
            body = fn(report)
        except (TypeError, ValueError, KeyError, IndexError) as e:   # tolerate odd data: show, don't fail
            body = f'<p class="na">could not render: {html.escape(type(e).__name__)}: {html.escape(str(e))}</p>'
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    name = report.get("model", {}).get("name", "") if isinstance(report.get("model"), dict) else ""
    title = html.escape(f"abqc report: {name} {report.get('bits', '')}".strip())
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
            f"</head><body><h1>{title}</h1>\n" + "\n".join(parts) + "</body></html>\n")


def load_report(directory: str | Path) -> dict:
    d = Path(directory)
    path = d / "report.json" if d.is_dir() else d
    if not path.is_file():
        raise AbqcError(f"no report at {path}: give the folder `abqc compile --out DIR` wrote (it holds report.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AbqcError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-run abqc compile") from e


def write_html(directory: str | Path, out: str | Path | None = None) -> Path:
    """Render DIR/report.json to DIR/report.html (or out)."""
    report = load_report(directory)
    d = Path(directory)
    target = Path(out) if out else (d if d.is_dir() else d.parent) / "report.html"
    target.write_text(render(report))
    return target

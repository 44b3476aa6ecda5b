"""Kernel benchmark on the GPU: abqc bit-plane linears against cuBLAS FP16, INT8 (torch._int_mm),
FP8 (torch._scaled_mm) and INT4 weight-only (torch._weight_int4pack_mm), all in one run.

    python benchmarks/kernels.py [--tune] [--quick] [--families gemvq gemv gemvt gemvqt bmma wgmma wgmma8 int8 int8k fp8]

Times are medians of CUDA-graph replays after warm-up. Every call in a replay uses a different copy
of the weights (enough copies to exceed twice the L2 cache), so weights stream from HBM as in a
real model rather than from L2. The "abqc" row of a (bits, M, shape) is the planner's choice (tuned
with --tune, else its default); "abqc-<family>" rows are the fastest tile of that family alone. abqc rows
include activation quantization (the whole linear from FP16 in to FP16 out); the INT8/FP8 rows time the GEMM alone on already-quantized
activations, and pad M up to what those kernels accept (noted); the "int8-linear" row is the whole W8A8
linear (per-token quantize + torch._int_mm + dequantize, FP16 in and out: e2e.py's W8A8 baseline), the
like-for-like INT8 comparison for abqc rows. For M <= 8 the table reports the
packed weight bytes moved per second as a fraction of the measured device-to-device copy rate.
"abqc-nopdl" rows (M <= 8) launch the planner's tile without programmatic dependent launch (the GEMV
starts only after the activation packer has finished), for the PDL's gain in the same run.
"abqc+hadamard" rows (K = 11008, M <= 8) add the online Hadamard that the rotate pass puts on the
down_proj input, run as the runtime runs it (fused into the activation quantizer or as its own launch, the
planner's choice: tuned with --tune); the note gives both ways' times: the decode cost of rotation.
Results: benchmarks/results/kernels.{json,md}; the GPU name is in every record.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# benchmarks/ is never on the import path: its kernels.py would shadow Hugging Face's `kernels` package,
# which transformers imports; sibling scripts are imported as benchmarks.<name> from the repository root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(ROOT.parent))

from abqc import quant  # noqa: E402
from abqc.bits import parse_pair  # noqa: E402
from abqc.codegen import planner  # noqa: E402
from abqc.runtime import QuantLinear  # noqa: E402
from abqc.runtime.hadamard import OnlineHadamard, hadamard_pack  # noqa: E402
from abqc.runtime import cuda as rcuda  # noqa: E402
from benchmarks.provenance import software  # noqa: E402
from benchmarks.w8a8 import W8A8Linear, w8a8_kernels  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (N, K) of LLaMA-7B linears
MS = [1, 2, 4, 8, 16, 32, 128, 512, 2048]
DOWN_K = 11008                                          # down_proj input: where rotation puts an online Hadamard
BITS = ["w2a8", "w2a4", "w3a8", "w4a4", "w4a8", "w6a6", "w8a8"]
FAMILIES = ("gemvq", "gemv", "gemvt", "gemvqt", "bmma", "wgmma", "wgmma8", "int8", "int8k", "fp8")


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    us = planner.time_us(lambda: b.copy_(a), iters=5)
    return 2 * a.numel() * 4 / (us * 1e-6)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, -(-2 * l2 // max(nbytes, 1))))


def rotating(fns) -> callable:
    """One call that runs every fn once: a graph of it times all copies; divide by len(fns)."""
    def run():
        for f in fns:
            f()
    return run


def bench_fp16(x, n, k):
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(2 * n * k))]
    return planner.time_us(rotating([lambda w=w: torch.matmul(x, w.t()) for w in ws]), iters=1) / len(ws)


def bench_int8(x, n, k):
    m = x.shape[0]
    mp = max(m, 17)                                  # _int_mm needs M > 16
    a = torch.randint(-127, 127, (mp, k), device="cuda", dtype=torch.int8)
    ws = [torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies_for(n * k))]
    us = planner.time_us(rotating([lambda w=w: torch._int_mm(a, w.t()) for w in ws]), iters=1) / len(ws)
    return us, (f"M padded to {mp}" if mp != m else "")


def bench_int8_linear(x, n, k, quant, dequant):
    """A whole W8A8 linear as e2e.py's W8A8 baseline runs it: per-token quantize, torch._int_mm, dequantize
    (the two steps torch.compile'd), FP16 in and out: what the abqc rows are, at 8 bits."""
    lins = [W8A8Linear(torch.nn.Linear(k, n, bias=False, device="cuda"), quant, dequant)
            for _ in range(copies_for(n * k))]
    return planner.time_us(rotating([lambda lin=lin: lin(x) for lin in lins]), iters=1) / len(lins)


def bench_fp8(x, n, k):
    m = x.shape[0]
    mp = -(-m // 16) * 16
    a = torch.randn(mp, k, device="cuda").to(torch.float8_e4m3fn)
    ws = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies_for(n * k))]
    one = torch.tensor(1.0, device="cuda")
    us = planner.time_us(rotating([lambda w=w: torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16) for w in ws]), iters=1) / len(ws)
    return us, (f"M padded to {mp}" if mp != m else "")


def bench_int4_weight_only(x, n, k):
    xb = x.to(torch.bfloat16)
    w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
    ws = [packed.clone() for _ in range(copies_for(n * k // 2))]
    return planner.time_us(rotating([lambda p=p: torch._weight_int4pack_mm(xb, p, 128, sz) for p in ws]),
                           iters=1) / len(ws), "group 128, bf16 activations"


def abqc_layer(bits, n, k):
    pair = parse_pair(bits)
    lin = torch.nn.Linear(k, n, bias=False)
    qw = quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))
    return pair, QuantLinear.from_linear(lin, pair, qw).cuda()


def weight_copies(wt: torch.Tensor) -> list[torch.Tensor]:
    """wt and enough clones of it that a replay cycling through them streams weights from HBM, not L2."""
    return [wt] + [wt.clone() for _ in range(copies_for(wt.numel() * 4) - 1)]


def bench_abqc(pair, ql, x, tune: bool, family: str | None = None):
    """(us, tile, packed weight bytes, note) of one abqc linear: the planner's choice (family None), or the
    fastest tile of one family (timed here, not stored in plans.json); None if that family cannot serve it."""
    gw, groups = ql.group_words_and_count()
    wt = ql.tiled_weights()
    wts = weight_copies(wt)
    m, arch = x.shape[0], rcuda.arch_of(x.device)

    def call(w, tile):
        return rcuda.bmma_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, ql.out_features, pair.a_bits, gw,
                                 groups, ql.in_features, False, tile=tile)

    # candidates are timed as the model runs them: each call of a replay reads another weight copy (from HBM)
    copy = itertools.cycle(wts)
    if family is None:
        plan = planner.choose(lambda tile: call(next(copy), tile), ql.out_features, groups * gw, gw, wt.shape[2],
                              pair.a_bits, m, arch, tune=tune)
        tile = tuple(plan["tile"])
    else:
        timed = []
        for t in planner.candidates(wt.shape[2], pair.a_bits, m, groups, include_disabled=True, arch=arch):
            if t[0] == family:
                try:
                    timed.append((planner.time_us(lambda: call(next(copy), t)), t))
                except (RuntimeError, ValueError):
                    continue
        if not timed:
            return None
        tile = min(timed)[1]
    us = planner.time_us(rotating([lambda w=w: call(w, tile) for w in wts]), iters=1) / len(wts)
    # breakdown: the activation quantizer alone, and the rest (GEMM; for int8: unpack + _int_mm + epilogue)
    if tile[0] in rcuda.GEMVQ_FAMILIES:
        note = "activation quantization inside the GEMV (one launch)"
    elif tile[0] in rcuda.INT8_FAMILIES:
        pack_us = planner.time_us(lambda: rcuda.quant_int8(x, pair.a_bits, gw, ql.in_features, False,
                                                            rcuda.INT8_MIN_ROWS))
        gemm = {"int8k": "abqc INT8 GEMM unpacking in-kernel", "fp8": "unpack + FP8 _scaled_mm"}.get(
            tile[0], "unpack + _int_mm")
        note = f"incl. activation quantize to int8 codes; quantize {pack_us:.1f} us, {gemm} + epilogue " \
               f"{us - pack_us:.1f} us"
    elif tile[0] in rcuda.BYTE_FAMILIES:
        pack_us = planner.time_us(lambda: rcuda.quant_u8(x, pair.a_bits, gw, ql.in_features, False))
        note = f"incl. activation quantize to byte codes; quantize {pack_us:.1f} us, INT8 warpgroup MMA " \
               f"unpacking the bit-planes in registers + epilogue {us - pack_us:.1f} us"
    else:
        def pack():
            return rcuda.quant_pack(x, pair.a_bits, gw, groups, ql.in_features, False)
        packed = pack()
        epi = rcuda.epilogue_args(ql.w_scale, ql.w_zero, ql.w_sum, packed)
        pack_us = planner.time_us(pack)
        gemm_us = planner.time_us(rotating([lambda w=w: rcuda.bmma(w, packed[0], ql.out_features, ql.in_features,
                                                                   gw, 2, epi, tile) for w in wts]), iters=1) / len(wts)
        note = f"incl. activation quantize+pack; pack {pack_us:.1f} us, bit-plane GEMM {gemm_us:.1f} us"
    return us, tile, wt.shape[2] * ql.out_features * groups * gw * 4, note


def bench_hadamard(pair, ql, x, had: OnlineHadamard, tune: bool, alone_us: float):
    """(us, tile, note) of the online Hadamard + linear as the runtime runs it: the planner's tile, the
    Hadamard fused into the activation quantizer or as its own launch (planner.choose_hadamard: timed and
    stored with tune, else the plan or default). Both ways are timed here, weights streaming from HBM."""
    gw, groups = ql.group_words_and_count()
    wt = ql.tiled_weights()
    wts = weight_copies(wt)
    m, arch, block = x.shape[0], rcuda.arch_of(x.device), had.kernel_block(x.device)
    counter = torch.zeros(m, dtype=torch.int32, device=x.device)
    tile = rcuda.launch_tile(m, wt.shape[2], pair.a_bits, ql.out_features, groups * gw, gw, arch)

    def call(w, fused):
        return rcuda.hadamard_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, ql.out_features, pair.a_bits, gw,
                                     groups, ql.in_features, False, tile, block=block, fused=fused, counter=counter)

    if tile[0] not in rcuda.PACKED_FAMILIES:   # gemvq / INT8 quantize x themselves: the Hadamard is separate
        us = planner.time_us(rotating([lambda w=w: call(w, False) for w in wts]), iters=1) / len(wts)
        return us, tile, f"{tile[0]} quantizes in-kernel, so the Hadamard ({alone_us:.1f} us alone) is its own launch"
    copy = itertools.cycle(wts)
    plan = planner.choose_hadamard(lambda fused: call(next(copy), fused), ql.out_features, groups * gw, gw,
                                   wt.shape[2], pair.a_bits, m, arch, block.shape[0], tune=tune)
    us = {f: planner.time_us(rotating([lambda w=w, f=f: call(w, f) for w in wts]), iters=1) / len(wts)
          for f in (True, False)}
    pack_us = planner.time_us(lambda: hadamard_pack(x, block, pair.a_bits, gw, groups, False, counter))
    how = "fused into the activation quantizer" if plan["fused"] else "as its own launch"
    src = "planner's choice (tuned)" if plan.get("tuned") else "planner's default (untuned)"
    return us[plan["fused"]], tile, (
        f"Hadamard {how}, the {src}; fused (one Hadamard+quantize+pack launch, {pack_us:.1f} us, then the GEMM) "
        f"{us[True]:.1f} us, separate (Hadamard {alone_us:.1f} us alone, then packer + GEMM) {us[False]:.1f} us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="autotune abqc tiles per shape (planner) before timing")
    ap.add_argument("--quick", action="store_true", help="M in {1, 8, 128, 2048} only")
    ap.add_argument("--tune-max-m", type=int, default=1 << 30,
                    help="with --tune, tune only shapes with M up to this (larger M use the planner default)")
    ap.add_argument("--bits", nargs="+", default=BITS)
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], metavar="NxK",
                    help="linear shapes N x K, in this order (default: the LLaMA-7B ones)")
    ap.add_argument("--ms", nargs="+", type=int, default=None, help="token counts M (default: all; --quick: 4)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES,
                    help="also time the best tile of each of these kernel families (a row each where it applies)")
    ap.add_argument("--no-hadamard", action="store_true",
                    help="skip the abqc+hadamard rows (online Hadamard + linear, K = 11008, M <= 8)")
    ap.add_argument("--no-pdl-rows", action="store_true",
                    help="skip the abqc-nopdl rows (M <= 8: the planner's tile launched without programmatic "
                         "dependent launch, the packer and GEMV strictly one after the other)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no GPU: join these runs' kernels.json (e.g. one per call, split by --ms) into one table "
                         "in --out, ordered by shape then M; each run keeps its own copy rate and command")
    args = ap.parse_args(argv)
    if args.merge:
        write_results(merge_runs([json.loads(p.read_text()) for p in args.merge]), Path(args.out))
        return
    if not rcuda.available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (sm_80+) with cuda-bindings installed")
    from abqc.codegen.config import all_configs
    from abqc.codegen.nvrtc import precompile
    precompile(all_configs(rcuda.arch_of(torch.device("cuda"))))
    gpu, sw = torch.cuda.get_device_name(), software()
    command = " ".join(["python benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])])
    bw = copy_bandwidth()
    w8_quant, w8_dequant, w8_how = w8a8_kernels(torch.device("cuda"), eager=False)
    print(f"{gpu}: device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    ms = args.ms or ([1, 8, 128, 2048] if args.quick else MS)
    try:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    except ValueError:
        sys.exit(f"--shapes takes N x K pairs like 4096x11008, got {args.shapes}")
    records = []

    def add(impl, bits, m, n, k, us, ops_count, wbytes=None, note="", tile=None):
        rec = {"gpu": gpu, "impl": impl, "bits": bits, "M": m, "N": n, "K": k, "median_us": round(us, 3),
               "tflops_or_tops": round(ops_count / (us * 1e-6) / 1e12, 2),
               "weight_bw_frac": round(wbytes / (us * 1e-6) / bw, 3) if wbytes and m <= 8 else None,
               "note": note, "software": sw, "copy_TBps": round(bw / 1e12, 3), "command": command}
        if tile:
            rec["tile"] = list(tile)
        records.append(rec)
        print(f"{impl:>12} {bits:>6} M={m:<5} N={n:<6} K={k:<6} {us:9.2f} us  {rec['tflops_or_tops']:8.2f} T/s"
              + (f"  bw {rec['weight_bw_frac']:.2f}" if rec["weight_bw_frac"] else "") + (f"  {note}" if note else ""),
              flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers, hadamards = {}, {}
    for n, k in shapes:
        for bits in args.bits:
            layers[(bits, n, k)] = abqc_layer(bits, n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            flop = 2 * m * n * k
            add("cublas-fp16", "w16a16", m, n, k, bench_fp16(x, n, k), flop, 2 * n * k)
            us, note = bench_int8(x, n, k)
            add("int8-int_mm", "w8a8", m, n, k, us, flop, n * k, note)
            add("int8-linear", "w8a8", m, n, k, bench_int8_linear(x, n, k, w8_quant, w8_dequant), flop, n * k,
                f"the whole W8A8 linear: per-token quantize + _int_mm + dequantize, {w8_how}")
            us, note = bench_fp8(x, n, k)
            add("fp8-scaled_mm", "w8a8", m, n, k, us, flop, n * k, note)
            try:
                us, note = bench_int4_weight_only(x, n, k)
                add("int4-wo", "w4a16", m, n, k, us, flop, n * k // 2, note)
            except RuntimeError as e:
                print(f"int4 weight-only unavailable: {str(e).splitlines()[0]}")
            for bits in args.bits:
                pair, ql = layers[(bits, n, k)]
                us, tile, wbytes, note = bench_abqc(pair, ql, x, args.tune and m <= args.tune_max_m)
                add("abqc", bits, m, n, k, us, flop, wbytes, f"planner's choice; {note}; PDL {rcuda.pdl_status()}",
                    tile)
                if m <= 8 and not args.no_pdl_rows and not rcuda.pdl_status().startswith("off"):
                    rcuda.set_pdl(False)      # the same tile, the GEMV launched only after the packer finished
                    try:
                        us0, _, _, note0 = bench_abqc(pair, ql, x, False)
                    finally:
                        rcuda.set_pdl(True)
                    add("abqc-nopdl", bits, m, n, k, us0, flop, wbytes, f"planner's tile without PDL; {note0}", tile)
                if k == DOWN_K and m <= 8 and not args.no_hadamard:
                    # rotation (issue 8) adds an online Hadamard on the down_proj input at decode
                    had = hadamards.setdefault(k, OnlineHadamard.of_size(k).cuda())
                    h_us, h_tile, h_note = bench_hadamard(pair, ql, x, had, args.tune and m <= args.tune_max_m,
                                                          planner.time_us(lambda: had(x)))
                    add("abqc+hadamard", bits, m, n, k, h_us, flop, wbytes,
                        f"online Hadamard ({had.kind}) of the input + the planner's linear; {h_note}", h_tile)
                for family in args.families:
                    got = bench_abqc(pair, ql, x, False, family)
                    if got:
                        us, tile, wbytes, note = got
                        add(f"abqc-{family}", bits, m, n, k, us, flop, wbytes, f"best {family} tile; {note}", tile)
            # written after every M: a run cut short (device time limits) keeps what it measured
            write_results(records, out)
        for bits in args.bits:      # this shape's layers (and their weight copies) are done
            del layers[(bits, n, k)]


def write_results(records: list[dict], out: Path) -> None:
    """out/kernels.json and out/kernels.md of these records."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(records, indent=1))
    write_md(records, out / "kernels.md")


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """Records of several runs as one: ordered by shape (first seen first), then M, each run's own order kept
    within; a (impl, bits, M, N, K) measured twice keeps the later run's record. All runs on one GPU model."""
    gpus = {r["gpu"] for run in runs for r in run}
    if len(gpus) > 1:
        sys.exit(f"--merge joins runs of one GPU model, these come from {sorted(gpus)}")
    latest = {}
    for run in runs:
        for r in run:
            latest[(r["impl"], r["bits"], r["M"], r["N"], r["K"])] = r
    shapes = list(dict.fromkeys((r["N"], r["K"]) for run in runs for r in run))
    return sorted(latest.values(), key=lambda r: (shapes.index((r["N"], r["K"])), r["M"]))


def write_md(records, path):
    def times(impl):   # (M, N, K) -> µs of one baseline
        return {(r["M"], r["N"], r["K"]): r["median_us"] for r in records if r["impl"] == impl}
    fp16, i8, i8l = times("cublas-fp16"), times("int8-int_mm"), times("int8-linear")
    gpu = records[0]["gpu"] if records else "?"
    runs = {}   # command -> (software, copy rate) of each run that made these records
    for r in records:
        runs.setdefault(r.get("command", "python benchmarks/kernels.py (command not recorded)"),
                        (r.get("software", "not recorded"), r.get("copy_TBps")))
    made = "; ".join(f"`{c}` ({sw}; device-to-device copy {f'{bw:.2f} TB/s' if bw else 'not recorded'}, read + write)"
                     for c, (sw, bw) in runs.items())
    lines = [f"# Kernel benchmark ({gpu})", "",
             f"Generated by {made}. Median of CUDA-graph replays; "
             "weights rotate over copies larger than L2. "
             "abqc rows include activation quantization and packing; INT8/FP8 rows are the GEMM alone "
             "(M padded where those kernels need it), int8-linear the whole W8A8 linear (quantize + GEMM + "
             "dequantize). × INT8 / × W8A8 lin: that row's time over this one's. "
             "bw = packed weight bytes per second / that run's copy rate (M <= 8).", "",
             "| impl | bits | M | N | K | µs | T(FL)OPS | × FP16 | × INT8 | × W8A8 lin | bw | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        key = (r["M"], r["N"], r["K"])
        bwf = "" if r["weight_bw_frac"] is None else f"{r['weight_bw_frac']:.2f}"
        lin = f"{i8l[key] / r['median_us']:.2f}" if key in i8l else ""     # runs before this row had none
        lines.append(f"| {r['impl']} | {r['bits']} | {r['M']} | {r['N']} | {r['K']} | {r['median_us']:.2f} | "
                     f"{r['tflops_or_tops']:.1f} | {fp16[key] / r['median_us']:.2f} | {i8[key] / r['median_us']:.2f} | "
                     f"{lin} | "
                     f"{bwf} | {r['note']}{' tile ' + str(r['tile']) if r.get('tile') else ''} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

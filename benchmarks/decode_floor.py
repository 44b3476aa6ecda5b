"""What a decode linear could reach at best on this GPU: a kernel that only streams the packed weight bytes
(no math, no activations) timed like benchmarks/kernels.py times abqc (CUDA-graph replays, weights rotating
over copies larger than L2), for several grid shapes and load depths, next to an empty kernel (the fixed
cost of one launch in a graph), cuBLAS FP16 and abqc's W2A8 linear at the same shape.

    python benchmarks/decode_floor.py [--n 4096 --k 11008 --bits w2a8] [--out DIR]

Writes decode_floor.{json,md}: the floor is what the kernels.md "bw" column can reach, not a target."""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from abqc.codegen import planner  # noqa: E402
from abqc.runtime import cuda as rcuda  # noqa: E402
from kernels import abqc_layer, bench_abqc, bench_fp16, copies_for, copy_bandwidth, rotating  # noqa: E402
from provenance import software  # noqa: E402

SOURCE = r"""
typedef unsigned int u32;
// block b streams its contiguous share of the bytes, U 16-byte loads per thread in flight
extern "C" __global__ void read_chunk(const uint4 *__restrict__ p, long long n16, u32 *out) {
  const long long per = (n16 + gridDim.x - 1) / gridDim.x, start = blockIdx.x * per;
  const long long end = start + per < n16 ? start + per : n16;
  u32 acc = 0;
  for (long long i = start + threadIdx.x; i < end; i += (long long)U * blockDim.x) {
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) if (i + u * blockDim.x < end) r[u] = __ldg(p + i + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < U; ++u) if (i + u * blockDim.x < end) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;   // keeps the loads; (almost) never taken
}
extern "C" __global__ void empty(const uint4 *p, long long n16, u32 *out) {}
"""


def _module(unroll: int, arch: str):
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(SOURCE.encode(), b"floor.cu", 0, [], [])
    opts = [f"--gpu-architecture={arch}".encode(), f"-DU={unroll}".encode()]
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtc: {err}")
    _, n = nvrtc.nvrtcGetCUBINSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetCUBIN(prog, buf)
    drv = rcuda._drv()
    torch.cuda.current_stream().synchronize()
    err, mod = drv.cuModuleLoadData(buf)
    return mod


def _launcher(mod, name: str, grid: int, block: int, buf: torch.Tensor, out: torch.Tensor):
    drv = rcuda._drv()
    _, fn = drv.cuModuleGetFunction(mod, name.encode())
    vals = [ctypes.c_void_p(buf.data_ptr()), ctypes.c_longlong(buf.numel() * buf.element_size() // 16),
            ctypes.c_void_p(out.data_ptr())]
    params = (ctypes.c_void_p * 3)(*[ctypes.addressof(v) for v in vals])

    def run():
        err, = drv.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, torch.cuda.current_stream().cuda_stream,
                                  ctypes.addressof(params), 0)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"launch: {err}")
    run.keep = (vals, params)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=11008)
    ap.add_argument("--bits", default="w2a8")
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args(argv)
    gpu, arch = torch.cuda.get_device_name(0), rcuda.arch_of(torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pair, ql = abqc_layer(a.bits, a.n, a.k)
    wbytes = ql.tiled_weights().numel() * 4
    bw = copy_bandwidth()
    bufs = [torch.empty(wbytes // 16 * 16, dtype=torch.uint8, device="cuda").random_(0, 255)
            for _ in range(copies_for(wbytes))]
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    rows = []

    def add(impl, us, note=""):
        rows.append({"gpu": gpu, "impl": impl, "N": a.n, "K": a.k, "bytes": wbytes, "median_us": round(us, 3),
                     "weight_bw_frac": round(wbytes / (us * 1e-6) / bw, 3), "note": note})
        print(rows[-1], flush=True)

    mods = {u: _module(u, arch) for u in (2, 4, 8, 16)}
    us = planner.time_us(rotating([_launcher(mods[4], "empty", sms, 256, b, out) for b in bufs]), iters=1) / len(bufs)
    add("empty-kernel", us, f"{sms} blocks x 256 threads, no work: the fixed cost of one launch in a graph")
    for blocks_per_sm in (1, 2, 4, 8):
        for threads in (256, 512, 1024):
            if blocks_per_sm * threads > 2048:
                continue
            for u in (2, 4, 8, 16):
                fns = [_launcher(mods[u], "read_chunk", sms * blocks_per_sm, threads, b, out) for b in bufs]
                us = planner.time_us(rotating(fns), iters=1) / len(fns)
                add("read-only", us, f"grid {blocks_per_sm}x{sms}, {threads} threads, {u} x 16 B loads in flight")
    x = torch.randn(1, a.k, device="cuda", dtype=torch.float16)
    add("cublas-fp16", bench_fp16(x, a.n, a.k), "torch.matmul, fp16 weights (4x the bytes of W4, 8x W2)")
    for fam in (None, "gemv", "gemvq"):
        r = bench_abqc(pair, ql, x, tune=False, family=fam)
        if r:
            add(f"abqc-{fam or 'default'}", r[0], f"{a.bits} tile {list(r[1])}; {r[3]}")
    best = min((r for r in rows if r["impl"] == "read-only"), key=lambda r: r["median_us"])
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/decode_floor.py " + " ".join(argv or sys.argv[1:]), "gpu": gpu,
            "copy_bw_TBps": round(bw / 1e12, 3), "software": software(), "rows": rows}
    (outdir / "decode_floor.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Decode read floor ({gpu})", "",
             f"Generated by `{meta['command']}` ({meta['software']}). {a.bits} packed weights of a {a.n}x{a.k} "
             f"linear: {wbytes / 1e6:.2f} MB. Device-to-device copy {bw / 1e12:.2f} TB/s (read + write); "
             "bw = bytes / time / copy rate, as in kernels.md. Median of CUDA-graph replays over weight copies "
             "larger than L2.", "",
             f"Fastest read-only kernel: {best['median_us']:.2f} us = {best['weight_bw_frac']:.2f} of the copy rate "
             f"({best['note']}).", "",
             "| impl | µs | bw | note |", "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['median_us']:.2f} | {r['weight_bw_frac']:.2f} | {r['note']} |" for r in rows]
    (outdir / "decode_floor.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

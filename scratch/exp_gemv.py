"""Scratch experiment (not committed): gemv template variants at decode shapes, timed like kernels.py."""
import itertools, json, os, sys, ctypes
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from abqc.codegen import planner
from abqc.codegen.config import KernelConfig
from abqc.runtime import cuda as rcuda
from kernels import abqc_layer, weight_copies, rotating, bench_fp16, copy_bandwidth
from cuda.bindings import nvrtc as nv

VARIANTS = {"old": "#define GEMV_PRE 0\n#define GEMV_QRED 0\n", "qred": "#define GEMV_PRE 0\n",
            "pre": "#define GEMV_QRED 0\n", "both": "", "both+noalloc": "#define GEMV_NOALLOC 1\n"}
OUT = Path(os.environ.get("OUT", "/tmp"))

def load(cfg, extra, src=None):
    src = src or (extra + cfg.source())
    err, prog = nv.nvrtcCreateProgram(src.encode(), b"k.cu", 0, [], [])
    opts = [f"--gpu-architecture={cfg.arch}".encode(), b"-std=c++17", b"--extra-device-vectorization"]
    err, = nv.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nv.nvrtcResult.NVRTC_SUCCESS, err
    _, n = nv.nvrtcGetCUBINSize(prog); buf = b" " * n; nv.nvrtcGetCUBIN(prog, buf)
    drv = rcuda._drv(); torch.cuda.current_stream().synchronize()
    err, mod = drv.cuModuleLoadData(buf); assert err == drv.CUresult.CUDA_SUCCESS, err
    err, fn = drv.cuModuleGetFunction(mod, cfg.name.encode())
    drv.cuFuncSetAttribute(fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, rcuda.MAX_SMEM)
    return mod, fn

rows = []
bw = copy_bandwidth()
gpu = torch.cuda.get_device_name(0)
ALL = list(VARIANTS)
for bits, n, k, m, tiles, vnames in [("w2a8", 4096, 11008, 1, [(8, 1), (4, 1)], ALL),
                                     ("w2a8", 4096, 4096, 1, [(4, 1)], ["old", "both"]),
                                     ("w4a4", 4096, 11008, 1, [(8, 1)], ["old", "both"]),
                                     ("w2a8", 4096, 11008, 4, [(8, 1)], ["old", "both"])]:
    pair, ql = abqc_layer(bits, n, k)
    gw, groups = ql.group_words_and_count()
    wt = ql.tiled_weights(); wts = weight_copies(wt); p = wt.shape[2]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    packed = rcuda.quant_pack(x, pair.a_bits, gw, groups, k, False)
    epi = rcuda.epilogue_args(ql.w_scale, ql.w_zero, ql.w_sum, packed)
    fp16 = bench_fp16(x, n, k)
    mt = next(t for t in (1, 2, 4, 8) if m <= t)
    ref_int = ref_y = None
    for (wk, ntw), vname in itertools.product(tiles, vnames):
        extra = VARIANTS[vname]
        try:
            cfg = KernelConfig("gemv", pair.a_bits, p, mt, "sm_90a", ntw, False)
        except ValueError:
            continue
        rcuda._FUNCS[(cfg, 0)] = load(cfg, extra)
        tile = ("gemv", wk, mt, ntw)
        yi = rcuda.bmma(wt, packed[0], n, k, gw, 0, epi, tile)
        yf = rcuda.bmma(wt, packed[0], n, k, gw, 2, epi, tile)
        if ref_int is None:
            ref_int, ref_y = yi, yf
        exact = bool(torch.equal(yi, ref_int) and torch.equal(yf.view(torch.int16), ref_y.view(torch.int16)))
        gemm = planner.time_us(rotating([lambda w=w: rcuda.bmma(w, packed[0], n, k, gw, 2, epi, tile) for w in wts]), iters=1) / len(wts)
        full = planner.time_us(rotating([lambda w=w: rcuda.bmma_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, n, pair.a_bits, gw, groups, k, False, tile=tile) for w in wts]), iters=1) / len(wts)
        wbytes = wt.numel() * 4
        r = dict(gpu=gpu, bits=bits, M=m, N=n, K=k, variant=vname, tile=list(tile), gemv_us=round(gemm, 2), linear_us=round(full, 2),
                 fp16_us=round(fp16, 2), x_fp16=round(fp16 / full, 2), bw=round(wbytes / (full * 1e-6) / bw, 3), exact_vs_first=exact)
        rows.append(r); print(r, flush=True)
        del rcuda._FUNCS[(cfg, 0)]
    # the activation packer alone: this tree's vs HEAD's template
    for which in ("new", "old"):
        qcfg = KernelConfig("quant_pack", pair.a_bits, arch="sm_90a")
        if which == "old":
            tmpl = (ROOT / "abqc/codegen/templates/quant_pack.cu").read_text()
            src_old = (ROOT / "scratch/quant_pack_old.cu").read_text()
            rcuda._FUNCS[(qcfg, 0)] = load(qcfg, "", qcfg.source().replace(tmpl, src_old))
        pk = rcuda.quant_pack(x, pair.a_bits, gw, groups, k, False)
        same = all(torch.equal(u, v) for u, v in zip(pk, packed))
        us = planner.time_us(lambda: rcuda.quant_pack(x, pair.a_bits, gw, groups, k, False))
        rows.append(dict(gpu=gpu, bits=bits, M=m, N=n, K=k, variant="pack-" + which, pack_us=round(us, 2), same_as_new=same))
        print(rows[-1], flush=True)
        if which == "old":
            full = planner.time_us(rotating([lambda w=w: rcuda.bmma_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, n, pair.a_bits, gw, groups, k, False, tile=("gemv", 8, mt, 1)) for w in wts]), iters=1) / len(wts)
            rows.append(dict(gpu=gpu, bits=bits, M=m, N=n, K=k, variant="both+oldpack", tile=["gemv", 8, mt, 1], linear_us=round(full, 2)))
            print(rows[-1], flush=True)
            del rcuda._FUNCS[(qcfg, 0)]
(OUT / "exp_gemv.json").write_text(json.dumps(rows, indent=1))

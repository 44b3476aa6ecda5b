"""Scratch: wgmma8 vs int8 (unpack + _int_mm), bmma/wgmma and torch._int_mm at prefill shapes (same timing as kernels.py)."""
import json, os, sys
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from abqc.codegen import planner
from abqc.runtime import cuda as rcuda
from kernels import abqc_layer, weight_copies, rotating, bench_fp16
OUT = Path(os.environ.get("OUT", "/tmp"))
rows = []
gpu = torch.cuda.get_device_name(0)
for bits in ("w2a8", "w4a4", "w4a8"):
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        pair, ql = abqc_layer(bits, n, k)
        gw, groups = ql.group_words_and_count()
        wt = ql.tiled_weights(); wts = weight_copies(wt)
        for m in (16, 128, 512, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            a8 = torch.randint(-128, 127, (max(m, 17), k), device="cuda", dtype=torch.int8)
            w8 = torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8)
            intmm = planner.time_us(lambda: torch._int_mm(a8, w8.t()))
            r = dict(gpu=gpu, bits=bits, M=m, N=n, K=k, int_mm_us=round(intmm, 2), fp16_us=round(bench_fp16(x, n, k), 2))
            ref = None
            for tile in [("int8", 0, 0), ("bmma", 4, 2)] + [("wgmma8", wg, tn) for wg in (1, 2) for tn in (4, 8, 16)]:
                f = lambda w=wt, t=tile: rcuda.bmma_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, n, pair.a_bits, gw, groups, k, False, tile=t)
                y = f()
                if ref is None: ref = y
                ok = bool(torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.float().abs().max().item()))
                us = planner.time_us(rotating([lambda w=w, t=tile: rcuda.bmma_linear(x, w, ql.w_scale, ql.w_zero, ql.w_sum, None, n, pair.a_bits, gw, groups, k, False, tile=t) for w in wts]), iters=1) / len(wts)
                r[",".join(map(str, tile))] = round(us, 2); r[",".join(map(str, tile)) + "_ok"] = ok
            pk = planner.time_us(lambda: rcuda.quant_u8(x, pair.a_bits, gw, k, False))
            r["quant_u8_us"] = round(pk, 2)
            rows.append(r); print(r, flush=True)
(OUT / "bench_wgmma8.json").write_text(json.dumps(rows, indent=1))

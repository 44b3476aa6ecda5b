"""Profile one abqc linear for ncu. By default the decode path, packer and bit-plane GEMM launched apart
(also printing each one's event timing, no graphs):
    ncu --kernel-name regex:abqc --section SpeedOfLight --section LaunchStats --section Occupancy \
        python benchmarks/profile_decode.py --bits w2a8 --n 4096 --k 11008 --m 1
--whole runs the whole linear as runtime.cuda.bmma_linear launches it, any family (wgmma8, int8, ...),
and --int-mm adds torch._int_mm on int8 operands of the same shape, the baseline to profile beside it:
    ncu --kernel-name regex:'abqc|gemm|xmma|cutlass' --launch-count 4 --section SpeedOfLight \
        python benchmarks/profile_decode.py --whole --bits w2a8 --n 4096 --k 4096 --m 2048 --tile wgmma8,2,16 --int-mm
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# benchmarks/ is never on the import path: its kernels.py would shadow Hugging Face's `kernels` package,
# which transformers imports; sibling scripts are imported as benchmarks.<name> from the repository root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(ROOT.parent))
from abqc.runtime import cuda as rcuda  # noqa: E402
from benchmarks.kernels import abqc_layer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="w2a8")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--k", type=int, default=11008)
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--tile", default=None, help="family,wk,tm[,channel tiles], e.g. gemv,8,1,4 (default: planner default)")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--whole", action="store_true", help="the whole linear (bmma_linear), any family; no timings")
ap.add_argument("--int-mm", action="store_true", help="also run torch._int_mm on int8 operands of this shape")
a = ap.parse_args()
pair, ql = abqc_layer(a.bits, a.n, a.k)
gw, groups = ql.group_words_and_count()
wt = ql.tiled_weights()
x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float16)
tile = None
if a.tile:
    family, *nums = a.tile.split(",")
    tile = (family, *map(int, nums))
if a.int_mm:
    a8 = torch.randint(-128, 127, (max(a.m, 17), a.k), device="cuda", dtype=torch.int8)
    w8 = torch.randint(-128, 127, (a.n, a.k), device="cuda", dtype=torch.int8)
    for _ in range(a.reps):
        torch._int_mm(a8, w8.t())
if a.whole:
    for _ in range(a.reps):
        rcuda.bmma_linear(x, wt, ql.w_scale, ql.w_zero, ql.w_sum, None, a.n, pair.a_bits, gw, groups, a.k, False,
                          tile=tile)
    torch.cuda.synchronize()
    sys.exit(0)
for _ in range(a.reps):
    packed = rcuda.quant_pack(x, pair.a_bits, gw, groups, a.k, False)
    epi = rcuda.epilogue_args(ql.w_scale, ql.w_zero, ql.w_sum, packed)
    y = rcuda.bmma(wt, packed[0], a.n, a.k, gw, 2, epi, tile)
torch.cuda.synchronize()
for name, fn in [("pack", lambda: rcuda.quant_pack(x, pair.a_bits, gw, groups, a.k, False)),
                 ("gemm", lambda: rcuda.bmma(wt, packed[0], a.n, a.k, gw, 2, epi, tile))]:
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) * 1000)
    print(f"{name}: median {sorted(ts)[10]:.1f} us (events, no graph)")

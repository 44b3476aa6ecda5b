"""Profile one decode-shaped abqc linear (quantize+pack and bit-plane GEMM) for ncu:
    ncu --kernel-name regex:abqc --section SpeedOfLight --section LaunchStats --section Occupancy \
        python benchmarks/profile_decode.py --bits w2a8 --n 4096 --k 11008 --m 1
Also prints per-kernel event timings without graphs."""
import argparse
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
from abqc.runtime import QuantLinear  # noqa: E402
from abqc.runtime import cuda as rcuda  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="w2a8")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--k", type=int, default=11008)
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--tile", default=None, help="family,wk,tm[,channel tiles], e.g. gemv,8,1,4 (default: planner default)")
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()
pair = parse_pair(a.bits)
lin = torch.nn.Linear(a.k, a.n, bias=False)
ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, pair.w_bits)).cuda()
gw, groups = ql.group_words_and_count()
wt = ql.tiled_weights()
x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float16)
tile = None
if a.tile:
    family, *nums = a.tile.split(",")
    tile = (family, *map(int, nums))
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

"""Profile one decode-shaped abqc linear (quantize+pack and bit-plane GEMM) for ncu:
    ncu --kernel-name regex:abqc --section SpeedOfLight --section LaunchStats --section Occupancy \
        python benchmarks/profile_decode.py --bits w2a8 --n 4096 --k 11008 --m 1
Also prints per-kernel event timings without graphs."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from abqc import quant  # noqa: E402
from abqc.bits import parse_pair  # noqa: E402
from abqc.codegen import layout  # noqa: E402
from abqc.runtime import QuantLinear, ops  # noqa: E402
from abqc.runtime import cuda as rcuda  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="w2a8")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--k", type=int, default=11008)
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--tile", default=None, help="wk,tm")
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()
pair = parse_pair(a.bits)
lin = torch.nn.Linear(a.k, a.n, bias=False)
ql = QuantLinear.from_linear(lin, pair, quant.quantize_weight(lin.weight, pair.w_bits)).cuda()
gw, kp = ops.group_layout(a.k, ql.group_size)
groups = kp // (gw * 32)
wt = layout.tile_weights(ql.w_planes, gw)
x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float16)
tile = tuple(int(v) for v in a.tile.split(",")) if a.tile else None
for _ in range(a.reps):
    packed = rcuda.quant_pack(x, pair.a_bits, gw, groups, a.k, False)
    epi = {"w_scale": ql.w_scale, "w_zero": ql.w_zero, "w_sum": ql.w_sum, "a_scale": packed[2], "a_zero": packed[3],
           "a_sum": packed[1]}
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

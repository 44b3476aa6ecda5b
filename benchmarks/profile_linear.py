"""Run one abqc linear of any kernel family (the whole linear: activation quantizer + GEMM, as
runtime.cuda.bmma_linear launches it) a few times, for ncu, and optionally torch._int_mm on the same
shape as the baseline to profile beside it:

    ncu --kernel-name regex:'abqc|gemm|Kernel' --launch-count 4 --section SpeedOfLight \
        python benchmarks/profile_linear.py --bits w2a8 --n 4096 --k 4096 --m 2048 --tile wgmma8,2,16 --int-mm

profile_decode.py is the decode (M <= 8) counterpart that times the packer and GEMM apart."""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# benchmarks/ is never on the import path: its kernels.py would shadow Hugging Face's `kernels` package,
# which transformers imports; sibling scripts are imported as benchmarks.<name> from the repository root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(ROOT.parent))
from benchmarks.kernels import abqc_layer  # noqa: E402
from abqc.runtime import cuda as rcuda  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--bits", default="w2a8")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--k", type=int, default=4096)
ap.add_argument("--m", type=int, default=2048)
ap.add_argument("--tile", default=None, help="family,numbers..., e.g. wgmma8,2,16 (default: the planner's default)")
ap.add_argument("--reps", type=int, default=2)
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
for _ in range(a.reps):
    rcuda.bmma_linear(x, wt, ql.w_scale, ql.w_zero, ql.w_sum, None, a.n, pair.a_bits, gw, groups, a.k, False, tile=tile)
if a.int_mm:
    a8 = torch.randint(-128, 127, (max(a.m, 17), a.k), device="cuda", dtype=torch.int8)
    w8 = torch.randint(-128, 127, (a.n, a.k), device="cuda", dtype=torch.int8)
    for _ in range(a.reps):
        torch._int_mm(a8, w8.t())
torch.cuda.synchronize()
print("done", a)

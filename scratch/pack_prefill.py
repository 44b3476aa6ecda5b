"""Scratch: this tree's packers vs scratch/quant_pack_old.cu at prefill rows (quant_pack, quant_int8), exactness too."""
import json, os, sys
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scratch"))
from abqc.codegen import planner
from abqc.codegen.config import KernelConfig
from abqc.runtime import cuda as rcuda
from exp_gemv_load import load
rows = []
for m, k in ((2048, 4096), (2048, 11008), (512, 4096), (128, 11008)):
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    kw = -(-k // 32)
    for fam in ("quant_pack", "quant_int8"):
        run = (lambda: rcuda.quant_pack(x, 8, kw, 1, k, False)) if fam == "quant_pack" else \
              (lambda: rcuda.quant_int8(x, 8, kw, k, False, 17))
        new = run(); t_new = planner.time_us(run)
        cfg = KernelConfig(fam, 8, arch="sm_90a")
        tmpl = (ROOT / "abqc/codegen/templates/quant_pack.cu").read_text()
        keep = rcuda._FUNCS.get((cfg, 0))
        rcuda._FUNCS[(cfg, 0)] = load(cfg, cfg.source().replace(tmpl, (ROOT / "scratch/quant_pack_old.cu").read_text()))
        old = run(); t_old = planner.time_us(run)
        rcuda._FUNCS[(cfg, 0)] = keep
        same = all(torch.equal(a.sum(1) if i == 1 else a, b.sum(1) if i == 1 else b) for i, (a, b) in enumerate(zip(new, old)))
        rows.append(dict(gpu=torch.cuda.get_device_name(0), family=fam, M=m, K=k, new_us=round(t_new, 2), old_us=round(t_old, 2), same=same))
        print(rows[-1], flush=True)
(Path(os.environ.get("OUT", "/tmp")) / "pack_prefill.json").write_text(json.dumps(rows, indent=1))

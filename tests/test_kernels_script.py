"""benchmarks/kernels.py's table: the columns every row gets (the timings themselves need a GPU)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("abqc_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rec(impl, us, bits="w2a8", m=128):
    return {"gpu": "G", "impl": impl, "bits": bits, "M": m, "N": 64, "K": 64, "median_us": us,
            "tflops_or_tops": 1.0, "weight_bw_frac": None, "note": "", "software": "s"}


def test_table_compares_every_row_with_fp16_int8_gemm_and_the_whole_w8a8_linear(tmp_path):
    kernels = _load()
    records = [_rec("cublas-fp16", 20.0, "w16a16"), _rec("int8-int_mm", 10.0, "w8a8"),
               _rec("int8-linear", 16.0, "w8a8"), _rec("abqc", 8.0)]
    kernels.write_md(records, tmp_path / "k.md", 2.7e12)
    rows = [line for line in (tmp_path / "k.md").read_text().splitlines() if line.startswith("| abqc ")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    header = [line for line in (tmp_path / "k.md").read_text().splitlines() if line.startswith("| impl")][0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cells[cols.index("× FP16")] == "2.50" and cells[cols.index("× INT8")] == "1.25"
    assert cells[cols.index("× W8A8 lin")] == "2.00"
    old = [r for r in records if r["impl"] != "int8-linear"]          # a run from before the whole-linear row
    kernels.write_md(old, tmp_path / "old.md", 2.7e12)
    assert "| abqc | w2a8 | 128 | 64 | 64 | 8.00 | 1.0 | 2.50 | 1.25 |  |" in (tmp_path / "old.md").read_text()

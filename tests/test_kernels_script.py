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
    kernels.write_md(records, tmp_path / "k.md")
    rows = [line for line in (tmp_path / "k.md").read_text().splitlines() if line.startswith("| abqc ")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    header = [line for line in (tmp_path / "k.md").read_text().splitlines() if line.startswith("| impl")][0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cells[cols.index("× FP16")] == "2.50" and cells[cols.index("× INT8")] == "1.25"
    assert cells[cols.index("× W8A8 lin")] == "2.00"
    old = [r for r in records if r["impl"] != "int8-linear"]          # a run from before the whole-linear row
    kernels.write_md(old, tmp_path / "old.md")
    assert "| abqc | w2a8 | 128 | 64 | 64 | 8.00 | 1.0 | 2.50 | 1.25 |  |" in (tmp_path / "old.md").read_text()


def test_merge_joins_runs_split_by_m_in_shape_then_m_order_and_names_every_run(tmp_path):
    kernels = _load()
    import json

    def rec(impl, m, n, cmd, us=1.0):
        return dict(_rec(impl, us, m=m), N=n, command=cmd, copy_TBps=2.5 if "a" in cmd else 2.4)
    def base(m, n, cmd):    # the baselines every (M, N, K) of a run has
        return [rec("cublas-fp16", m, n, cmd), rec("int8-int_mm", m, n, cmd)]
    run_a = base(1, 64, "run a") + [rec("abqc", 1, 64, "run a", 5.0)] + base(1, 32, "run a")
    run_b = base(128, 64, "run b") + [rec("abqc", 1, 64, "run b", 4.0)] + base(128, 32, "run b")
    for name, run in (("a.json", run_a), ("b.json", run_b)):
        (tmp_path / name).write_text(json.dumps(run))
    kernels.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m" / "kernels.json").read_text())
    assert [(r["N"], r["M"], r["impl"]) for r in merged] == [
        (64, 1, "cublas-fp16"), (64, 1, "int8-int_mm"), (64, 1, "abqc"), (64, 128, "cublas-fp16"),
        (64, 128, "int8-int_mm"), (32, 1, "cublas-fp16"), (32, 1, "int8-int_mm"), (32, 128, "cublas-fp16"),
        (32, 128, "int8-int_mm")]
    assert [r["median_us"] for r in merged if r["impl"] == "abqc"] == [4.0]      # measured twice: the later run
    md = (tmp_path / "m" / "kernels.md").read_text()
    assert "`run a`" in md and "`run b`" in md and "2.50 TB/s" in md and "2.40 TB/s" in md
    (tmp_path / "c.json").write_text(json.dumps([dict(rec("abqc", 1, 64, "run c"), gpu="other")]))
    import pytest
    with pytest.raises(SystemExit, match="one GPU model"):
        kernels.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "x")])

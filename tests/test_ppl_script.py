"""benchmarks/ppl.py bookkeeping: records keyed by windows, hardware and recipe; one table per recipe."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import ppl  # noqa: E402

GPU, CPU = "NVIDIA H100 80GB HBM3", "CPU x86_64 x2 threads"
SHORT = {"samples": 8, "seqlen": 512, "epochs": 2, "epochs_2bit": 4, "batch": 4, "lr_clip": 0.05, "lr_smooth": 0.01}
LONG = {**SHORT, "batch": 1}


def _rec(method, bits, ppl_, hw=CPU, windows=8, calib=None):
    return {"model": "M", "corpus": "wiki", "seqlen": 2048, "windows": windows, "hardware": hw, "method": method,
            "bits": bits, "ppl": ppl_, **({"calib": calib} if calib else {})}


def _merge(tmp_path, records, command):
    parts = tmp_path / "parts"
    parts.mkdir(exist_ok=True)
    for f in parts.glob("*.json"):
        f.unlink()
    for i, r in enumerate(records):
        (parts / f"{i}.json").write_text(json.dumps(r))
    return ppl.merge(parts, command, tmp_path)


def test_records_of_other_windows_hardware_or_recipe_are_kept_and_tabled_apart(tmp_path):
    _merge(tmp_path, [_rec("fp16", "fp", 18.75, GPU, 44), _rec("abq", "w4a4", 90.5, GPU, 44, SHORT)], "first")
    recs = _merge(tmp_path, [_rec("fp16", "fp", 19.0), _rec("rtn", "w4a4", 1400.0),
                             _rec("abq", "w4a4", 211.0, calib=SHORT), _rec("abq+rot", "w4a4", 84.0, calib=SHORT),
                             _rec("abq", "w4a4", 150.0, calib=LONG)], "second")
    assert len(recs) == 7 and {r["command"] for r in recs if r["hardware"] == GPU} == {"first"}
    # the same key again replaces only its own record
    recs = _merge(tmp_path, [_rec("abq", "w4a4", 140.0, calib=LONG)], "third")
    assert len(recs) == 7 and sorted(r["ppl"] for r in recs if r["method"] == "abq") == [90.5, 140.0, 211.0]
    md = (tmp_path / "ppl.md").read_text()
    assert md.count("FP baseline") == 2 and "(CPU x86_64)" in md and f"({GPU})" in md
    short, long_ = ppl._recipe(SHORT), ppl._recipe(LONG)
    assert "batch 4" in short and "batch 1" in long_
    cpu = md.split("(CPU x86_64)")[1].split("## All records")[0]
    t_short = cpu.split(f"Calibration {short}:")[1].split("Calibration")[0]
    t_long = cpu.split(f"Calibration {long_}:")[1].split("Calibration")[0]
    assert "| bits | rtn | abq | abq+rot |" in t_short and "| w4a4 | 1400.000 (+7268.4%) | 211.000" in t_short
    assert "| bits | rtn | abq |" in t_long and "140.000" in t_long and "211.000" not in t_long


def test_cpu_records_with_other_thread_shares_share_one_table(tmp_path):
    """A job's thread count is its own field: "CPU x86_64 x1 threads" (old form) tables with x2 rows."""
    recs = _merge(tmp_path, [_rec("fp16", "fp", 19.0), _rec("rtn", "w4a4", 1400.0),
                             _rec("gptq", "w4a4", 1090.0, "CPU x86_64 x1 threads", calib=SHORT)], "c")
    assert {r["hardware"] for r in recs} == {"CPU x86_64"} and sorted(r["threads"] for r in recs) == [1, 2, 2]
    md = (tmp_path / "ppl.md").read_text()
    assert md.count("FP baseline") == 1 and "| w4a4 | 1400.000 (+7268.4%) | 1090.000 (+5636.8%) |" in md


def test_a_part_keeps_the_command_that_made_it(tmp_path):
    """Parts left in the folder by an earlier run keep that run's command when a later run merges them;
    parts without one (older jobs) take the merging run's."""
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.json").write_text(json.dumps({**_rec("rtn", "w4a4", 1400.0), "command": "earlier run"}))
    (parts / "b.json").write_text(json.dumps(_rec("fp16", "fp", 19.0)))
    recs = ppl.merge(parts, "this run", tmp_path)
    assert {r["method"]: r["command"] for r in recs} == {"rtn": "earlier run", "fp16": "this run"}

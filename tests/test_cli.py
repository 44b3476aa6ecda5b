"""CLI: help for every subcommand and option, one-line errors with exit status 2, compile -> report -> export."""
import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from abqc import cli
from abqc.runtime import cuda as rcuda

COMMANDS = ["compile", "eval", "report", "export", "bench"]


def _subparsers():
    p = cli.build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_cli_methods_are_the_compile_presets():
    from abqc.passes import METHODS
    assert cli.METHODS == tuple(METHODS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sub = _subparsers()[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 15, f"{command} {action.dest} lacks help"
        name = action.option_strings[0] if action.option_strings else action.dest
        assert name in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("argv, needle", [
    (["compile", "--bits", "w9a8"], "w9a8"),
    (["compile", "--calib-samples", "0"], "integer >= 1"),
    (["compile", "--method", "awq"], "invalid choice"),
    (["eval", "--limit", "x"], "not an integer"),
    (["report", "/nonexistent/dir"], "no report at"),
    (["export", "--out", "model.txt"], ".onnx"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.skipif(rcuda.available(), reason="checks the message shown without a usable CUDA GPU")
def test_bench_without_cuda_says_what_is_needed(capsys):
    assert cli.main(["bench", "--m", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "pip install" in err


@pytest.mark.skipif(not rcuda.available(), reason="needs a CUDA GPU (sm_80+) with cuda-bindings")
def test_bench_on_gpu_prints_a_row_per_m(capsys):
    assert cli.main(["bench", "--bits", "w2a8", "--shape", "256", "512", "--m", "1", "8", "--iters", "2"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.split() and ln.split()[0] in ("1", "8")]
    assert len(rows) == 2 and all(float(v) > 0 for r in rows for v in r.split()[1:])


class CharTokenizer:
    """Enough of a tokenizer for calibration_samples: one id per character."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text[:20000]]]))


@pytest.fixture
def tiny_cli(monkeypatch):
    info = SimpleNamespace(name="tiny-llama", source="tests/conftest.py")
    monkeypatch.setattr(cli, "_load", lambda args: (tiny_model("llama"), CharTokenizer(), info))


def test_compile_report_export_round_trip(tiny_cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["compile", "--bits", "w4a8,down=w4a16", "--method", "rtn", "--no-eval", "--quiet",
                     "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "rtn" and rep["model"]["name"] == "tiny-llama"
    assert cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "w4a8,down=w4a16" in page and page.count("data:image/png;base64,") == 1   # the bit map
    onnx_path = tmp_path / "b.onnx"
    assert cli.main(["export", "--bits", "w4a8", "--scope", "block", "--layer", "1", "--out", str(onnx_path),
                     "--graph", str(tmp_path / "g"), "--check", "--quiet"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(next(ln for ln in text.splitlines() if ln.startswith("{")))
    assert summary["scope"] == "block" and summary["quantized_linears_by_bits"] == {"w4a8 (uint4)": 7}
    diff = float(text.split("max |diff| ")[1].split()[0])
    assert onnx_path.stat().st_size > 0 and diff <= 1e-4
    assert (tmp_path / "g" / "block1_graph.dot").exists()


def test_compile_abq_method_with_calibration_flags(tiny_cli, tmp_path):
    out = tmp_path / "abq"
    assert cli.main(["compile", "--bits", "w4a8", "--method", "abq", "--calib-samples", "2", "--calib-seqlen", "16",
                     "--epochs", "1", "--no-eval", "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "abq" and any(p["name"] == "sensitivity" for p in rep["passes"])


def test_module_entry_point_exit_code():
    r = subprocess.run([sys.executable, "-m", "abqc.cli", "report", "/nonexistent"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("abqc: error: no report at")

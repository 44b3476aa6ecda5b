"""benchmarks/e2e.py: the dry run (whole flow on CPU, tiny shape), its pieces, and GPU smoke tests (skipped
without CUDA) that the next GPU session runs before the full benchmark."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from abqc import quant
from abqc.bits import parse_pair
from abqc.runtime import QuantLinear
from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("abqc_bench_e2e", ROOT / "benchmarks" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod      # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


e2e = _load_script()
HAS_GPU_RUNTIME = torch.cuda.is_available() and __import__("abqc.runtime.cuda", fromlist=["x"]).available()


def test_dry_run_measures_every_kind_of_implementation(tmp_path):
    # fp16, the int_mm baseline and one abqc pair cover every code path (the other pairs differ only in bits)
    rc = e2e.main(["--dry-run", "--impls", "fp16", "w8a8", "w4a8", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["impl"] for r in records] == ["fp16", "w8a8", "w4a8"]
    for r in records:
        assert {"gpu", "model_shape", "impl", "bits", "batch", "ttft_ms", "tpot_ms", "peak_mem_gib", "weight_gib",
                "layers", "note"} <= set(r)
        assert r["status"] == "ok" and r["batch"] == 1 and r["layers"] == 2 and "random weights" in r["model_shape"]
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        assert r["static_tokens_match"] is True, r["note"]      # the StaticCache decode path is the same model
    by = {r["impl"]: r for r in records}
    assert by["w4a8"]["bits"] == "w4a8" and by["fp16"]["bits"] == "w16a16"
    assert by["w4a8"]["weight_gib"] < by["w8a8"]["weight_gib"] < by["fp16"]["weight_gib"]
    md = (tmp_path / "e2e.md").read_text()
    assert "python benchmarks/e2e.py --dry-run --impls fp16 w8a8 w4a8" in md
    assert "| fp16 | w16a16 | 1 |" in md and "| w4a8 | w4a8 | 1 |" in md and "CPU (dry run)" in md
    # --render rebuilds the same table from the JSON (how a PPL check of another command joins it)
    (tmp_path / "e2e.md").unlink()
    assert e2e.main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "e2e.md").read_text() == md


def test_compile_option_runs_abqc_linears_between_compiled_pieces(tmp_path):
    """--compile: torch.compile over a fused abqc model (on CUDA its linears are abqc::tiled_linear nodes):
    it decodes, and its static-cache tokens equal its eager ones."""
    assert e2e.main(["--dry-run", "--compile", "--impls", "w2a8", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "e2e.json").read_text())
    assert r["status"] == "ok" and r["static_tokens_match"] is True, r["note"]
    assert "torch.compile'd" in r["note"] and "fused" in r["note"]


def test_deadline_records_what_was_skipped(tmp_path):
    assert e2e.main(["--dry-run", "--deadline", "1e-9", "--impls", "fp16", "w2a8", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["impl"], r["status"]) for r in records] == [("fp16", "skipped"), ("w2a8", "skipped")]
    assert "Not run (--deadline reached): fp16 batch 1, w2a8 batch 1." in (tmp_path / "e2e.md").read_text()


def test_dry_run_never_defaults_to_the_committed_results():
    assert Path(e2e.parse_args(["--dry-run"]).out) != ROOT / "benchmarks" / "results"
    assert Path(e2e.parse_args([]).out) == ROOT / "benchmarks" / "results"


def test_append_merges_runs_and_replaces_redone_points(tmp_path):
    def run(*extra):
        assert e2e.main(["--dry-run", "--deadline", "1e-9", "--out", str(tmp_path), *extra]) == 0
        return [(r["impl"], r["batch"], r["command"]) for r in json.loads((tmp_path / "e2e.json").read_text())]

    run("--impls", "w4a8", "--batches", "1", "2")
    assert [r[:2] for r in run("--append", "--impls", "fp16")] == [("w4a8", 1), ("w4a8", 2), ("fp16", 1)]
    merged = run("--append", "--impls", "w4a8", "--batches", "2")
    assert [r[:2] for r in merged] == [("w4a8", 1), ("fp16", 1), ("w4a8", 2)] and "--append" in merged[2][2]
    md = (tmp_path / "e2e.md").read_text()
    assert "Commands (merged with --append): " in md and md.index("fp16 batch 1") < md.index("w4a8 batch 1")
    assert len(run("--impls", "fp16")) == 1                      # without --append a run starts afresh


def test_render_without_results_exits_2(tmp_path, capsys):
    assert e2e.main(["--render", "--out", str(tmp_path)]) == 2
    assert "run the benchmark first" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--check-ppl"], ["--layers", "2"]])
def test_without_cuda_exits_2_with_one_line(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert e2e.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no CUDA device" in err and "--dry-run" in err


def test_w8a8_linear_is_an_int8_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    q = e2e.W8A8Linear(lin)
    assert q.w_int8.dtype == torch.int8 and q.w_int8.shape == (48, 64)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert ((y - ref).norm() / ref.norm()).item() < 0.02
    # exactly the int8 arithmetic: dequantized operands in float64 give the same product
    codes, s = e2e.quantize_rows(x.reshape(-1, 64))
    exact = (codes.double() @ q.w_int8.double().t()) * s.double() * q.w_scale.double() + lin.bias.double()
    torch.testing.assert_close(y.reshape(-1, 48).double(), exact, rtol=1e-5, atol=1e-5)


def test_random_model_is_seeded_and_keeps_rotary_frequencies():
    shape = e2e.TINY
    a = e2e.random_model(shape, torch.device("cpu"), torch.float32, seed=1)
    b = e2e.random_model(shape, torch.device("cpu"), torch.float32, seed=1)
    c = e2e.random_model(shape, torch.device("cpu"), torch.float32, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones(shape.hidden))
    std = sa["model.layers.1.self_attn.q_proj.weight"].std().item()
    assert abs(std - 0.02) < 0.002
    # the rotary buffers are computed, not loaded: after to_empty they must equal a normally built model's
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_config(e2e.llama_config(shape))
    torch.testing.assert_close(a.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    out = a(torch.randint(0, shape.vocab, (1, 6))).logits
    assert out.shape == (1, 6, shape.vocab) and torch.isfinite(out).all()


def test_ppl_check_path_on_cpu():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (200,))
    rec = e2e.ppl_check(tiny_model("llama"), ids, "w4a8", limit=2, seqlen=64, device="cpu")
    assert rec["windows"] == 2 and rec["seqlen"] == 64 and rec["bits"] == "w4a8"
    assert rec["ppl_cpu"] == rec["ppl_gpu"] and rec["rel_diff"] == 0 and rec["ok"] is True


def _rec(impl, batch, ttft, tpot, graph, weight):
    return {"gpu": "G", "model_shape": "S, random weights", "impl": impl, "bits": impl, "batch": batch,
            "status": "ok", "command": "python benchmarks/e2e.py", "software": "torch",
            "ttft_ms": ttft, "tpot_ms": tpot, "tpot_graph_ms": graph, "peak_mem_gib": 1.0, "weight_gib": weight,
            "layers": 32, "prompt": 512, "steps": 64, "repeats": 3, "note": "n"}


def test_markdown_ratios_and_targets(tmp_path):
    records = [_rec("fp16", 1, 40.0, 20.0, 12.0, 12.5), _rec("w8a8", 1, 30.0, 22.0, 9.0, 6.5),
               _rec("w2a8", 1, 50.0, 25.0, 5.0, 2.0), _rec("w4a4", 1, 45.0, 24.0, None, 3.5)]
    md = e2e.markdown(records, tmp_path)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| ") and "TTFT" not in line}
    # columns: impl bits batch TTFT TPOT graph tok/s TTFTxFP16 decodexFP16 decodexW8A8 peak weights w/FP16 ...
    assert rows["w2a8"][7:10] == ["0.80", "2.40", "1.80"]        # decode ratios use graph times
    assert rows["w4a4"][8:10] == ["0.83", "0.92"]                # no graph time: eager ratios
    assert rows["w2a8"][6] == "200" and rows["w2a8"][12] == "0.16"
    assert "W2A8 decode vs FP16: 2.400× (target ≥ 2.0×: met)" in md
    assert "W2A8 decode vs W8A8: 1.800× (target ≥ 1.6×: met)" in md
    assert "W2A8 weights / FP16 weights: 0.160 (target ≤ 0.2: met;" in md
    (tmp_path / "e2e_ppl.json").write_text(json.dumps(
        {"model": "M", "bits": "w4a8", "method": "rtn", "windows": 8, "seqlen": 2048, "ppl_cpu": 33.0,
         "ppl_gpu": 33.5, "rel_diff": 0.5 / 33, "ok": False, "gpu": "G", "command": "c"}))
    assert "1.515% (target <= 0.5%: NOT met)" in e2e.markdown(records, tmp_path)
    compiled = [dict(r, command="python benchmarks/e2e.py --compile") for r in records[:3]]
    compiled[2]["tpot_graph_ms"] = 4.0                          # W2A8 3.0x FP16 once compiled
    (tmp_path / "e2e_compiled.json").write_text(json.dumps(compiled))
    md = e2e.markdown(records, tmp_path)
    section = md[md.index("## Issue 5 targets with torch.compile"):]
    assert "W2A8 decode vs FP16: 3.000× (target ≥ 2.0×: met)" in section and "--compile" in section
    assert "W2A8 decode vs FP16: 2.400×" in md[:md.index("## Issue 5 targets with torch.compile")]
    assert "targets with torch.compile" not in e2e.markdown(compiled, tmp_path)   # the compiled table itself


def _oracle_pack(codes: torch.Tensor, planes: int) -> torch.Tensor:
    """Bit-planes by plain Python ints: plane i, row r, word w holds bit i of codes[r, 32w + j] at bit j."""
    r, k = codes.shape
    words = -(-k // 32)
    out = torch.zeros(planes, r, words, dtype=torch.int32)
    for i in range(planes):
        for row in range(r):
            for w in range(words):
                v = sum(((int(codes[row, 32 * w + j]) >> i) & 1) << j for j in range(min(32, k - 32 * w)))
                out[i, row, w] = v - (1 << 32) if v >= 1 << 31 else v
    return out


@pytest.mark.parametrize("planes", [1, 3, 8])
def test_pack_bitplanes_matches_python_ints(planes):
    torch.manual_seed(planes)
    codes = torch.randint(0, 2 ** planes, (3, 45))
    assert torch.equal(quant.pack_bitplanes(codes, planes), _oracle_pack(codes, planes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("planes", range(1, 9))
def test_pack_bitplanes_on_cuda_is_bit_identical(planes):
    torch.manual_seed(planes)
    codes = torch.randint(0, 2 ** planes, (37, 300))
    on_gpu = quant.pack_bitplanes(codes.cuda(), planes, pad_to=64)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), quant.pack_bitplanes(codes, planes, pad_to=64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quant_linear_built_on_cuda_equals_cpu_build():
    torch.manual_seed(0)
    lin = nn.Linear(200, 48)
    pair = parse_pair("w3a8")
    built = {}
    for dev in ("cpu", "cuda"):
        l = lin.to(dev)
        qw = quant.quantize_weight(l.weight, pair.w_bits, pair.group_size)
        built[dev] = QuantLinear.from_linear(l, pair, qw)
    cpu, gpu = built["cpu"].state_dict(), built["cuda"].state_dict()
    assert all(gpu[k].is_cuda for k in gpu)
    for k in ("w_planes", "w_zero", "w_sum"):
        assert torch.equal(gpu[k].cpu(), cpu[k]), k


@pytest.mark.skipif(not HAS_GPU_RUNTIME, reason="needs CUDA and abqc's GPU runtime (cuda-bindings)")
def test_gpu_smoke_two_layers_every_impl(tmp_path):
    # the full run's path at 2 layers: builds on the GPU, abqc compile of a CUDA model, CUDA-graph decode
    rc = e2e.main(["--layers", "2", "--batches", "1", "8", "--prompt", "64", "--steps", "8", "--repeats", "1",
                   "--out", str(tmp_path)])
    records = json.loads((tmp_path / "e2e.json").read_text())
    assert rc == 0, [r["note"] for r in records]
    assert len(records) == 10
    for r in records:
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["peak_mem_gib"] > 0, r
        assert r["tpot_graph_ms"] is not None and r["tpot_graph_ms"] > 0, r["note"]
    by = {(r["impl"], r["batch"]): r for r in records}
    assert by[("w2a8", 1)]["weight_gib"] < by[("w4a8", 1)]["weight_gib"] < by[("fp16", 1)]["weight_gib"]
    assert by[("w2a8", 1)]["tiled_copy_gib"] > 0

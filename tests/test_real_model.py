"""End to end on the shipped default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized) and corpus."""
import json
import subprocess
import sys

import pytest
import torch

import abqc
from abqc import data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return abqc.load()


@pytest.fixture(scope="module")
def eval_ids(default_model):
    return data.tokenize(default_model[1], data.split_text("wiki", "eval"))


def test_default_model_loads(default_model):
    model, tok, info = default_model
    assert info.model_type == "llama" and info.n_layers == 30
    assert "GGUF" in info.source and "dequantized" in info.source
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_quantized_ppl_on_short_slice(default_model, eval_ids):
    model, tok, _ = default_model
    fp = abqc.evaluate(model, ids=eval_ids, seqlen=256, limit=2, progress=False)["ppl"]
    assert 5 < fp < 60          # a real language model on English Wikipedia
    q8 = abqc.compile(model, bits="w8a8", method="rtn", progress=False)
    p8 = abqc.evaluate(q8, ids=eval_ids, seqlen=256, limit=2, progress=False)["ppl"]
    assert abs(p8 / fp - 1) < 0.05            # W8A8 RTN is near-lossless
    del q8
    q2 = abqc.compile(model, bits="w2a8", method="rtn", progress=False)
    p2 = abqc.evaluate(q2, ids=eval_ids, seqlen=256, limit=2, progress=False)["ppl"]
    assert p2 > 2 * fp                         # per-channel RTN W2 is badly lossy, as expected


def test_cli_compile_end_to_end(tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "abqc.cli", "compile", "--bits", "w4a8", "--seqlen", "128",
                        "--limit", "1", "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "fp (baseline)" in r.stdout and "w4a8" in r.stdout and "report:" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval"]["quantized"]["windows"] == 1 and rep["model"]["name"] == "SmolLM2-135M-Instruct"


def test_cli_bad_bits_exit_code():
    r = subprocess.run([sys.executable, "-m", "abqc.cli", "compile", "--bits", "w4a9", "--no-eval"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "abqc: error:" in r.stderr and "1..8 or 16" in r.stderr
    assert "Traceback" not in r.stderr


def test_any_hf_folder_loads_the_same_way(default_model, tmp_path):
    """A local Hugging Face folder (here: a tiny random Llama with the default tokenizer) goes through
    the same load -> compile -> evaluate path as the shipped model."""
    from conftest import tiny_model
    _, tok, _ = default_model
    model = tiny_model("llama", layers=2)
    model.config.vocab_size = 256
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2, info = abqc.load(str(tmp_path))
    assert info.model_type == "llama" and info.n_layers == 2 and info.source == str(tmp_path)
    ids = torch.randint(0, 256, (300,))
    q = abqc.compile(m2, bits="w4a8", method="rtn", progress=False)
    assert abqc.evaluate(q, ids=ids, seqlen=64, progress=False)["windows"] == 4


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(abqc.AbqcError, match="could not load model"):
        abqc.load(str(tmp_path / "nope"))
    with pytest.raises(abqc.AbqcError, match="does not exist"):
        abqc.load(str(tmp_path / "nope.gguf"))

"""Bad input gets an AbqcError naming the problem and the fix, raised by abqc itself (never a torch
stack trace), on one line; the CLI prints it as one line and exits with status 2.

CASES is the table: (id, action, error class, problem fragment, fix fragment). Every action runs on a
fresh tiny model (tests/conftest.py), so cases may break their model freely.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, OPTConfig
from transformers.pytorch_utils import Conv1D

import abqc
from abqc import cli, data, models, perplexity as ppl, quant
from abqc.bits import BitPair, parse_bits, parse_pair
from abqc.errors import AbqcError, BitSpecError, DataError, NoCudaError, NumericalError, UnsupportedModelError
from abqc.runtime import FakeQuantLinear, QuantLinear
from abqc.runtime import cuda as rcuda
from conftest import tiny_model


class ByteTok:
    """Tokenizer stub: one token per byte (ids < 256, the tiny models' vocabulary)."""

    def __call__(self, text, return_tensors=None):
        class R:
            pass
        r = R()
        r.input_ids = torch.tensor([list(text.encode())], dtype=torch.int64).view(1, -1)
        return r


@dataclass
class Env:
    model: torch.nn.Module       # fresh 2-layer tiny Llama, vocab 256, 128 positions
    tmp: Path

    def text_file(self, content: bytes) -> str:
        p = self.tmp / "corpus.txt"
        p.write_bytes(content)
        return str(p)


@dataclass
class Case:
    id: str
    run: Callable[[Env], object]
    error: type
    problem: str     # regex naming what is wrong
    fix: str         # regex naming what to do instead
    no_cuda: bool = False   # simulate a machine without CUDA (also on GPU machines)


def _compile(m, **kw):
    # the RTN pipeline needs no calibration data, so the model and calib checks are what fails
    return abqc.compile(m, passes=("rtn", "lower"), progress=False, **kw)


def _with(m, fn):
    fn(m)
    return m


def _set_q_proj(m, module):
    m.model.layers[0].self_attn.q_proj = module
    return m


def _ql(k=64, n=16):
    lin = torch.nn.Linear(k, n)
    return QuantLinear.from_linear(lin, parse_pair("w4a8"), quant.quantize_weight(lin.weight, 4))


def _int8_linear():
    lin = torch.nn.Linear(64, 64, bias=False)
    lin.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    return lin


def _poison(value):
    def fn(m):
        with torch.no_grad():
            m.model.layers[0].self_attn.q_proj.weight[3, 5] = value
    return fn


IDS = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
ACCEPTED = "accepted: "

CASES = [
    # ---- bit strings and overrides (abqc/bits.py)
    Case("unknown-bit-string", lambda e: parse_bits("int4"), BitSpecError, "unknown bit string 'int4'", ACCEPTED),
    Case("bits-not-a-string", lambda e: parse_bits(4), BitSpecError, "bits must be a string", "like 'w4a8'"),
    Case("empty-bit-string", lambda e: parse_bits(" "), BitSpecError, "empty bit string", ACCEPTED),
    Case("trailing-garbage", lambda e: parse_bits("w4a8x"), BitSpecError, "unknown bit string 'w4a8x'", ACCEPTED),
    Case("override-without-pair", lambda e: parse_bits("w4a8,down"), BitSpecError, "override 'down'",
         "form selector=pair"),
    Case("override-unknown-role", lambda e: parse_bits("w4a8", {"mlp": "w8a8"}), BitSpecError,
         "unknown override selector 'mlp'", "use a role"),
    Case("override-bad-pair", lambda e: parse_bits("w4a8", {"down": "w4"}), BitSpecError,
         "unknown bit string 'w4'", ACCEPTED),
    Case("override-reversed-range", lambda e: parse_bits("w4a8,3-1=w8a8"), BitSpecError, "empty layer range",
         "smaller index first"),
    Case("overrides-not-a-dict", lambda e: parse_bits("w4a8", "down=w8a8"), BitSpecError,
         "overrides must be a dict", r"\{'down': 'w4a8'"),
    Case("override-past-last-layer", lambda e: _compile(e.model, bits="w4a8,9=w8a8"), BitSpecError,
         "names layer 9, but the model has 2 decoder layers", r"\(0\.\.1\)"),
    # ---- bits outside 1..8
    Case("w9", lambda e: parse_bits("w9a8"), BitSpecError, "weight bits 9 .* outside 1..8", "use w16a16"),
    Case("w0", lambda e: parse_bits("w0a8"), BitSpecError, "weight bits 0 .* outside 1..8", "use w16a16"),
    Case("a0", lambda e: parse_bits("w4a0"), BitSpecError, "activation bits 0", "must be 1..8 or 16"),
    Case("a12", lambda e: parse_bits("w4a12"), BitSpecError, "activation bits 12", "must be 1..8 or 16"),
    Case("star-not-2bit", lambda e: parse_bits("w3*a8"), BitSpecError, "only for 2-bit weights", "drop the"),
    Case("bitpair-object-w9", lambda e: _compile(e.model, bits=BitPair(9, 8)), BitSpecError,
         "weight bits 9 in 'w9a8'", "use w16a16"),
    Case("bitpair-override-a3-float", lambda e: parse_bits("w4a8", {"down": BitPair(4, 3.5)}), BitSpecError,
         r"invalid BitPair\(w_bits=4, a_bits=3.5.*unknown bit string 'w4a3.5'", ACCEPTED),
    # ---- group sizes
    Case("group-not-multiple-of-32", lambda e: parse_bits("w4a8g48"), BitSpecError, "group size 48",
         "positive multiple of 32"),
    Case("group-zero", lambda e: parse_bits("w4a16g0"), BitSpecError, "group size 0", "positive multiple of 32"),
    Case("group-in-override", lambda e: parse_bits("w4a8,down=w4a8g20"), BitSpecError, "group size 20",
         "positive multiple of 32"),
    Case("group-zero-bitpair", lambda e: parse_bits(BitPair(4, 8, group_size=0)), BitSpecError, "invalid BitPair",
         "positive multiple of 32"),
    # ---- unsupported architectures and modules
    Case("gpt2", lambda e: _compile(AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))), UnsupportedModelError,
         "unsupported architecture 'gpt2'", "llama, qwen2, mistral"),
    Case("opt", lambda e: _compile(AutoModelForCausalLM.from_config(OPTConfig(
        num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=64,
        word_embed_proj_dim=32))), UnsupportedModelError, "unsupported architecture 'opt'", "llama, qwen2, mistral"),
    Case("not-a-causal-lm", lambda e: _compile(torch.nn.Linear(4, 4)), UnsupportedModelError,
         "unsupported architecture 'Linear'", "llama, qwen2, mistral"),
    Case("conv1d-projection", lambda e: _compile(_set_q_proj(e.model, Conv1D(64, 64))), UnsupportedModelError,
         "layer 0 self_attn.q_proj is a Conv1D, not torch.nn.Linear", "replace it with nn.Linear"),
    # ---- models already quantized
    Case("compiled-model", lambda e: _compile(_compile(e.model)), AbqcError, "already compiled",
         "compile the floating-point model"),
    Case("holds-quantlinear", lambda e: _compile(_set_q_proj(e.model, _ql())), UnsupportedModelError,
         "already quantized .*QuantLinear", "original FP16/BF16/FP32 checkpoint"),
    Case("holds-fakequantlinear", lambda e: _compile(_set_q_proj(e.model, FakeQuantLinear(
        torch.zeros(64, 64), None, parse_pair("w4a8")))), UnsupportedModelError,
         "already quantized .*FakeQuantLinear", "original FP16/BF16/FP32 checkpoint"),
    Case("gptq-config", lambda e: _compile(_with(e.model, lambda m: setattr(
        m.config, "quantization_config", {"quant_method": "gptq", "bits": 4}))), UnsupportedModelError,
         "already quantized .*quantization_config: gptq", "original FP16/BF16/FP32 checkpoint"),
    Case("bitsandbytes-config", lambda e: _compile(_with(e.model, lambda m: setattr(
        m.config, "quantization_config", BitsAndBytesConfig(load_in_4bit=True)))), UnsupportedModelError,
         "already quantized .*quantization_config: bitsandbytes", "original FP16/BF16/FP32 checkpoint"),
    Case("int8-weights", lambda e: _compile(_set_q_proj(e.model, _int8_linear())), UnsupportedModelError,
         "already quantized .*q_proj stores torch.int8 weights", "original FP16/BF16/FP32 checkpoint"),
    # ---- calibration and evaluation text (abqc/data.py)
    Case("tokenize-empty", lambda e: data.tokenize(ByteTok(), ""), DataError, "empty text", "non-empty string"),
    Case("tokenize-blank", lambda e: data.tokenize(ByteTok(), " \n\n "), DataError, "empty text", "non-empty string"),
    Case("tokenize-no-tokens", lambda e: data.tokenize(lambda t, return_tensors=None: type(
        "R", (), {"input_ids": torch.zeros(1, 0, dtype=torch.long)}), "abc"), DataError, "produced no tokens",
         "tokenizer matches the model"),
    Case("empty-corpus-file", lambda e: data.calibration_samples(ByteTok(), n=1, seqlen=8,
                                                                corpus=e.text_file(b"\n \n")),
         DataError, "is empty", "at least one non-blank line"),
    Case("too-short-calibration-text", lambda e: data.calibration_samples(
        ByteTok(), n=1, seqlen=64, corpus=e.text_file(b"a\nb\nc\nd\ne\n")), DataError,
         "calibration text has 10 tokens, fewer than one window of 64", "shorter seqlen or a larger corpus"),
    Case("not-utf8-corpus", lambda e: data.documents(e.text_file(b"\xff\xfe\x00abc")), DataError,
         "is not UTF-8 text", "pass a UTF-8 text file"),
    Case("unknown-corpus", lambda e: data.corpus_file("wikitext103"), DataError, "unknown corpus 'wikitext103'",
         "use one of wiki, c4"),
    Case("zero-samples", lambda e: data.calibration_samples(ByteTok(), n=0, seqlen=16), DataError,
         "at least one sample", "pass n >= 1"),
    Case("calibration-samples-seqlen-over-max", lambda e: data.calibration_samples(
        ByteTok(), n=1, seqlen=256, max_seqlen=e.model.config.max_position_embeddings), DataError,
         "calibration seqlen 256 exceeds the model's maximum of 128", "seqlen <= 128"),
    # ---- perplexity inputs
    Case("ppl-seqlen-over-model-max", lambda e: ppl.perplexity(e.model, ids=IDS, seqlen=256, progress=False),
         DataError, "seqlen 256 exceeds the model's maximum of 128", "smaller --seqlen"),
    Case("ppl-seqlen-1", lambda e: ppl.perplexity(e.model, ids=IDS, seqlen=1, progress=False), DataError,
         "seqlen 1 is too short", "seqlen >= 2"),
    Case("ppl-limit-0", lambda e: ppl.perplexity(e.model, ids=IDS, seqlen=16, limit=0, progress=False), DataError,
         "limit 0 leaves no window", "limit >= 1"),
    Case("ppl-float-ids", lambda e: ppl.perplexity(e.model, ids=IDS.float(), seqlen=16, progress=False), DataError,
         "ids must be a LongTensor of token ids .* got torch.float32", "tokenize the text"),
    Case("ppl-2d-ids", lambda e: ppl.perplexity(e.model, ids=IDS.view(4, 100), seqlen=16, progress=False),
         DataError, r"1-D tensor .* shape \(4, 100\)", r"ids.flatten\(\)"),
    Case("ppl-ids-past-vocab", lambda e: ppl.perplexity(e.model, ids=IDS + 256, seqlen=16, progress=False),
         DataError, r"token ids in ids span \[\d+, \d+\] but the model's vocabulary is \[0, 255\]",
         "model's own tokenizer"),
    Case("ppl-text-too-short", lambda e: ppl.perplexity(e.model, ids=IDS[:10], seqlen=16, progress=False),
         DataError, "10 tokens, fewer than one window of 16", "smaller seqlen"),
    # ---- calibration tensors passed to compile
    Case("calib-float", lambda e: _compile(e.model, calib=torch.randn(2, 8)), DataError,
         "calib must be a LongTensor .* got torch.float32", "tokenize the text"),
    Case("calib-1d", lambda e: _compile(e.model, calib=IDS[:16]), DataError,
         r"\[n_samples, seqlen\], got \(16,\)", "calibration_samples"),
    Case("calib-list", lambda e: _compile(e.model, calib=[[1, 2, 3]]), DataError,
         r"\[n_samples, seqlen\], got list", "calibration_samples"),
    Case("calib-empty", lambda e: _compile(e.model, calib=torch.zeros(0, 8, dtype=torch.long)), DataError,
         r"calib has shape \(0, 8\)", "at least one sample of at least 2 tokens"),
    Case("calib-ids-past-vocab", lambda e: _compile(e.model, calib=torch.full((2, 8), 300)), DataError,
         r"token ids in calib span \[300, 300\] .* \[0, 255\]", "model's own tokenizer"),
    Case("calib-negative-ids", lambda e: _compile(e.model, calib=torch.full((2, 8), -1)), DataError,
         r"span \[-1, -1\]", "model's own tokenizer"),
    Case("calib-seqlen-over-model-max", lambda e: _compile(e.model, calib=torch.zeros(1, 200, dtype=torch.long)),
         DataError, "calib seqlen 200 exceeds the model's maximum of 128", r"seqlen<=128"),
    # ---- NaN / inf in the model before compile
    Case("nan-weight", lambda e: _compile(_with(e.model, _poison(float("nan")))), NumericalError,
         r"model.layers.0.self_attn.q_proj.weight holds 1 NaN/inf", "reload a clean checkpoint"),
    Case("inf-weight", lambda e: _compile(_with(e.model, _poison(float("-inf")))), NumericalError,
         r"q_proj.weight holds 1 NaN/inf", "reload a clean checkpoint"),
    Case("nan-norm", lambda e: _compile(_with(e.model, lambda m: m.model.norm.weight.data.fill_(float("nan")))),
         NumericalError, r"model.norm.weight holds 64 NaN/inf", "reload a clean checkpoint"),
    Case("nan-logits-in-eval", lambda e: ppl.perplexity(_with(e.model, _poison(float("nan"))), ids=IDS, seqlen=16,
                                                      progress=False),
         NumericalError, "non-finite loss in window 0", "check its weights"),
    # ---- CUDA requested without a GPU (simulated on GPU machines too)
    Case("cuda-register", lambda e: rcuda.register(), NoCudaError, r"no CUDA device: .*register\(\)",
         "keep the model and inputs on the CPU", no_cuda=True),
    Case("cuda-quant-pack", lambda e: rcuda.quant_pack(torch.randn(2, 64), 8, 2, 1, 64, False), NoCudaError,
         r"no CUDA device: .*quant_pack\(\)", "keep the model and inputs on the CPU", no_cuda=True),
    Case("cuda-bmma-linear", lambda e: rcuda.bmma_linear(torch.randn(2, 64), _ql().w_planes, None, None, None, None,
                                                         16, 8, 2, 1, 64, False), NoCudaError,
         "no CUDA device", "keep the model and inputs on the CPU", no_cuda=True),
    Case("cuda-bmma", lambda e: rcuda.bmma(torch.zeros(1, 1, 1, 1, dtype=torch.int32),
                                           torch.zeros(8, 2, 2, dtype=torch.int32), 16, 64, 2, 0), NoCudaError,
         r"no CUDA device: .*bmma\(\)", "keep the model and inputs on the CPU", no_cuda=True),
    Case("cuda-arch", lambda e: rcuda.arch_of(torch.device("cuda")), NoCudaError, "no CUDA device",
         "keep the model and inputs on the CPU", no_cuda=True),
    Case("quantlinear-on-cuda", lambda e: _ql()._cuda_linear(torch.randn(2, 64)), NoCudaError, "no CUDA device",
         "keep the model and inputs on the CPU", no_cuda=True),
    Case("load-model-on-cuda", lambda e: models.load_model(str(e.tmp / "any-model"), device="cuda"), NoCudaError,
         "no CUDA device: 'cuda' was requested", "use device='cpu'", no_cuda=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_problem_and_fix(case, tmp_path, monkeypatch):
    if case.no_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setitem(rcuda._REGISTERED, "done", False)   # a GPU session may have registered already
    env = Env(tiny_model("llama"), tmp_path)
    with pytest.raises(case.error) as info:
        case.run(env)
    err = info.value
    msg = str(err)
    assert isinstance(err, AbqcError)
    assert re.search(case.problem, msg), msg
    if case.fix is not None:
        assert re.search(case.fix, msg), msg
    assert "\n" not in msg, "the CLI prints errors as one line"
    # raised by abqc's own checks, not surfacing from inside torch or transformers
    assert "/abqc/" in str(info.traceback[-1].path).replace("\\", "/"), info.traceback[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU tensors handed to the GPU entry points")
def test_cuda_entry_points_refuse_cpu_tensors():
    with pytest.raises(AbqcError, match="takes CUDA tensors, got one on cpu"):
        rcuda.quant_pack(torch.randn(2, 64), 8, 2, 1, 64, False)


# ---------------------------------------------------------------- CLI: one line, exit status 2

def _tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(i) if 33 <= i < 127 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Saved HF folders (model + tokenizer): a clean tiny Llama, one with a NaN, a GPT-2, a GPTQ-style one."""
    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()

    def save(name, model):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return str(root / name)

    dirs = {"tiny": save("tiny", tiny_model("llama")),
            "nan": save("nan", _with(tiny_model("llama"), _poison(float("nan")))),
            "gpt2": save("gpt2", AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                             vocab_size=256)))}
    gptq = Path(save("gptq", tiny_model("llama")))
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(cfg))
    dirs["gptq"] = str(gptq)
    (root / "empty.txt").write_text("\n\n")
    dirs["empty"] = str(root / "empty.txt")
    return dirs


CLI_CASES = [
    ("bad-bits", ["compile", "--model", "{tiny}", "--bits", "w9a8", "--no-eval"], "weight bits 9"),
    ("bad-override", ["compile", "--model", "{tiny}", "--bits", "w4a8,ffn=w8a8", "--no-eval"],
     "unknown override selector 'ffn'"),
    ("missing-model", ["compile", "--model", "{root}/no-such-model", "--no-eval"], "could not load model"),
    ("unsupported-arch", ["compile", "--model", "{gpt2}", "--no-eval"], "unsupported architecture 'gpt2'"),
    ("already-quantized", ["compile", "--model", "{gptq}", "--no-eval"], "already quantized .*gptq"),
    ("nan-weights", ["compile", "--model", "{nan}", "--passes", "rtn,lower", "--no-eval"], "holds 1 NaN/inf"),
    ("seqlen-too-long", ["eval", "--model", "{tiny}", "--seqlen", "4096"], "exceeds the model's maximum of 128"),
    ("seqlen-too-short", ["eval", "--model", "{tiny}", "--seqlen", "1"], "--seqlen: 1 is too small"),
    ("empty-corpus", ["eval", "--model", "{tiny}", "--corpus", "{empty}", "--seqlen", "16"], "is empty"),
]


@pytest.mark.parametrize("case_id,argv,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(case_id, argv, fragment, model_dirs, capsys, tmp_path):
    fmt = {**model_dirs, "root": str(tmp_path)}
    args = [a.format(**fmt) for a in argv] + ["--quiet"]
    if args[0] == "compile":
        args += ["--out", str(tmp_path / "out")]
    try:
        rc = cli.main(args)
    except SystemExit as e:   # argparse refuses malformed option values itself, also with status 2
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if re.match(r"abqc( \w+)?: error: ", ln)]
    assert len(lines) == 1, err
    assert re.search(fragment, lines[0]), lines[0]
    assert "Traceback" not in err

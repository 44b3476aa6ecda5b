"""abqc: arbitrary-bit quantization compiler for LLMs (ABQ-LLM recipe, bit-plane integer kernels).

    import abqc
    model, tok, info = abqc.load()                 # default: SmolLM2-135M-Instruct (pip-shipped GGUF)
    qmodel = abqc.compile(model, bits="w4a8")
    abqc.evaluate(qmodel, tok, limit=4)["ppl"]
"""
__version__ = "0.1.0"

from .bits import BitPair, BitSpec, parse_bits  # noqa: E402
from .compiler import CompiledModel, compile  # noqa: E402
from .errors import AbqcError  # noqa: E402
from .perplexity import perplexity as evaluate  # noqa: E402
from .models import load_model as load  # noqa: E402

__all__ = ["compile", "load", "evaluate", "CompiledModel", "BitPair", "BitSpec", "parse_bits", "AbqcError",
           "__version__"]

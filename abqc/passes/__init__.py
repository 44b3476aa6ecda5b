"""Graph passes. Each module holds one pass and states its invariant in its docstring."""
from .base import PassContext, PassReport, run_passes
from .lower import make_lower
from .rotate import rotate
from .rtn import rtn

# name -> factory of a pass; `abqc.compile(passes=[...])` accepts these names or callables
REGISTRY = {
    "rtn": lambda: rtn,
    "rotate": lambda: rotate,
    "lower": lambda: make_lower("real"),
    "lower_fake": lambda: make_lower("fake"),
}
DEFAULT_PIPELINE = ("rtn", "lower")

__all__ = ["PassContext", "PassReport", "run_passes", "rtn", "make_lower", "REGISTRY", "DEFAULT_PIPELINE"]

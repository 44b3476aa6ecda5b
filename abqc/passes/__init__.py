"""Graph passes. Each module holds one pass and states its invariant in its docstring.

REGISTRY maps a pass name to a factory taking the compile options
{"calibrate": CalibOptions fields, "sensitivity": {...}, "smoothquant": {...}, "gptq": {"act_order": bool},
"e2e": make_e2e's recipe}; METHODS are the
pipelines `abqc.compile(method=...)` runs.
"""
from .balance import balance
from .base import PassContext, PassReport, run_passes
from .calibrate import CalibOptions, make_calibrate
from .e2e import make_e2e
from .gptq import gptq, make_gptq
from .lower import make_lower
from .rotate import rotate
from .rtn import rtn
from .sensitivity import make_sensitivity
from .smooth import make_smoothquant

REGISTRY = {
    "rotate": lambda o: rotate,
    "balance": lambda o: balance,
    "sensitivity": lambda o: make_sensitivity(**o.get("sensitivity", {})),
    "smoothquant": lambda o: make_smoothquant(**o.get("smoothquant", {})),
    "abq": lambda o: make_calibrate("abq", o.get("calibrate")),
    "lwc-mse": lambda o: make_calibrate("lwc-mse", o.get("calibrate")),
    "rtn": lambda o: rtn,
    "gptq": lambda o: make_gptq(**o.get("gptq", {})),
    "e2e": lambda o: make_e2e(**o.get("e2e", {})),
    "lower": lambda o: make_lower("real"),
    "lower_fake": lambda o: make_lower("fake"),
}
METHODS = {
    "rtn": ("rtn", "lower"),
    "smoothquant": ("smoothquant", "rtn", "lower"),
    "lwc-mse": ("lwc-mse", "lower"),
    "abq": ("sensitivity", "abq", "lower"),
    "abq+rot": ("rotate", "sensitivity", "abq", "lower"),   # Hadamard-rotated residual stream, then ABQ
    "gptq": ("rtn", "gptq", "lower"),                        # RTN's grid, codes re-rounded by GPTQ
    "rot+gptq": ("rotate", "rtn", "gptq", "lower"),          # QuaRot's recipe: rotation, then GPTQ
    "abq+gptq": ("sensitivity", "abq", "gptq", "lower"),     # ABQ's learned grid, codes re-rounded by GPTQ
    "abq+rot+gptq": ("rotate", "sensitivity", "abq", "gptq", "lower"),   # all three: rotate, learn the grid, GPTQ
    "rot+gptq+e2e": ("rotate", "rtn", "gptq", "e2e", "lower"),          # then scales tuned on the whole model
    "abq+rot+gptq+e2e": ("rotate", "sensitivity", "abq", "gptq", "e2e", "lower"),
}
CALIBRATED = ("smoothquant", "sensitivity", "abq", "lwc-mse", "gptq", "e2e")   # passes that need calibration ids

__all__ = ["PassContext", "PassReport", "run_passes", "CalibOptions", "REGISTRY", "METHODS", "CALIBRATED",
           "balance", "gptq", "make_e2e", "make_gptq", "make_calibrate", "make_lower", "make_sensitivity", "make_smoothquant", "rotate", "rtn"]

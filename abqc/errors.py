"""User-facing errors. Every message names the problem and the fix, on one line.

Invariant: anything a user can get wrong (bit strings, models, data, devices) raises an AbqcError
subclass before torch sees it; the CLI prints these as one line and exits with status 2.
"""


class AbqcError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class BitSpecError(AbqcError, ValueError):
    """A bit string or override could not be parsed."""


class UnsupportedModelError(AbqcError):
    """The model architecture or one of its modules is not supported."""


class DataError(AbqcError):
    """Calibration or evaluation data is missing, empty, too short or malformed."""


class NumericalError(AbqcError, FloatingPointError):
    """NaN or inf where finite numbers are required (model weights, logits)."""


class NoCudaError(AbqcError):
    """A CUDA kernel was requested but no usable CUDA device or GPU runtime is present."""

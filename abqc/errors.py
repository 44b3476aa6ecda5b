"""User-facing errors. Every message names the problem and the fix."""


class AbqcError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class BitSpecError(AbqcError, ValueError):
    """A bit string or override could not be parsed."""


class UnsupportedModelError(AbqcError):
    """The model architecture or one of its modules is not supported."""


class DataError(AbqcError):
    """Calibration or evaluation data is missing, empty or too short."""

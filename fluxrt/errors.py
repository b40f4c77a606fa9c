"""The one small exception hierarchy of fluxrt.

Every error a user can cause derives from :class:`FluxRTError`; the CLI turns
these into a one-line message and a non-zero exit, without a traceback.
"""


class FluxRTError(Exception):
    """Base class of every error fluxrt raises on purpose."""


class CheckpointError(FluxRTError):
    """A checkpoint folder or file is missing, unreadable or malformed."""


class ExportError(FluxRTError):
    """An ONNX export folder is missing, incomplete or inconsistent."""


class EngineError(FluxRTError):
    """An engine plan is missing, stale, corrupted or built for another machine."""


class InvalidInputError(FluxRTError, ValueError):
    """A generation parameter is outside what the model or engines allow."""


class NumericError(FluxRTError):
    """A stage produced NaN or Inf."""

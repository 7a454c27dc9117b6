"""Typed errors: every bad input or failed component surfaces as one of these, with a readable message."""


class PearlError(Exception):
    """Base class of pearl_ray's errors."""


class InvalidParameterError(PearlError, ValueError):
    """A parameter is out of range (gamma < 1, negative temperature, top_p outside (0, 1], ...)."""


class PromptError(PearlError, ValueError):
    """A prompt is empty or longer than the model's context."""


class ModelNotFoundError(PearlError, FileNotFoundError):
    """A model path does not exist or holds no loadable model."""


class TokenizerMismatchError(PearlError, ValueError):
    """Draft and target tokenizers differ, so draft token ids would mean other tokens to the target."""


class DraftUnavailable(PearlError, RuntimeError):
    """The draft worker died or timed out (the coordinator falls back to the target alone)."""


class TargetUnavailable(PearlError, RuntimeError):
    """The target worker died or timed out; the request cannot finish."""


class QueueFullError(PearlError, RuntimeError):
    """Too many requests are waiting."""

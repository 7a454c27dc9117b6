"""Typed errors: every bad input or failed component surfaces as one of these, with a readable message."""


class PearlError(Exception):
    """Base class of pearl_ray's errors."""


class InvalidParameterError(PearlError, ValueError):
    """A parameter is out of range or of the wrong type (gamma < 1, negative temperature, seed=None, ...)."""


class CacheBudgetError(InvalidParameterError):
    """A request needs more KV-cache positions than the pair's ``kv_budget_tokens`` could ever give it."""


class PromptError(PearlError, ValueError):
    """A prompt is empty, not text or token ids, or longer than the model's context allows."""


class ContextLengthError(InvalidParameterError):
    """A request does not fit the model's context (``config.fit_context``): ``part`` says what to shorten,
    "prompt" (with the draft window it leaves no room to generate) or "max_new_tokens"."""

    def __init__(self, part: str, message: str):
        super().__init__(message)
        self.part = part


class ModelNotFoundError(PearlError, FileNotFoundError):
    """A model path does not exist or holds no loadable model."""


class UnsupportedModelError(PearlError, ValueError):
    """The model loads, but its family or configuration is one the engine cannot decode with (the message names
    the family and the reason): linear-attention or chunked layers, bidirectional attention, ..."""


class TokenizerMismatchError(PearlError, ValueError):
    """Draft and target tokenizers differ, so draft token ids would mean other tokens to the target."""


class DraftUnavailable(PearlError, RuntimeError):
    """A request needs the draft, and the draft cannot come up (it failed to start repeatedly)."""


class TargetUnavailable(PearlError, RuntimeError):
    """The target worker died or timed out; the request cannot finish (the target is restarted)."""


class RequestFailed(PearlError, RuntimeError):
    """One request failed inside the decoding loop (bad numbers in its rows, its stop rule raised); it alone
    ended, and the requests decoded beside it went on. The workers stay up."""


class CoordinatorUnavailable(PearlError, RuntimeError):
    """The Ray coordinator died or stopped answering; the request failed and the next one rebuilds it."""


class ResourcesUnavailable(PearlError, RuntimeError):
    """The Ray cluster could not grant the draft's and the target's resources in time."""


class QueueFullError(PearlError, RuntimeError):
    """Too many requests are waiting for this engine's pair; try again later."""


class EngineClosedError(PearlError, RuntimeError):
    """The engine was shut down."""


def pearl_cause(exc: BaseException) -> "PearlError | None":
    """The typed error a Ray task raised, when ``exc`` (a ``RayTaskError``) carries one as its cause."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, PearlError) else None

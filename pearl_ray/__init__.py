"""pearl_ray: PEARL (parallel speculative decoding with adaptive draft length) on Ray.

Public surface: ``PearlEngine``, ``SamplingParams``, ``GenerationOutput``, ``GenerationStats`` and the
typed errors. See README.md for usage.
"""

from .config import EngineOptions, SamplingParams
from .engine import GenerationOutput, PearlEngine
from .errors import (DraftUnavailable, InvalidParameterError, ModelNotFoundError, PearlError, PromptError,
                     QueueFullError, TargetUnavailable, TokenizerMismatchError)
from .metrics import GenerationStats, RoundTiming

__all__ = ["PearlEngine", "SamplingParams", "EngineOptions", "GenerationOutput", "GenerationStats", "RoundTiming",
           "PearlError", "InvalidParameterError", "PromptError", "ModelNotFoundError", "TokenizerMismatchError",
           "DraftUnavailable", "TargetUnavailable", "QueueFullError"]
__version__ = "0.1.0"

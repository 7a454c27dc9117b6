"""pearl_ray: PEARL (parallel speculative decoding with adaptive draft length) on Ray.

Public surface: ``PearlEngine`` (``generate``, ``stream``, ``astream``), ``SamplingParams``,
``EngineConfig``, ``GenerationOutput``, ``StreamChunk``, ``GenerationStats`` and the typed errors.
Layers, lowest first (none imports a later one): ``platform`` (host threads), ``core`` (pure torch: the batched
loop), ``modeling`` (transformers runners, model resolution), ``pair`` (a pair's models as the loop uses
them), ``runtime`` (Ray), ``backends`` (local and the protocol), ``serve``, ``evals``. See README.md for usage.
"""

from .config import EngineConfig, SamplingParams
from .core.metrics import GenerationStats, RoundTiming
from .engine import GenerationOutput, PearlEngine, StreamChunk
from .errors import (CoordinatorUnavailable, DraftUnavailable, EngineClosedError, InvalidParameterError,
                     ModelNotFoundError, PearlError, PromptError, QueueFullError, ResourcesUnavailable,
                     TargetUnavailable, TokenizerMismatchError, UnsupportedModelError)

__all__ = ["PearlEngine", "SamplingParams", "EngineConfig", "GenerationOutput", "StreamChunk", "GenerationStats", "TokenLogprob",
           "RoundTiming", "PearlError", "InvalidParameterError", "PromptError", "ModelNotFoundError",
           "TokenizerMismatchError", "UnsupportedModelError", "DraftUnavailable", "TargetUnavailable", "CoordinatorUnavailable",
           "ResourcesUnavailable", "QueueFullError", "EngineClosedError"]
__version__ = "0.3.0"  # keep equal to pyproject.toml (tests/test_newuser.py checks)

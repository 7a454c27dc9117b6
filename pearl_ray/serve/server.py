"""``PearlServer``: the model deployment. Each replica owns one ``PearlEngine``, i.e. one draft/target
pair, placed in the replica's own placement group (bundle 0 the replica, bundles 1 and 2 the draft and
the target), so scaling replicas scales pairs.

It speaks plain dicts, not HTTP: ``generate(payload)`` streams ``{"text"}`` deltas, then one final item
with ``finish_reason``, ``usage`` and the PEARL stats, or one ``{"error"}`` item. The ingress turns these
into OpenAI responses. Prompt building (chat template), lengths and sampling are checked here because
they need the tokenizer and the context; the engine re-checks everything it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve

from ..config import SamplingParams, fit_context
from ..engine import PearlEngine
from ..errors import (ContextLengthError, CoordinatorUnavailable, DraftUnavailable, EngineClosedError,
                      InvalidParameterError, PromptError, QueueFullError, RequestFailed, ResourcesUnavailable,
                      TargetUnavailable)
from .binding import bind_replica_server_to_node_ip
from .config import ServeConfig
from .metrics import ServerMetrics
from .protocol import FINISH_REASONS, LOGPROB_FLOOR, PEARL_STATS, ApiError

log = logging.getLogger("ray.serve")  # Serve's logger: the replica's log file and the console that started Serve
RESTARTS_EVERY_S = 2.0  # how often the worker-restart counter is refreshed from the coordinator while busy
UNAVAILABLE = (TargetUnavailable, DraftUnavailable, CoordinatorUnavailable, ResourcesUnavailable, EngineClosedError)
PARAM_NAMES = {"logprobs": "logprobs", "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "seed": "seed", "stop": "stop", "gamma": "gamma", "method": "method", "ignore_eos": "ignore_eos"}


def _param_of(exc: Exception, payload: dict) -> str | None:
    first = str(exc).split(" ", 1)[0]
    if first in PARAM_NAMES:
        return PARAM_NAMES[first]
    if isinstance(exc, PromptError) or "prompt" in str(exc):
        return "messages" if payload["kind"] == "chat" else "prompt"
    return None


def _api_words(message: str) -> str:
    return message.replace("max_new_tokens", "max_tokens")


def _snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")


@serve.deployment
class PearlServer:
    def __init__(self, config: dict, models: dict | None = None):
        """``models``: ready ``draft_model``/``target_model``/``tokenizer``/``eos_token_ids`` to inject
        instead of loading ``config.draft``/``config.target`` (tests)."""
        bind_replica_server_to_node_ip()
        self.config = c = ServeConfig.model_validate(config)
        pg = ray.util.get_current_placement_group()
        placement = ({"placement_group": pg, "bundle_indices": tuple(range(1, 2 + c.tensor_parallel_size))}
                     if pg is not None else {})
        self.engine = PearlEngine(
            c.draft, c.target, method=c.method, gamma=c.gamma, backend="ray", transport=c.transport,
            colocate=c.colocate, schedule=c.schedule, num_threads=c.num_threads, device=c.device, dtype=c.dtype, cpu_kernels=c.cpu_kernels,
            max_queued=c.max_ongoing_requests,
            max_num_seqs=min(c.max_num_seqs, c.max_ongoing_requests), kv_budget_tokens=c.kv_budget_tokens,
            max_prefill_tokens_per_round=c.max_prefill_tokens_per_round,
            draft_num_cpus=c.draft_num_cpus, target_num_cpus=c.target_num_cpus, draft_num_gpus=c.draft_num_gpus,
            target_num_gpus=c.target_num_gpus, tensor_parallel_size=c.tensor_parallel_size, **placement, **c.engine_options, **(models or {}))
        self.metrics = ServerMetrics(c.served_name)
        self.ongoing, self.finished = 0, 0
        self.restarts_seen: dict[str, int] = {}
        self.restarts_checked = float("-inf")
        self.watcher: asyncio.Task | None = None
        log.info("PEARL replica ready: %s", self.describe())

    def describe(self) -> dict:
        e = self.engine
        return {"draft": e.config.draft, "target": e.config.target, "method": e.method, "gamma": e.gamma,
                "max_context": e.max_context, "transport": e.config.transport,
                "colocated": e.config.colocate}

    async def generate(self, payload: dict):
        """Stream one request; see the module docstring for the items."""
        self.ongoing += 1
        self.metrics.queue(self.ongoing, self.engine.config.max_num_seqs)
        try:
            async for item in self._generate(payload):
                yield item
        finally:
            self.ongoing -= 1
            self.metrics.queue(self.ongoing, self.engine.config.max_num_seqs)

    async def _generate(self, payload: dict):
        engine, c = self.engine, self.config
        try:
            ids = self._prompt_ids(payload)
            # a request without "gamma" takes the engine's default: the adaptive policy, unless the replica
            # was configured with a fixed gamma (passing engine.gamma here would pin every request to it)
            method, gamma = payload.get("method") or engine.method, payload.get("gamma")
            sampling = dict(payload["sampling"])
            window = (gamma or engine.gamma) if method != "ar" else 0
            where = "messages" if payload["kind"] == "chat" else "prompt"
            try:  # the engine's length rule, checked here to name the field at fault and to fill max_tokens
                room = fit_context(engine.max_context, len(ids), window, sampling["max_new_tokens"])
            except (PromptError, ContextLengthError) as exc:
                param = "max_tokens" if getattr(exc, "part", None) == "max_new_tokens" else where
                raise ApiError(400, f"This model's maximum context length is {engine.max_context} tokens: {exc}",
                               param, "context_length_exceeded") from None
            if sampling["max_new_tokens"] is None:
                sampling["max_new_tokens"] = min(c.default_max_tokens, room)
            params = SamplingParams(**sampling)
            # a non-streamed answer needs the text, not each round's tokens: fewer messages from the leader
            result_only = not payload.get("stream", True)
            async for chunk in engine.astream(ids, params, method=method, gamma=gamma, result_only=result_only):
                if chunk.finish_reason is None:
                    if chunk.text or chunk.logprobs:
                        item = {"text": chunk.text or ""}
                        if chunk.logprobs is not None:
                            item["logprobs"] = self.logprob_entries(chunk.logprobs)
                        yield item
                    continue
                stats = chunk.stats
                self.finished += 1
                self.metrics.finish(stats.method or method, len(ids), stats)
                pearl = {k: getattr(stats, k) for k in PEARL_STATS}
                usage = {"prompt_tokens": len(ids), "completion_tokens": stats.new_tokens,
                         "total_tokens": len(ids) + stats.new_tokens}
                yield {"text": chunk.text or "", "finish_reason": FINISH_REASONS.get(chunk.finish_reason, "stop"),
                       "usage": usage, "pearl": pearl}
        except ApiError as exc:
            self.metrics.fail(exc.code or str(exc.status))
            yield {"error": exc.to_dict()}
        except (InvalidParameterError, PromptError) as exc:
            self.metrics.fail("invalid_request")
            yield {"error": ApiError(400, _api_words(str(exc)), _param_of(exc, payload), "invalid_value").to_dict()}
        except QueueFullError as exc:
            self.metrics.fail("queue_full")
            yield {"error": ApiError(503, str(exc), None, "overloaded", c.retry_after_s).to_dict()}
        except RequestFailed as exc:  # this request alone ended in the loop; the pair and the others go on
            log.warning("request failed: %s", exc)
            self.metrics.fail("request_failed")
            yield {"error": ApiError(500, str(exc), None, "request_failed").to_dict()}
        except UNAVAILABLE as exc:
            log.warning("request failed: %s", exc)
            name = type(exc).__name__
            self.metrics.fail(name)
            yield {"error": ApiError(503, f"{name}: {exc}", None, _snake(name), c.retry_after_s).to_dict()}
        except Exception as exc:  # noqa: BLE001 - answered as a 500, the replica keeps serving
            log.exception("request failed")
            self.metrics.fail("internal")
            yield {"error": ApiError(500, f"internal error: {type(exc).__name__}: {exc}").to_dict()}
        finally:
            if self.watcher is None or self.watcher.done():
                self.watcher = asyncio.get_running_loop().create_task(self._count_restarts())

    def logprob_entries(self, logprobs) -> list[dict]:
        """``TokenLogprob``s -> plain entries with each token's text and UTF-8 bytes (``ResponseBuilder``)."""
        tok = self.engine.tokenizer
        cache: dict[int, tuple[str, list[int]]] = {}

        def text(token_id: int) -> tuple[str, list[int]]:
            if token_id not in cache:
                s = tok.decode([token_id]) if tok is not None else str(token_id)
                cache[token_id] = (s, list(s.encode("utf-8", "replace")))
            return cache[token_id]

        def floor(lp: float) -> float:
            return max(lp, LOGPROB_FLOOR) if lp == lp else LOGPROB_FLOOR  # -inf and NaN are not JSON

        return [{"token": text(e.token_id)[0], "logprob": floor(e.logprob), "bytes": text(e.token_id)[1],
                 "top": [[text(t)[0], floor(lp), text(t)[1]] for t, lp in e.top]} for e in logprobs]

    def _prompt_ids(self, payload: dict) -> list[int]:
        """The request's prompt as token ids: a completion's text or ids, or the chat template's output."""
        if payload["kind"] != "chat":
            return self.engine.encode(payload["prompt"])
        from ..modeling.chat import chat_text, has_chat_template

        tok = self.engine.tokenizer
        if not has_chat_template(tok):
            raise ApiError(400, "this model's tokenizer has no chat template, so /v1/chat/completions cannot "
                           "build a prompt; use /v1/completions", "messages", "chat_template_missing")
        try:
            text = chat_text(tok, payload["messages"])
        except PromptError:
            raise  # a 400 with the reason (e.g. a lone surrogate in a message)
        except Exception as exc:  # noqa: BLE001 - the template refused the conversation (e.g. role order)
            raise ApiError(400, f"the chat template refused these messages: {exc}", "messages",
                           "invalid_value") from None
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ApiError(400, "the messages make an empty prompt", "messages", "invalid_value")
        return ids

    async def _count_restarts(self) -> None:
        """Export the pair's worker restarts (the coordinator counts them) as counter increments: once at most
        every ``RESTARTS_EVERY_S``, and always after the last request (one call per request, ~2 ms of CPU across
        the processes, came out of the cores the model runs on)."""
        wait = self.restarts_checked + RESTARTS_EVERY_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.restarts_checked = time.monotonic()
        try:
            status = await asyncio.wait_for(asyncio.to_thread(self.engine.backend.status), 30)
        except Exception as exc:  # noqa: BLE001 - the coordinator may be rebuilding
            log.debug("status: %s", exc)
            return
        for side, n in status.get("restarts", {}).items():
            seen = self.restarts_seen.get(side, 0)
            new = n - seen if n >= seen else n  # a rebuilt coordinator counts from 0
            if new:
                log.warning("the %s worker of this replica's pair was restarted (%d time%s; %d since the pair "
                            "started)", side, new, "s" if new > 1 else "", n)
            self.metrics.restarted(side, new)
            self.restarts_seen[side] = n

    def status(self) -> dict:
        """The pair's state: settings, draft ready, restarts, requests held and finished, the worker actors."""
        status = self.engine.backend.status()
        return {**self.describe(), "draft_ready": status.get("draft_ready"), "restarts": status.get("restarts"),
                "ongoing": self.ongoing, "finished": self.finished, "workers": status.get("handles")}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

"""``OpenAIIngress``: the HTTP face (FastAPI): ``/v1/completions``, ``/v1/chat/completions`` (both with SSE
streaming), ``/v1/models`` and ``/health``.

It parses and checks requests (``protocol``), then calls the ``PearlServer`` deployment through a
streaming handle. Backpressure is Serve's: the model deployment's ``max_ongoing_requests`` and
``max_queued_requests``; past them the handle raises ``BackPressureError`` at once, answered here as a
503/429 with an OpenAI error body and ``Retry-After`` (Serve's own proxy rejection is plain text). Every
wait on the model has a timeout; a request that ends early (client gone, error) cancels its model call,
which frees the pair.
"""

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from .binding import bind_replica_server_to_node_ip
from .config import ServeConfig
from .metrics import IngressMetrics
from .protocol import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, ResponseBuilder, check_api_key,
                       parse_request, sse, too_large)

log = logging.getLogger(__name__)
access_log = logging.getLogger("ray.serve")  # Serve's logger: the replica's log file (and console, where Serve's is)
app = FastAPI(title="pearl-ray", description="OpenAI-compatible PEARL speculative decoding", redirect_slashes=False)
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own answers (unknown route, wrong method) in the OpenAI error shape the endpoints use.
    Trailing slashes are not redirected (``redirect_slashes=False``): ``/v1/completions/`` is a 404."""
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; routes: {', '.join(sorted(ROUTES.values()))}, /v1/models, /health"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path!r}"
    else:
        message = str(exc.detail)
    err = ApiError(exc.status_code, message, None, HTTP_CODES.get(exc.status_code))
    return JSONResponse(err.body(), exc.status_code, headers={**(exc.headers or {}), **err.headers()})


async def _read_body(request: Request) -> bytes:
    """The body, read up to ``MAX_BODY_BYTES``: a larger one is refused as soon as it shows (its declared
    length, or the bytes read so far), without holding it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large(int(declared))
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_large(size)
        parts.append(part)
    return b"".join(parts)


def _cancel(stream) -> None:
    """Cancel a model call (best effort): frees the pair of a request whose client is gone."""
    if stream is None:
        return
    try:
        stream.cancel()
    except Exception as exc:  # noqa: BLE001 - a call that failed (e.g. backpressure) re-raises here
        log.debug("cancel: %s", exc)


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, server, config: dict):
        """``server``: the ``PearlServer`` deployment handle."""
        bind_replica_server_to_node_ip()
        self.server = server.options(stream=True)
        self.config = ServeConfig.model_validate(config)
        self.model = self.config.served_name
        self.metrics = IngressMetrics(self.model)
        self.created = int(time.time())
        self.app_name = serve.get_replica_context().app_name
        self.api_keys = self.config.effective_api_keys()  # read once: this replica's environment and config
        if not self.api_keys:
            log.info("no API key configured: /v1/* answers anyone who reaches it")

    @app.get("/health")
    async def health(self):
        """200 while the model deployment is healthy, else 503 with its status."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 10)
            state = status.applications[self.app_name].deployments["PearlServer"].status.value
        except Exception as exc:  # noqa: BLE001 - unknown is not healthy
            state = f"unknown ({type(exc).__name__})"
        ok = state == "HEALTHY"
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.model, "deployment": state},
                            200 if ok else 503)

    def _authorize(self, request: Request) -> None:
        """Every ``/v1/*`` route: ``ApiError(401)`` unless the request carries one of the keys (if any)."""
        check_api_key(request.headers.get("authorization"), self.api_keys)

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as exc:
            self._answered("/v1/models", exc.status, time.monotonic())
            return JSONResponse(exc.body(), exc.status, headers=exc.headers())
        c = self.config
        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "pearl-ray",
                "pearl": {"draft": c.draft, "target": c.target, "method": c.method, "gamma": c.gamma}}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, "chat")

    # -- one request -------------------------------------------------------------------------------------
    async def _answer(self, request: Request, kind: str):
        route, t0 = ROUTES[kind], time.monotonic()
        try:
            return await self._answer_checked(request, kind, route, t0)
        except Exception:  # noqa: BLE001 - a bug, not the input: still an OpenAI error body, and logged
            log.exception("unexpected error answering %s", route)
            err = ApiError(500, "internal error (logged on the server)", None, "internal_error")
            self._answered(route, err.status, t0)
            return JSONResponse(err.body(), err.status)

    async def _answer_checked(self, request: Request, kind: str, route: str, t0: float):
        stream = first = None
        try:
            self._authorize(request)  # before the body is read
            req = parse_request(await _read_body(request), ChatRequest if kind == "chat" else CompletionRequest)
            if req.model is not None and req.model != self.model:
                raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.model}'",
                               "model", "model_not_found")
            payload = {"kind": kind, "sampling": req.sampling(), "method": req.method, "gamma": req.gamma,
                       "stream": req.stream}
            if kind == "chat":
                payload["messages"] = req.conversation()
            else:
                payload["prompt"] = req.prompt
            stream = self.server.generate.remote(payload)
            first = await self._next(stream, self.config.first_chunk_timeout_s)
        except ApiError as exc:
            self._answered(route, exc.status, t0)
            return JSONResponse(exc.body(), exc.status, headers=exc.headers())
        finally:
            if first is None:  # failed, or the client left while the request waited: free its slot
                _cancel(stream)
        ttft = time.monotonic() - t0
        builder = ResponseBuilder(kind, self.model, req.top_logprobs_count is not None)
        if req.stream:
            return StreamingResponse(self._events(stream, first, builder, req.include_usage, route, t0, ttft),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect(stream, first, builder, route, t0, ttft)

    async def _next(self, stream, timeout_s: float) -> dict:
        """The model's next item; an error item or a failed call becomes ``ApiError``."""
        try:
            item = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except BackPressureError as exc:
            raise ApiError(exc.status_code, f"The server is at capacity, retry later. {exc.message}", None,
                           "overloaded", exc.retry_after_s) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"no output from the model within {timeout_s:.0f} s", None, "timeout") from None
        except StopAsyncIteration:
            raise ApiError(500, "the model replica ended the stream without a result") from None
        except (DeploymentUnavailableError, RayActorError) as exc:
            raise ApiError(503, f"the model replica is unavailable: {type(exc).__name__}", None,
                           "replica_unavailable", self.config.retry_after_s) from None
        except RayTaskError as exc:
            log.warning("model call failed: %s", exc)
            raise ApiError(500, f"the model replica failed: {type(exc).__name__}") from None
        if "error" in item:
            raise ApiError(**item["error"])
        return item

    async def _collect(self, stream, item: dict, builder: ResponseBuilder, route: str, t0: float, ttft: float):
        texts, logprobs = [item["text"]], list(item.get("logprobs") or [])
        try:
            while "finish_reason" not in item:
                item = await self._next(stream, self.config.chunk_timeout_s)
                texts.append(item["text"])
                logprobs.extend(item.get("logprobs") or [])
        except ApiError as exc:
            self._answered(route, exc.status, t0)
            return JSONResponse(exc.body(), exc.status, headers=exc.headers())
        finally:
            if "finish_reason" not in item:
                _cancel(stream)
        self._answered(route, 200, t0, item)
        self._timings(route, t0, ttft, item)
        return JSONResponse(builder.full("".join(texts), item["finish_reason"], item["usage"], item["pearl"],
                                         logprobs))

    async def _events(self, stream, item: dict, builder: ResponseBuilder, include_usage: bool, route: str,
                      t0: float, ttft: float):
        """SSE: OpenAI chunks, the last with ``finish_reason`` and the ``pearl`` stats, then the usage chunk
        (if asked), then ``[DONE]``. A failure mid-stream is one ``{"error"}`` event before ``[DONE]``."""
        first, finished, status = True, False, 200
        try:
            while True:
                if "finish_reason" in item:
                    chunk = builder.chunk(item["text"], item["finish_reason"], first, item.get("logprobs"))
                    chunk["pearl"] = item["pearl"]
                    if include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
                    if include_usage:
                        yield sse(builder.usage_chunk(item["usage"]))
                    finished = True
                    break
                chunk = builder.chunk(item["text"], None, first, item.get("logprobs"))
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
                first = False
                item = await self._next(stream, self.config.chunk_timeout_s)
        except ApiError as exc:
            status = exc.status
            yield sse({"error": {**exc.body()["error"], "status": exc.status}})
        finally:
            if not finished:
                _cancel(stream)  # client gone or failed: free the pair now
                if status == 200:
                    status = 499  # the client closed the connection (nginx's convention)
            self._answered(route, status, t0, item if finished else None)
            if finished:
                self._timings(route, t0, ttft, item)
        yield sse("[DONE]")

    def _answered(self, route: str, status: int, t0: float, final: dict | None = None) -> None:
        """Count the answer and write its access line: route, status, tokens, latency and finish reason."""
        self.metrics.answered(route, status)
        usage = (final or {}).get("usage") or {}
        access_log.info("%s %d prompt_tokens=%s completion_tokens=%s latency_s=%.3f finish_reason=%s", route, status,
                        usage.get("prompt_tokens", "-"), usage.get("completion_tokens", "-"), time.monotonic() - t0,
                        (final or {}).get("finish_reason", "-"))

    def _timings(self, route: str, t0: float, ttft: float, final: dict) -> None:
        e2e = time.monotonic() - t0
        n = final["usage"]["completion_tokens"]
        self.metrics.timings(route, ttft, (e2e - ttft) / (n - 1) if n > 1 else None, e2e)

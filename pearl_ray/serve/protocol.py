"""The OpenAI wire format: request models, their validation, error bodies and response shapes.

Pure: pydantic and the standard library, no Ray, no engine. A request body goes bytes -> UTF-8 -> JSON
object -> ``CompletionRequest`` / ``ChatRequest``; every failure on the way is an ``ApiError`` (HTTP 400
with ``{"error": {"message", "type", "param", "code"}}``). Unknown fields are ignored, as OpenAI's
clients expect, and ``null`` means "not given"; known fields of the wrong type are errors (strict types:
``"5"`` is not an integer and ``1`` is not a boolean).
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import MAX_GAMMA, SEED_LIMIT, Method

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Engine finish reasons -> OpenAI's."""
PEARL_STATS = ("method", "gamma", "acceptance_rate", "mean_accepted_len", "tokens_per_target_forward", "rounds",
               "verified_tokens", "accepted_tokens", "drafted_tokens", "draft_failures", "target_forwards",
               "new_tokens", "wall_s", "tokens_per_s", "plain_rounds", "turn_rounds", "once_rounds")
"""The ``GenerationStats`` fields sent in each response's ``pearl`` extension field."""
MAX_STOP = 16
MAX_BODY_BYTES = 8 * 2**20
"""Largest request body read (a prompt of a full context is far smaller); past it: 400 ``body_too_large``."""
MAX_LOGPROBS = 5
"""Most alternatives per token a request may ask for (``logprobs`` / ``top_logprobs``), as OpenAI allows."""
LOGPROB_FLOOR = -9999.0
"""Log-probabilities below this (``-inf`` for a masked token) are sent as this: JSON has no infinity."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays and objects accepted in a body (a valid request needs 4)."""
UNSUPPORTED = {
    # field: (the values that mean "not used", what to say). Any other value is refused with a 400, never ignored.
    "echo": ((False,), "echo (the prompt's text and log-probabilities) is not supported"),
    "suffix": (("",), "suffix (insertion) is not supported"),
    "best_of": ((1,), "best_of > 1 is not supported"),
    "tools": (([],), "tool calls are not supported"),
    "functions": (([],), "function calls are not supported"),
    "tool_choice": (("none", "auto"), "tool calls are not supported"),
    "function_call": (("none", "auto"), "function calls are not supported"),
    "response_format": (({"type": "text"},), "only plain text responses are supported (no JSON mode or schema)"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "presence_penalty": ((0, 0.0), "presence_penalty is not supported (only 0)"),
    "frequency_penalty": ((0, 0.0), "frequency_penalty is not supported (only 0)"),
}
"""OpenAI fields this server does not implement. A request that uses one gets a 400 naming it; a request
that sends one at its "off" value (``"logprobs": false``, ``"tools": []``, ...) is served."""


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and ``Retry-After`` if set)."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return {} if self.retry_after_s is None else {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}

    def to_dict(self) -> dict:
        """Plain data, to cross a deployment handle."""
        return {"status": self.status, "message": self.message, "param": self.param, "code": self.code,
                "retry_after_s": self.retry_after_s}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both endpoints. Defaults follow OpenAI's (temperature 1, top_p 1)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Any = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    top_k: int = Field(0, ge=-1)
    method: Method | None = None
    gamma: int | None = Field(None, ge=1, le=MAX_GAMMA)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """``null`` means "not given" (some clients send every field)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, (off, why) in UNSUPPORTED.items():
                value = data.get(name)
                if value is not None and not any(_same(value, o) for o in off):
                    raise ApiError(400, f"'{name}' is not supported by this server: {why}", name,
                                   "unsupported_parameter")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        if stop is None:
            return None
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        if len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}")
        if any(s == "" for s in stop):
            raise ValueError("a stop string must not be empty")
        return stop or None

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options",
                           "invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def top_logprobs_count(self) -> int | None:
        """Alternatives per token the response carries; None: no log-probabilities asked for."""
        return None

    def sampling(self) -> dict:
        """The engine's ``SamplingParams`` fields (``max_new_tokens`` None: the server picks what fits)."""
        return {"logprobs": self.top_logprobs_count,"max_new_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": max(0, self.top_k),
                "seed": secrets.randbelow(SEED_LIMIT) if self.seed is None else self.seed,
                "stop": self.stop if self.stop is None or isinstance(self.stop, str) else tuple(self.stop),
                "ignore_eos": self.ignore_eos}


class CompletionRequest(_Common):
    prompt: Any = None  # a string or token ids; a list holding one of those is accepted too
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Each generated token's log-probability and the ``logprobs`` most likely tokens at its position."""

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_off(cls, value):
        """``"logprobs": false`` (sent by clients that mirror chat's field) means not asked."""
        return None if value is False else value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if prompt is None:
            return None
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ValueError("prompt must be a string or a list of token ids (integers)")

    def check(self) -> None:
        super().check()
        if self.prompt is None:
            raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
        if not self.prompt:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        """A string, or a list of ``{"type": "text", "text": ...}`` parts (joined); other parts are refused."""
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict):
                    raise ValueError("content parts must be objects")
                if part.get("type", "text") != "text":
                    raise ValueError(f"only text content is supported, got a {part.get('type')!r} part")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text part needs a string 'text'")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")


class ChatRequest(_Common):
    messages: list[ChatMessage] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs", "invalid_value")
        if self.messages is None:
            raise ApiError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
        if not self.messages:
            raise ApiError(400, "messages must hold at least one message", "messages", "invalid_value")
        if not any(m.role == "user" for m in self.messages):
            raise ApiError(400, "messages must hold at least one user message (there is nothing to answer)",
                           "messages", "invalid_value")

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _same(value, off) -> bool:
    """``value == off`` with JSON's types: ``false`` is not ``0`` and ``0`` is not ``false``."""
    return type(value) is type(off) and value == off or (
        isinstance(off, float) and isinstance(value, int) and not isinstance(value, bool) and value == off)


def check_api_key(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Raise ``ApiError(401, code="invalid_api_key")`` unless ``authorization`` is ``Bearer <one of keys>``.
    No keys: everything passes. The comparison takes the same time wherever a wrong key differs, and every
    key is compared (no early exit that would tell which position or which key matched).

    Example: ``check_api_key("Bearer sk-1", ("sk-1",))`` returns; ``check_api_key(None, ("sk-1",))`` raises.
    """
    if not keys:
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", None,
                       "invalid_api_key")
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    if not matched:
        raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key")


def too_large(size: int) -> ApiError:
    return ApiError(400, f"the request body has {size} bytes; at most {MAX_BODY_BYTES} are accepted", None,
                    "body_too_large")


def json_depth(data) -> int:
    """Deepest nesting of lists and dicts in ``data`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_request(body: bytes, model_cls: type[_Common]) -> _Common:
    """Body bytes -> a checked request, or ``ApiError(400)`` saying what is wrong and where (``param``)."""
    if len(body) > MAX_BODY_BYTES:
        raise too_large(len(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})", None,
                       "invalid_encoding") from None
    too_deep = ApiError(400, f"the request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} "
                        f"levels", None, "too_deep")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                       None, "invalid_json") from None
    except RecursionError:  # the parser nests a call per level
        raise too_deep from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", None,
                       "invalid_type")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    try:
        request = model_cls.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    request.check()
    return request


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    code = "invalid_type" if err["type"].endswith("_type") or err["type"] == "model_type" else "invalid_value"
    return ApiError(400, f"Invalid value for '{param}': {msg}", param, code)


# -- responses ---------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


class ResponseBuilder:
    """Builds OpenAI completion / chat responses and stream chunks for one request.

    ``logprobs``: whether the request asked for log-probabilities. Each entry the model sends is
    ``{"token", "logprob", "bytes", "top": [[token, logprob, bytes], ...]}`` (``server.logprob_entries``);
    they become completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` or chat's ``{content:
    [{token, logprob, bytes, top_logprobs}]}``."""

    def __init__(self, kind: str, model: str, logprobs: bool = False):
        self.kind, self.model, self.logprobs = kind, model, logprobs
        self.id, self.created = new_id(kind), int(time.time())
        self.text_offset = 0  # completions: where the next token's text starts in the generated text

    def logprobs_field(self, entries: list[dict] | None) -> dict | None:
        """The choice's ``logprobs`` for ``entries`` (this chunk's tokens, or all of them); None if not asked."""
        if not self.logprobs:
            return None
        entries = entries or []
        if self.kind == "chat":
            return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e["top"]]}
                                for e in entries]}
        offsets = []
        for e in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(e["token"])
        # as OpenAI's legacy completions: the top alternatives, and the chosen token's own log-probability
        tops = [{**{t: lp for t, lp, _ in e["top"]}, e["token"]: e["logprob"]} for e in entries]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": tops, "text_offset": offsets}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False,
              logprobs: list[dict] | None = None) -> dict:
        lp = self.logprobs_field(logprobs) if logprobs else None  # a chunk without tokens carries none
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def full(self, text: str, finish_reason: str, usage: dict, pearl: dict, logprobs: list[dict] | None = None) -> dict:
        lp = self.logprobs_field(logprobs)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage, "pearl": pearl}
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage, "pearl": pearl}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"

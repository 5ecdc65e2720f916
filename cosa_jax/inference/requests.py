"""What the server accepts from a client, checked before anything reaches the engine.

Kept apart from ``server.py`` so that every bound a request meets is in one place: the body is
read with a size cap (413) and parsed off the event loop when large, so ``/health`` answers while
a big body is refused; NaN / Infinity, non-UTF-8 bytes, fields the endpoint does not know (each
endpoint has ONE allow-list) and numbers of the wrong type or out of range get a 400 naming the
field; per-key concurrency and the engine's queue are bounded (429 with Retry-After). A request
refused here never enters a batch, so it cannot fail the requests it would have joined.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
from typing import Any, Mapping

from aiohttp import web

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 502: "upstream_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one client may ask of the server (all enforced before the engine)."""

    max_body_bytes: int = 4 * 2**20       # a request body larger than this: 413
    max_messages: int = 512               # chat messages per request: 400
    max_prompts: int = 64                 # completions prompts per request (one slot each): 400
    max_stop: int = 4                     # stop strings (OpenAI's bound): 400
    max_stop_chars: int = 256             # characters per stop string: 400
    max_concurrent_per_key: int = 64      # in-flight generation requests per API key: 429
    max_queue: int = 256                  # requests waiting for an engine slot: 429
    retry_after_s: int = 1                # the Retry-After a 429 carries
    parse_off_loop_bytes: int = 64 * 2**10  # bodies at least this large are parsed in a thread

    def validate(self) -> "ServerLimits":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{f.name} must be a positive integer, got {value!r}")
        return self


# One allow-list per endpoint: a field not listed here is refused with a 400 naming it, so
# nothing a client asks for is silently ignored. Fields listed but unimplemented (tools,
# penalties other than neutral, n > 1 ...) are refused by the parser with a specific message.
_COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
    "stream_options", "user", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "logit_bias", "best_of",
})
# Structured outputs: parsed (and refused or honoured) by the constraint wiring in server.py.
CONSTRAINT_FIELDS = frozenset({
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
})
CHAT_FIELDS = _COMMON_FIELDS | CONSTRAINT_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "safety_config",
    "tools", "tool_choice", "functions", "function_call", "audio", "modalities",
}
COMPLETION_FIELDS = _COMMON_FIELDS | CONSTRAINT_FIELDS | {"prompt", "echo", "logprobs", "suffix"}
FIELDS_BY_PATH = {"/v1/chat/completions": CHAT_FIELDS, "/v1/completions": COMPLETION_FIELDS}

# Fields other servers (vLLM, OpenAI) take that this one does not implement: named in the 400
# with a hint. Anything else unknown gets the generic message.
_NOT_IMPLEMENTED = {
    "min_p": "min_p filtering", "min_tokens": "min_tokens", "ignore_eos": "ignore_eos",
    "continue_final_message": "continuing a final assistant message",
    "add_generation_prompt": "add_generation_prompt", "chat_template": "custom chat templates",
    "chat_template_kwargs": "chat_template_kwargs", "length_penalty": "length_penalty",
    "use_beam_search": "beam search", "prompt_logprobs": "prompt_logprobs (use /v1/completions "
    "with echo and logprobs)", "parallel_tool_calls": "tool calling", "reasoning_effort":
    "reasoning_effort", "store": "stored completions", "metadata": "stored completions",
    "prediction": "predicted outputs", "service_tier": "service tiers",
    "skip_special_tokens": "skip_special_tokens", "spaces_between_special_tokens":
    "spaces_between_special_tokens", "truncate_prompt_tokens": "prompt truncation",
    "stop_token_ids": "stop_token_ids", "include_stop_str_in_output": "include_stop_str_in_output",
    "bad_words": "bad_words", "allowed_token_ids": "allowed_token_ids", "top_a": "top_a",
}


def check_fields(body: Mapping, allowed: frozenset) -> None:
    """400 naming the first field (sorted) that this endpoint does not know."""
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        name = unknown[0]
        what = _NOT_IMPLEMENTED.get(name)
        detail = (f"{what} is not implemented by this server" if what else
                  "unknown field for this endpoint")
        raise ApiError(400, f"'{name}': {detail}; remove it from the request", param=name,
                       code="unsupported_parameter")


def number(body: Mapping, name: str, kind, lo=None, hi=None, default=None):
    """A numeric field, type- and range-checked without converting huge ints to float
    (``float(10**400)`` overflows); bools are not numbers."""
    value = body.get(name)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}"[:300], param=name)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", param=name)
        if kind is int:
            if not value.is_integer():
                raise ApiError(400, f"'{name}' must be an integer, got {value!r}", param=name)
            value = int(value)
    elif kind is float and abs(value) > 10**300:
        raise ApiError(400, f"'{name}' must be a finite number, got a "
                       f"{len(str(abs(value)))}-digit integer", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = value if abs(value) < 10**30 else f"a {len(str(abs(int(value))))}-digit number"
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], "
                       f"got {shown}", param=name)
    return kind(value)


def _refuse_constant(name: str):
    raise ApiError(400, f"request body is not valid JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None


async def read_json_body(request: web.Request, limits: ServerLimits, *,
                         check_known: bool = True) -> dict:
    """The request's JSON object, read with a size cap and checked against the path's fields."""
    cap = limits.max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise ApiError(413, f"request body is {request.content_length} bytes; this server takes "
                       f"at most {cap} (ServerLimits.max_body_bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(2**16):
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"request body exceeds {cap} bytes "
                           "(ServerLimits.max_body_bytes)", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) >= limits.parse_off_loop_bytes:
        body = await asyncio.get_running_loop().run_in_executor(None, parse_json, raw)
    else:
        body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    allowed = FIELDS_BY_PATH.get(request.path)
    if allowed is not None and check_known:
        check_fields(body, allowed)
    check_sizes(body, limits)
    return body


def check_sizes(body: Mapping, limits: ServerLimits) -> None:
    """Counts that bound the work one request may cause, checked before any tokenising."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise ApiError(400, f"'messages' holds {len(messages)} messages; this server takes at "
                       f"most {limits.max_messages} (ServerLimits.max_messages)", param="messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt) \
            and len(prompt) > limits.max_prompts:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; this server takes at most "
                       f"{limits.max_prompts} (ServerLimits.max_prompts)", param="prompt")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"'stop' holds {len(stops)} strings; at most {limits.max_stop}",
                       param="stop")
    for s in stops:
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise ApiError(400, f"a 'stop' string is {len(s)} characters; at most "
                           f"{limits.max_stop_chars}", param="stop")


class Admission:
    """Per-key in-flight counts and the engine queue bound: past either, a 429 with Retry-After."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.in_flight: collections.Counter = collections.Counter()

    def enter(self, key: str | None, waiting: int) -> None:
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        if self.in_flight[key] >= self.limits.max_concurrent_per_key:
            raise ApiError(429, f"this API key already has {self.in_flight[key]} requests in "
                           f"flight (ServerLimits.max_concurrent_per_key="
                           f"{self.limits.max_concurrent_per_key}); retry later",
                           code="rate_limit_exceeded", headers=retry)
        if waiting >= self.limits.max_queue:
            raise ApiError(429, f"the server's queue is full ({waiting} requests waiting, "
                           f"ServerLimits.max_queue={self.limits.max_queue}); retry later",
                           code="server_busy", headers=retry)
        self.in_flight[key] += 1

    def leave(self, key: str | None) -> None:
        self.in_flight[key] -= 1
        if self.in_flight[key] <= 0:
            del self.in_flight[key]

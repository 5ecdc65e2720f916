"""OpenAI-compatible chat server over the JAX sampler, with authorised safety configs.

``POST /v1/chat/completions`` and ``GET /v1/models`` speak the OpenAI wire format, so the
official ``openai`` client and the synthesis module (``cosa_jax.endpoint.client``) use this server
as generator or judge. Concurrent requests are grouped by ``batcher.Batcher`` into one
``sampler.generate`` call. Who may set the safety config (the system prompt) is decided by
``auth.apply_policy`` before anything reaches the model. ``GET /stats`` reports batching.

Supported request fields: model, messages, max_tokens / max_completion_tokens, temperature,
top_p, top_k (extension), seed, stop, n=1, stream (the final text as one SSE chunk),
safety_config (extension: a registered config by name). Features the sampler lacks (tools,
logprobs, penalties, logit_bias, n>1, JSON mode) are refused with a 400 that says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from aiohttp import web

from cosa_jax.chat import PINNED_DATE, encode_messages, end_of_turn
from cosa_jax.inference.auth import (SYSTEM_ROLES, AuthError, Registry, apply_policy, bearer_key,
                                     message_text)
from cosa_jax.inference.batcher import Batcher

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_MAX_TOKENS = 1024
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 500: "server_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def render_messages(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """Chat-template text up to the assistant header, with the project's pinned date.

    Same call as ``chat.render_prompt`` but for any multi-turn conversation; "developer"
    (OpenAI's newer name for system) is rendered as "system".
    """
    msgs = [{"role": "system" if m["role"] in SYSTEM_ROLES else m["role"], "content": m["content"]}
            for m in messages]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                         date_string=PINNED_DATE)


# ------------------------------------------------------------------------ model side
class ChatModel:
    """Weights + config + tokenizer: renders chats to token ids and runs batches.

    ``run_batch`` is called from the batcher's worker thread, one batch at a time.
    """

    def __init__(self, params, cfg, tokenizer):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        eos = set(cfg.eos_token_id)
        eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            eos.add(eot)  # the template's end-of-turn token ends an answer too
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("model has no end-of-sequence token (config.json eos_token_id and "
                             "the tokenizer's eos/end-of-turn are all missing)")
        self.eos_ids = sorted(eos)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", compute_dtype: str | None = None,
             mesh=None) -> "ChatModel":
        from cosa_jax.models import load_hf, load_tokenizer
        model, cfg = load_hf(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
        return cls(model.params(), cfg, load_tokenizer(path))

    @property
    def context_length(self) -> int:
        return self.cfg.max_position_embeddings

    def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        # Content is encoded as text: a control-token spelling in a message cannot open a turn.
        msgs = [{"role": "system" if m["role"] in SYSTEM_ROLES else m["role"],
                 "content": m["content"]} for m in messages]
        return encode_messages(self.tokenizer, msgs)

    def padded_length(self, prompt_lens: Sequence[int], max_new: Sequence[int]) -> int:
        """The cache length ``generate`` will allocate for a group (its bucketing rule)."""
        from cosa_jax.inference.sampler import bucketed_lengths
        return sum(bucketed_lengths(prompt_lens, max_new))

    def fits(self, jobs: Sequence["GenJob"]) -> bool:
        return self.padded_length([len(j.prompt_ids) for j in jobs],
                                  [j.sampling.max_new_tokens for j in jobs]) <= self.context_length

    def run_batch(self, jobs: Sequence["GenJob"]):
        from cosa_jax.inference.sampler import generate
        return generate(self.params, self.cfg, [j.prompt_ids for j in jobs],
                        [j.sampling for j in jobs], eos_ids=self.eos_ids, tokenizer=self.tokenizer)


@dataclasses.dataclass
class GenJob:
    prompt_ids: list[int]
    sampling: Any  # sampler.SamplingParams


# ------------------------------------------------------------------------ request parsing
def _number(body: Mapping, name: str, kind, lo=None, hi=None, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, "
                       f"got {value!r}", param=name)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], "
                       f"got {value}", param=name)
    return value


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """Normalised [{role, content: str}]; at most one system message, and it comes first."""
    if raw is None:
        raise ApiError(400, "'messages' is required: a list of {role, content} objects",
                       param="messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role: {role!r} is not supported (use one of {ROLES})",
                           param=f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"{where}: tool calls are not supported", param=where)
        try:
            content = message_text(m.get("content"), where)
        except AuthError as e:
            raise ApiError(400, e.message, param=f"{where}.content") from None
        out.append({"role": role, "content": content})
    system_at = [i for i, m in enumerate(out) if m["role"] in SYSTEM_ROLES]
    if len(system_at) > 1 or (system_at and system_at[0] != 0):
        raise ApiError(400, "at most one system message is supported, and it must come first "
                       "(it holds the safety config)", param="messages")
    if len(system_at) == len(out):
        raise ApiError(400, "'messages' holds no user message", param="messages")
    return out


_UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio output",
}


def parse_sampling(body: Mapping, *, prompt_len: int, context_length: int, padded_length) -> Any:
    """SamplingParams from the OpenAI fields, checked against the model's context."""
    from cosa_jax.inference.sampler import SamplingParams
    for name, what in _UNSUPPORTED.items():
        if body.get(name):
            raise ApiError(400, f"{what} is not supported by this server", param=name)
    for name, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                          ("repetition_penalty", 1.0)):
        if _number(body, name, float, default=neutral) != neutral:
            raise ApiError(400, f"'{name}' is not supported by this server (leave it unset)",
                           param=name)
    if _number(body, "n", int, lo=1, default=1) != 1:
        raise ApiError(400, "only n=1 is supported: send several requests instead", param="n")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported",
                       param="response_format")

    temperature = _number(body, "temperature", float, lo=0.0, hi=2.0, default=1.0)
    top_p = _number(body, "top_p", float, lo=0.0, hi=1.0, default=1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be > 0", param="top_p")
    top_k = _number(body, "top_k", int, lo=0, default=0)
    seed = _number(body, "seed", int, default=None)
    if seed is None:
        seed = random.randrange(2**31)
    seed %= 2**32

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")

    room = context_length - prompt_len
    if room <= 0 or padded_length([prompt_len], [1]) > context_length:
        raise ApiError(400, f"prompt is too long: {prompt_len} tokens, and the model's context is "
                       f"{context_length} tokens", param="messages", code="context_length_exceeded")
    for name in ("max_completion_tokens", "max_tokens"):
        max_new = _number(body, name, int, lo=1, default=None)
        if max_new is not None:
            if padded_length([prompt_len], [max_new]) > context_length:
                raise ApiError(400, f"prompt ({prompt_len} tokens) + {name}={max_new} does not fit "
                               f"the model's context of {context_length} tokens; lower {name}",
                               param=name, code="context_length_exceeded")
            break
    else:  # no limit given: as many as fit, capped
        max_new = DEFAULT_MAX_TOKENS
        while max_new > 1 and padded_length([prompt_len], [max_new]) > context_length:
            max_new = max(1, max_new - 32)
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=stops)


# ------------------------------------------------------------------------ app
@dataclasses.dataclass
class ServerState:
    model: ChatModel
    batcher: Batcher
    served_model_name: str
    registry: Registry | None
    default_config: str | None
    started: float


STATE_KEY = web.AppKey("cosa_state", ServerState)


def _check_key(request: web.Request, registry: Registry | None) -> str | None:
    key = bearer_key(request.headers.get("Authorization"))
    if registry is not None:
        if key is None and not registry.allow_anonymous:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if key is not None and key not in registry.keys:
            raise ApiError(401, "unknown API key (not in the server's registry)",
                           code="invalid_api_key")
    return key


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    key = _check_key(request, state.registry)
    body = await _json_body(request)
    model_name = body.get("model")
    if not model_name:
        raise ApiError(400, "'model' is required", param="model")
    if model_name != state.served_model_name:
        raise ApiError(404, f"model {model_name!r} is not served here (this server serves "
                       f"{state.served_model_name!r})", param="model", code="model_not_found")
    messages = parse_messages(body.get("messages"))
    requested = body.get("safety_config")
    if requested is not None and not isinstance(requested, str):
        raise ApiError(400, "'safety_config' must be a config name (string)", param="safety_config")
    try:
        messages = apply_policy(messages, key, state.registry, state.default_config, requested)
    except AuthError as e:
        raise ApiError(e.status, e.message, code=e.code) from None
    prompt_ids = state.model.encode(messages)
    sampling = parse_sampling(body, prompt_len=len(prompt_ids),
                              context_length=state.model.context_length,
                              padded_length=state.model.padded_length)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")

    completion = await state.batcher.submit(GenJob(prompt_ids, sampling))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion.token_ids),
             "total_tokens": len(prompt_ids) + len(completion.token_ids)}
    if stream:
        return await _stream(request, rid, created, state.served_model_name, completion, usage,
                             body.get("stream_options") or {})
    return web.json_response({
        "id": rid, "object": "chat.completion", "created": created,
        "model": state.served_model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": usage,
    })


async def _stream(request, rid, created, model, completion, usage, options) -> web.StreamResponse:
    """Server-sent events of the finished answer: one content chunk, then the finish chunk."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                    "content": completion.text},
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": completion.finish_reason}]},
    ]
    if isinstance(options, dict) and options.get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage})
    for chunk in chunks:
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    _check_key(request, state.registry)
    return web.json_response({"object": "list", "data": [{
        "id": state.served_model_name, "object": "model", "created": int(state.started),
        "owned_by": "cosa-jax", "max_model_len": state.model.context_length}]})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({**state.batcher.stats.as_dict(),
                              "uptime_s": round(time.time() - state.started, 3),
                              "max_batch": state.batcher.max_batch,
                              "batch_wait_ms": state.batcher.wait_s * 1000})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:  # 404 / 405 from routing, in OpenAI's shape
        if e.status >= 400:
            return ApiError(e.status, f"{request.method} {request.path}: {e.reason}").response()
        raise
    except Exception as e:  # noqa: BLE001 - answer, log, keep serving
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()


def create_app(model: ChatModel, *, served_model_name: str, registry: Registry | None = None,
               default_config: str | None = None, max_batch: int = 16,
               batch_wait_ms: float = 5.0) -> web.Application:
    """The aiohttp application; the batcher starts and stops with the app."""
    batcher = Batcher(model.run_batch, max_batch=max_batch, wait_s=batch_wait_ms / 1000.0,
                      fits=model.fits)
    app = web.Application(middlewares=[_errors], client_max_size=16 * 2**20)
    app[STATE_KEY] = ServerState(model, batcher, served_model_name, registry, default_config,
                                 time.time())

    async def lifecycle(app):
        await batcher.start()
        yield
        await batcher.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    return app


def read_config_arg(value: str | None) -> str | None:
    """``--default-config``: a file path (its text) or the config text itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise ValueError(f"{path}: default config file is empty")
            return text.strip()
    except OSError:  # a long config text is not a valid path on some systems
        pass
    return value


class BackgroundServer:
    """The app on 127.0.0.1 in a daemon thread with its own event loop (tests, demo, bench).

    ``with BackgroundServer(app) as srv: openai.OpenAI(base_url=srv.base_url, ...)``.
    Port 0 picks a free port.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self._loop = None
        self._runner: web.AppRunner | None = None
        self._thread = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "BackgroundServer":
        import asyncio
        import threading
        ready, failure = threading.Event(), []

        async def boot():
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def run():
            loop = self._loop = asyncio.new_event_loop()  # local: stop() clears self._loop
            try:
                loop.run_until_complete(boot())
            except Exception as e:  # noqa: BLE001 - reported to the caller of start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="cosa-serve", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop = self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

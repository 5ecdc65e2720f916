"""OpenAI-compatible server over the continuous-batching engine, with authorised safety configs.

``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` speak the OpenAI
wire format, so the official ``openai`` client, ``cosa_jax.endpoint.client`` and harnesses such as
lm-eval's ``local-completions`` use this server. Every request becomes one ``engine.Engine``
request: it joins the running slots at the next step, and leaves when it is done, so no request
waits for another's ``max_tokens``. Streaming sends each token's text as it is safe to show.
Who may set the safety config (the system prompt) is decided by ``auth.apply_policy`` before
anything reaches the model; raw prompts (``/v1/completions``) bypass the chat template, so with a
registry only keys that may set any config may send them. ``GET /stats`` reports the engine.

Supported request fields (chat): model, messages, max_tokens / max_completion_tokens,
temperature, top_p, top_k (extension), seed, stop, n=1, stream, stream_options.include_usage,
logprobs, top_logprobs (<= 20), safety_config (extension: a registered config by name).
Completions: prompt (a string, token ids, or a list of either), echo, logprobs (<= 20), and the
same sampling fields. What the engine lacks (tools, penalties, logit_bias, n>1) is
refused with a 400 that names it, and so is any field not in the endpoint's allow-list
(``requests.py``: min_p, min_tokens, ignore_eos, continue_final_message, unknown extras). Body
size, message count, per-key concurrency and the queue are bounded by ``requests.ServerLimits``.
Structured output (``response_format`` json_object / json_schema, vLLM's ``structured_outputs``
choice / regex / json / grammar / json_object) is compiled by ``constraints`` into per-step
masks; the removed ``guided_*`` fields get a 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from aiohttp import web

from cosa_jax.chat import PINNED_DATE, ControlTokenError, encode_messages, end_of_turn
from cosa_jax.inference.auth import (SYSTEM_ROLES, AuthError, Registry, apply_policy, bearer_key,
                                     check_raw_prompt, message_text)
from cosa_jax.inference.engine import MAX_TOP_LOGPROBS, Engine, StepOutput, TokenLogprob
from cosa_jax.inference.requests import Admission, ApiError, ServerLimits, read_json_body
from cosa_jax.inference.requests import number as _number
from cosa_jax.models.llama3_tokenizer import byte_to_unicode

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_COMPLETION_TOKENS = 16       # OpenAI's default for the legacy completions endpoint
DISCONNECT_POLL_S = 0.25
def render_messages(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """Chat-template text up to the assistant header, with the project's pinned date.

    Same call as ``chat.render_prompt`` but for any multi-turn conversation; "developer"
    (OpenAI's newer name for system) is rendered as "system".
    """
    msgs = [{"role": "system" if m["role"] in SYSTEM_ROLES else m["role"], "content": m["content"]}
            for m in messages]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                         date_string=PINNED_DATE)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in for each byte, inverted (char -> byte)."""
    return {c: b for b, c in byte_to_unicode().items()}


# ------------------------------------------------------------------------ model side
class ChatModel:
    """Weights + config + tokenizer: renders chats to token ids, names tokens for log-probs."""

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
        """Token ids of a chat up to the assistant header: the ONE place chats are tokenised."""
        # Content is encoded as text: a control-token spelling in a message cannot open a turn.
        msgs = [{"role": "system" if m["role"] in SYSTEM_ROLES else m["role"],
                 "content": m["content"]} for m in messages]
        return encode_messages(self.tokenizer, msgs)

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completions prompt, tokenised as the model's own convention has it."""
        return list(self.tokenizer(text)["input_ids"])

    def make_engine(self, **kw) -> Engine:
        return Engine(self.params, self.cfg, eos_ids=self.eos_ids, tokenizer=self.tokenizer, **kw)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a byte-level BPE piece may hold part of a character)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_level_alphabet()
        if isinstance(piece, str) and piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.token_text(token_id).encode("utf-8"))


# ------------------------------------------------------------------------ request parsing
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
    "tools": "tool calling", "functions": "function calling", "logit_bias": "logit_bias",
    "audio": "audio output", "suffix": "suffix (insertion)",
}


def parse_sampling(body: Mapping, *, prompt_len: int, engine: Engine,
                   default_max_tokens: int = DEFAULT_MAX_TOKENS, allow_zero: bool = False,
                   where: str = "messages") -> Any:
    """SamplingParams from the OpenAI fields, checked against what the engine's slots hold.

    ``allow_zero``: ``max_tokens=0`` is valid (completions with echo: score the prompt only);
    one token is then generated and dropped by the caller.
    """
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
    if _number(body, "best_of", int, lo=1, default=1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")

    temperature = _number(body, "temperature", float, lo=0.0, hi=2.0, default=1.0)
    top_p = _number(body, "top_p", float, lo=0.0, hi=1.0, default=1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be > 0", param="top_p")
    top_k = _number(body, "top_k", int, lo=-1, default=0)
    top_k = 0 if top_k in (-1, 0) else min(top_k, engine.vocab)   # vLLM's -1 = off
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

    limit = engine.max_cache_len
    if not engine.fits(prompt_len, 1):
        raise ApiError(400, f"prompt is too long: {prompt_len} tokens, and the model's context is "
                       f"{limit} tokens", param=where, code="context_length_exceeded")
    for name in ("max_completion_tokens", "max_tokens"):
        max_new = _number(body, name, int, lo=0 if allow_zero else 1, default=None)
        if max_new is not None:
            if not engine.fits(prompt_len, max(max_new, 1)):
                raise ApiError(400, f"prompt ({prompt_len} tokens) + {name}={max_new} does not fit "
                               f"the model's context of {limit} tokens; lower {name}",
                               param=name, code="context_length_exceeded")
            break
    else:  # no limit given: as many as fit, capped
        max_new = min(default_max_tokens, limit - prompt_len + 1)
        while max_new > 1 and not engine.fits(prompt_len, max_new):
            max_new -= 1
    return SamplingParams(max_new_tokens=max(max_new, 1), temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=stops), max_new


_REMOVED_GUIDED = ("guided_choice", "guided_json", "guided_regex", "guided_grammar",
                   "guided_decoding_backend", "guided_whitespace_pattern", "guided_json_object")
_STRUCTURED_KEYS = {"choice": "choice", "regex": "regex", "json": "json_schema",
                    "grammar": "grammar", "json_object": "json_object"}


def parse_constraint(body: Mapping) -> Any:
    """The request's output constraint (an ``OutputConstraint``) or None.

    OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema`` with ``name``,
    ``schema``, ``strict``) or vLLM's ``structured_outputs`` (exactly one of ``choice``,
    ``regex``, ``json``, ``grammar``, ``json_object``), not both. The ``guided_*`` fields vLLM
    removed are refused (a server that ignored them would answer unconstrained text with a 200).
    """
    from cosa_jax.inference.constraints import ConstraintError, OutputConstraint
    for name in _REMOVED_GUIDED:
        if name in body:
            raise ApiError(400, f"'{name}' was removed (vLLM >= 0.12 and this server): send "
                           f"'structured_outputs' instead, e.g. {{\"structured_outputs\": "
                           f"{{\"choice\": [...]}}}}", param=name)
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and so is not None:
        raise ApiError(400, "give either 'response_format' or 'structured_outputs', not both",
                       param="structured_outputs")
    try:
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
                raise ApiError(400, "response_format.type must be 'text', 'json_object' or "
                               "'json_schema'", param="response_format")
            if fmt["type"] == "text":
                return None
            if fmt["type"] == "json_object":
                return OutputConstraint("json_object", None, field="response_format")
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ApiError(400, "response_format.json_schema must be an object with 'name' and "
                               "'schema'", param="response_format.json_schema")
            strict = spec.get("strict", False)
            if strict is not None and not isinstance(strict, bool):
                raise ApiError(400, "response_format.json_schema.strict must be true or false",
                               param="response_format.json_schema.strict")
            # strict or not, the output is constrained to the schema (never looser than asked)
            return OutputConstraint("json_schema", spec["schema"],
                                    field="response_format.json_schema.schema")
        if so is None:
            return None
        if not isinstance(so, dict):
            raise ApiError(400, "'structured_outputs' must be an object", param="structured_outputs")
        unknown = sorted(k for k in so if k not in _STRUCTURED_KEYS and so[k] not in (None, False))
        if unknown:
            raise ApiError(400, f"structured_outputs: {unknown} not supported (use one of "
                           f"{sorted(_STRUCTURED_KEYS)})", param=f"structured_outputs.{unknown[0]}")
        given = [k for k in _STRUCTURED_KEYS if so.get(k) not in (None, False)]
        if len(given) != 1:
            raise ApiError(400, f"structured_outputs needs exactly one of {sorted(_STRUCTURED_KEYS)}"
                           f", got {given}", param="structured_outputs")
        k = given[0]
        value = None if k == "json_object" else so[k]
        return OutputConstraint(_STRUCTURED_KEYS[k], value, field=f"structured_outputs.{k}")
    except ConstraintError as e:
        raise ApiError(400, str(e), param=e.field) from None


class EngineConstraint:
    """A ``ConstraintState`` in the engine's per-slot protocol (next_mask / accept /
    is_terminated, and forced_tokens for jump-forward): the packed llguidance bitmask is
    handed over as is."""

    def __init__(self, state, words: int):
        import numpy as np
        self.state = state
        self._row = np.zeros(words, np.int32)

    def next_mask(self):
        self.state.fill_mask(self._row)
        return self._row

    def accept(self, token: int) -> None:
        self.state.accept(token)

    def forced_tokens(self, limit: int) -> list[int]:
        return self.state.forced_tokens(limit)

    def is_terminated(self) -> bool:
        return self.state.is_terminated


def start_constraint(state: "ServerState", constraint) -> EngineConstraint | None:
    if constraint is None:
        return None
    from cosa_jax.inference.constraints import ConstraintCompiler, ConstraintError, bitmask_width
    m = state.model
    compiler = ConstraintCompiler.for_tokenizer(m.tokenizer, vocab_size=m.cfg.vocab_size,
                                                eos_ids=m.eos_ids)
    try:
        return EngineConstraint(compiler.start(constraint), bitmask_width(m.cfg.vocab_size))
    except ConstraintError as e:
        raise ApiError(400, str(e), param=e.field) from None


def parse_chat_logprobs(body: Mapping) -> int | None:
    """``logprobs: true`` (+ ``top_logprobs``) -> how many alternatives per token; else None."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", int, lo=0, hi=MAX_TOP_LOGPROBS, default=None)
    if top is not None and not want:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def parse_prompts(raw: Any, model: ChatModel) -> list[tuple[list[int], str | None]]:
    """A completions ``prompt``: text, token ids, or a list of either -> (ids, text or None)."""
    def ids_of(value, where):
        if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ApiError(400, f"{where}: expected a non-empty list of token ids", param="prompt")
        bad = [t for t in value if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary "
                           f"[0, {model.cfg.vocab_size})", param="prompt")
        return list(value)

    if raw is None:
        raise ApiError(400, "'prompt' is required: a string, a list of token ids, or a list of "
                       "either", param="prompt")
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list "
                       "of either", param="prompt")
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            ids = model.encode_prompt(p)
            if not ids:
                raise ApiError(400, f"prompt[{i}] is empty", param="prompt")
            out.append((ids, p))
        elif isinstance(p, list):
            out.append((ids_of(p, f"prompt[{i}]"), None))
        else:
            raise ApiError(400, f"prompt[{i}]: expected a string or a list of token ids",
                           param="prompt")
    return out


# ------------------------------------------------------------------------ app
@dataclasses.dataclass
class ServerState:
    model: ChatModel
    engine: Engine
    served_model_name: str
    registry: Registry | None
    default_config: str | None
    started: float
    join_wait_ms: float
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    admission: Admission | None = None


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
    # Size cap, UTF-8, NaN/Infinity, the endpoint's field allow-list: requests.py.
    # The gateway (no STATE_KEY) forwards fields its upstream may know: no allow-list there.
    state = request.app.get(STATE_KEY)
    if state is None:
        return await read_json_body(request, ServerLimits(), check_known=False)
    return await read_json_body(request, state.limits)


async def _off_loop_if_large(request: web.Request, fn, *args):
    """Tokenise a large request in a thread, so /health and small requests keep answering."""
    if (request.content_length or 0) < request.app[STATE_KEY].limits.parse_off_loop_bytes:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _check_model(body: Mapping, state: ServerState) -> None:
    model_name = body.get("model")
    if not model_name:
        raise ApiError(400, "'model' is required", param="model")
    if model_name != state.served_model_name:
        raise ApiError(404, f"model {model_name!r} is not served here (this server serves "
                       f"{state.served_model_name!r})", param="model", code="model_not_found")


def _stream_flags(body: Mapping) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage"))


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _Generation:
    """The engine requests behind one HTTP request; outputs arrive as (choice index, StepOutput)
    on the event loop. ``cancel`` frees their slots at the engine's next step."""

    def __init__(self, state: ServerState, request: web.Request, prompts: Sequence[list[int]],
                 sampling, constraint=None, **kw):
        """``constraint``: a callable making each choice's fresh engine constraint (or None)."""
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        try:
            for i, ids in enumerate(prompts):
                self.handles.append(state.engine.submit(
                    ids, sampling, on_output=functools.partial(self._post, i),
                    constraint=constraint() if constraint is not None else None, **kw))
        except ValueError as e:
            self.cancel("request refused")
            raise ApiError(400, str(e), param="prompt") from None

    def _post(self, index: int, out: StepOutput) -> None:   # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

    def cancel(self, reason: str | None = None) -> None:
        if reason is None:
            reason = "client disconnected" if _disconnected(self.request) else "request aborted"
        for h in self.handles:
            if not h.done.is_set():
                h.cancel(reason)

    async def outputs(self):
        remaining = len(self.handles)
        while remaining:
            try:
                index, out = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if _disconnected(self.request):
                    self.cancel("client disconnected")
                continue
            if out.finished:
                remaining -= 1
                if out.finish_reason == "error":
                    self.cancel("a sibling request failed")
                    raise ApiError(500, f"generation failed: {out.error}")
            yield index, out
            if _disconnected(self.request):
                self.cancel("client disconnected")

    async def collect(self) -> list[dict]:
        """Per choice: token ids, text, finish reason, logprobs (lists)."""
        acc = [{"tokens": [], "text": [], "logprobs": [], "finish": None}
               for _ in self.handles]
        async for i, out in self.outputs():
            acc[i]["tokens"] += out.token_ids
            acc[i]["text"].append(out.text)
            acc[i]["logprobs"] += out.logprobs
            if out.finished:
                acc[i]["finish"] = out.finish_reason
        if any(a["finish"] == "cancelled" or a["finish"] is None for a in acc):
            raise ConnectionResetError("client went away")
        for a, h in zip(acc, self.handles):
            a["text"] = "".join(a["text"])
            a["prompt_logprobs"] = h.result_value.prompt_logprobs if h.result_value else None
        return acc


def _chat_logprob(model: ChatModel, lp: TokenLogprob) -> dict:
    def entry(tok, value):
        return {"token": model.token_text(tok), "logprob": value, "bytes": model.token_bytes(tok)}
    return {**entry(lp.token_id, lp.logprob),
            "top_logprobs": [entry(t, v) for t, v in lp.top]}


async def _sse(resp: web.StreamResponse, payload: dict | str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await resp.write(f"data: {data}\n\n".encode())


async def _open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    key = _check_key(request, state.registry)
    body = await _json_body(request)
    _check_model(body, state)
    messages = parse_messages(body.get("messages"))
    requested = body.get("safety_config")
    if requested is not None and not isinstance(requested, str):
        raise ApiError(400, "'safety_config' must be a config name (string)", param="safety_config")
    try:
        messages = apply_policy(messages, key, state.registry, state.default_config, requested)
    except AuthError as e:
        raise ApiError(e.status, e.message, code=e.code) from None
    prompt_ids = await _off_loop_if_large(request, state.model.encode, messages)
    sampling, _ = parse_sampling(body, prompt_len=len(prompt_ids), engine=state.engine)
    top_n = parse_chat_logprobs(body)
    constraint = parse_constraint(body)
    stream, include_usage = _stream_flags(body)

    gen = _Generation(state, request, [prompt_ids], sampling, logprobs=top_n,
                      constraint=lambda: start_constraint(state, constraint))
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.served_model_name
    try:
        if not stream:
            (done,) = await gen.collect()
            n = len(done["tokens"])
            logprobs = None
            if top_n is not None:
                logprobs = {"content": [_chat_logprob(state.model, lp) for lp in done["logprobs"]],
                            "refusal": None}
            return web.json_response({
                "id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "finish_reason": done["finish"], "logprobs": logprobs,
                             "message": {"role": "assistant", "content": done["text"]}}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                          "total_tokens": len(prompt_ids) + n},
            })
        resp = await _open_stream(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        await _sse(resp, {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        n = 0
        async for _, out in gen.outputs():
            n += len(out.token_ids)
            if out.text or out.logprobs:
                lps = None
                if top_n is not None:
                    lps = {"content": [_chat_logprob(state.model, lp) for lp in out.logprobs],
                           "refusal": None}
                await _sse(resp, {**base, "choices": [{"index": 0, "delta": {"content": out.text},
                                                       "logprobs": lps, "finish_reason": None}]})
            if out.finished:
                if out.finish_reason == "cancelled":
                    raise ConnectionResetError("client went away")
                await _sse(resp, {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                       "finish_reason": out.finish_reason}]})
        if include_usage:
            await _sse(resp, {**base, "choices": [], "usage": {
                "prompt_tokens": len(prompt_ids), "completion_tokens": n,
                "total_tokens": len(prompt_ids) + n}})
        await _sse(resp, "[DONE]")
        await resp.write_eof()
        return resp
    finally:
        gen.cancel()


def _legacy_logprobs(model: ChatModel, lps: Sequence[TokenLogprob | None], start_offset: int,
                     first_ids: Sequence[int] = ()) -> dict:
    """The completions endpoint's log-prob shape: parallel lists of tokens, their log-probs,
    {token: logprob} alternatives and character offsets."""
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for i, lp in enumerate(lps):
        tok = first_ids[i] if lp is None else lp.token_id
        text = model.token_text(tok)
        tokens.append(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {model.token_text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    key = _check_key(request, state.registry)
    body = await _json_body(request)
    _check_model(body, state)
    try:
        check_raw_prompt(key, state.registry)
    except AuthError as e:
        raise ApiError(e.status, e.message, code=e.code) from None
    prompts = await _off_loop_if_large(request, parse_prompts, body.get("prompt"), state.model)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, "'echo' must be true or false", param="echo")
    top_n = _number(body, "logprobs", int, lo=0, hi=MAX_TOP_LOGPROBS, default=None)
    longest = max(len(ids) for ids, _ in prompts)
    sampling, max_tokens = parse_sampling(body, prompt_len=longest, engine=state.engine,
                                          default_max_tokens=DEFAULT_COMPLETION_TOKENS,
                                          allow_zero=echo, where="prompt")
    stream, include_usage = _stream_flags(body)
    if stream and echo and max_tokens == 0:
        raise ApiError(400, "stream with echo and max_tokens=0 has nothing to stream",
                       param="stream")
    score_only = max_tokens == 0
    constraint = parse_constraint(body)
    gen = _Generation(state, request, [ids for ids, _ in prompts], sampling,
                      logprobs=top_n, prompt_logprobs=top_n if (echo and top_n is not None) else None,
                      constraint=lambda: start_constraint(state, constraint))
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.served_model_name
    prompt_texts = [text if text is not None else state.model.tokenizer.decode(ids)
                    for ids, text in prompts]
    n_prompt = sum(len(ids) for ids, _ in prompts)
    try:
        if not stream:
            done = await gen.collect()
            choices = []
            for i, d in enumerate(done):
                if score_only:
                    d["tokens"], d["text"], d["logprobs"], d["finish"] = [], "", [], "length"
                text = (prompt_texts[i] if echo else "") + d["text"]
                logprobs = None
                if top_n is not None:
                    lps = list(d["logprobs"])
                    if echo:
                        lps = list(d["prompt_logprobs"]) + lps
                    logprobs = _legacy_logprobs(state.model, lps, 0, prompts[i][0])
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": d["finish"]})
            n_new = sum(len(d["tokens"]) for d in done)
            return web.json_response({
                "id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                          "total_tokens": n_prompt + n_new}})
        resp = await _open_stream(request)
        base = {"id": rid, "object": "text_completion", "created": created, "model": name}
        if echo:
            for i, text in enumerate(prompt_texts):
                await _sse(resp, {**base, "choices": [{"index": i, "text": text, "logprobs": None,
                                                       "finish_reason": None}]})
        n_new = 0
        async for i, out in gen.outputs():
            n_new += len(out.token_ids)
            if out.finished and out.finish_reason == "cancelled":
                raise ConnectionResetError("client went away")
            if out.text or out.logprobs or out.finished:
                lps = None
                if top_n is not None:
                    lps = _legacy_logprobs(state.model, out.logprobs, 0)
                await _sse(resp, {**base, "choices": [{
                    "index": i, "text": out.text, "logprobs": lps,
                    "finish_reason": out.finish_reason if out.finished else None}]})
        if include_usage:
            await _sse(resp, {**base, "choices": [], "usage": {
                "prompt_tokens": n_prompt, "completion_tokens": n_new,
                "total_tokens": n_prompt + n_new}})
        await _sse(resp, "[DONE]")
        await resp.write_eof()
        return resp
    finally:
        gen.cancel()


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    _check_key(request, state.registry)
    return web.json_response({"object": "list", "data": [{
        "id": state.served_model_name, "object": "model", "created": int(state.started),
        "owned_by": "cosa-jax", "max_model_len": state.engine.max_cache_len}]})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    _check_key(request, state.registry)
    return web.json_response({**state.engine.stats.as_dict(),
                              "uptime_s": round(time.time() - state.started, 3),
                              "max_batch": state.engine.slots,
                              "active": state.engine.active, "waiting": state.engine.waiting,
                              "batch_wait_ms": state.join_wait_ms})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def _errors(request: web.Request, handler):
    state = request.app.get(STATE_KEY)
    admitted = state is not None and state.admission is not None and request.method == "POST"
    key = bearer_key(request.headers.get("Authorization")) if admitted else None
    try:
        if admitted:   # per-key concurrency and the queue bound (429), before the body is read
            state.admission.enter(key, state.engine.waiting)
        try:
            return await handler(request)
        finally:
            if admitted:
                state.admission.leave(key)
    except ControlTokenError as e:
        e = ApiError(400, str(e), param="messages", code="control_token")
        log.info("%s %s -> %d %s", request.method, request.path, e.status, e.message)
        return e.response()
    except ApiError as e:
        log.info("%s %s -> %d %s", request.method, request.path, e.status, e.message)
        return e.response()
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)   # nobody is listening; nothing to report
    except web.HTTPException as e:  # 404 / 405 from routing, in OpenAI's shape
        if e.status >= 400:
            log.info("%s %s -> %d %s", request.method, request.path, e.status, e.reason)
            return ApiError(e.status, f"{request.method} {request.path}: {e.reason}").response()
        raise
    except Exception as e:  # noqa: BLE001 - answer, log, keep serving
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()


def create_app(model: ChatModel, *, served_model_name: str, registry: Registry | None = None,
               default_config: str | None = None, max_batch: int = 16,
               batch_wait_ms: float = 2.0, max_cache_len: int | None = None,
               chunk_sizes: Sequence[int] = (16, 64, 256), prefill_budget: int = 512,
               limits: ServerLimits | None = None) -> web.Application:
    """The aiohttp application; the engine's loop starts and stops with the app.

    max_batch: the engine's slots; batch_wait_ms: while nothing decodes, how long the first
    request waits for others so that their prefill runs as one batch; limits: what one client
    may ask (body size, messages, concurrency, queue: ``requests.ServerLimits``).
    """
    limits = (limits or ServerLimits()).validate()
    engine = model.make_engine(slots=max_batch, join_wait_s=batch_wait_ms / 1000.0,
                               max_cache_len=max_cache_len, chunk_sizes=chunk_sizes,
                               prefill_budget=prefill_budget)
    app = web.Application(middlewares=[_errors], client_max_size=limits.max_body_bytes)
    app[STATE_KEY] = ServerState(model, engine, served_model_name, registry, default_config,
                                 time.time(), batch_wait_ms, limits, Admission(limits))

    async def lifecycle(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    return app


def read_config_arg(value: str | None) -> str | None:
    """``--config.default_safety_config``: a file path (its text) or the config text itself."""
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

"""Policy gateway: the authorised-config registry in front of any OpenAI-compatible backend.

The deployment CoSA describes (only authorised users set the safety config) should not depend
on which engine generates: ``launch.serve --config.upstream=URL`` runs this app instead of a model. It
decides the system turn with exactly the server's rules (``auth``), forwards the rest of the
request untouched to the upstream (vLLM, another cosa-jax server, ...), and passes the answer
back, server-sent events included, byte for byte. Raw prompts (``/v1/completions``) follow the
server's rule too. An upstream that cannot be reached or fails answers 502 naming the upstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import aiohttp
from aiohttp import web

from cosa_jax.inference.auth import (AuthError, Registry, check_raw_prompt,
                                     policy_on_raw_messages)
from cosa_jax.inference.server import ApiError, _check_key, _errors, _json_body

log = logging.getLogger(__name__)

# Fields of ours that an upstream does not know (they are decided here).
_LOCAL_FIELDS = ("safety_config",)


@dataclasses.dataclass
class GatewayState:
    upstream: str                  # base URL ending in /v1
    upstream_key: str | None
    registry: Registry | None
    default_config: str | None
    timeout_s: float
    session: aiohttp.ClientSession | None = None
    started: float = dataclasses.field(default_factory=time.time)


GATEWAY_KEY = web.AppKey("cosa_gateway", GatewayState)


def _upstream_headers(state: GatewayState) -> dict:
    headers = {"Content-Type": "application/json"}
    if state.upstream_key:
        headers["Authorization"] = f"Bearer {state.upstream_key}"
    return headers


def _bad_gateway(state: GatewayState, what: str) -> ApiError:
    return ApiError(502, f"upstream {state.upstream} failed: {what}", code="upstream_error")


async def _forward(request: web.Request, state: GatewayState, method: str, path: str,
                   body: dict | None) -> web.StreamResponse:
    url = state.upstream.rstrip("/") + path
    try:
        upstream = await state.session.request(
            method, url, headers=_upstream_headers(state),
            data=None if body is None else json.dumps(body).encode())
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise _bad_gateway(state, f"{type(e).__name__}: {e}") from None
    try:
        if upstream.status >= 500:
            text = (await upstream.read()).decode("utf-8", "replace")
            raise _bad_gateway(state, f"HTTP {upstream.status}: {text[:500]}")
        ctype = upstream.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            payload = await upstream.read()
            return web.Response(body=payload, status=upstream.status,
                                headers={"Content-Type": ctype})
        resp = web.StreamResponse(status=upstream.status,
                                  headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            async for piece in upstream.content.iter_any():
                await resp.write(piece)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Headers are gone: say it in the stream, in OpenAI's error shape.
            err = _bad_gateway(state, f"stream broke: {type(e).__name__}: {e}").body()
            await resp.write(f"data: {json.dumps(err)}\n\n".encode())
        await resp.write_eof()
        return resp
    except aiohttp.ClientError as e:
        raise _bad_gateway(state, f"{type(e).__name__}: {e}") from None
    finally:
        upstream.release()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[GATEWAY_KEY]
    key = _check_key(request, state.registry)
    body = await _json_body(request)
    requested = body.get("safety_config")
    if requested is not None and not isinstance(requested, str):
        raise ApiError(400, "'safety_config' must be a config name (string)", param="safety_config")
    if body.get("messages") is None:
        raise ApiError(400, "'messages' is required: a list of {role, content} objects",
                       param="messages")
    try:
        body["messages"] = policy_on_raw_messages(body["messages"], key, state.registry,
                                                  state.default_config, requested)
    except AuthError as e:
        raise ApiError(e.status, e.message, code=e.code,
                       param="messages" if e.status == 400 else None) from None
    for name in _LOCAL_FIELDS:
        body.pop(name, None)
    return await _forward(request, state, "POST", "/chat/completions", body)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[GATEWAY_KEY]
    key = _check_key(request, state.registry)
    body = await _json_body(request)
    try:
        check_raw_prompt(key, state.registry)
    except AuthError as e:
        raise ApiError(e.status, e.message, code=e.code) from None
    return await _forward(request, state, "POST", "/completions", body)


async def list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[GATEWAY_KEY]
    _check_key(request, state.registry)
    return await _forward(request, state, "GET", "/models", None)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "upstream": request.app[GATEWAY_KEY].upstream})


def create_gateway_app(upstream: str, *, registry: Registry | None = None,
                       default_config: str | None = None, upstream_key: str | None = None,
                       timeout_s: float = 3600.0) -> web.Application:
    """``upstream``: the backend's OpenAI base URL (``http://host:port/v1``)."""
    if not upstream.startswith(("http://", "https://")):
        raise ValueError(f"upstream must be an http(s) URL like http://127.0.0.1:8001/v1, "
                         f"got {upstream!r}")
    state = GatewayState(upstream.rstrip("/"), upstream_key, registry, default_config, timeout_s)
    app = web.Application(middlewares=[_errors], client_max_size=16 * 2**20)
    app[GATEWAY_KEY] = state

    async def lifecycle(app):
        state.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s))
        yield
        await state.session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app

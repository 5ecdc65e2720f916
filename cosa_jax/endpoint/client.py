"""Chat-completions client for long synthesis and evaluation runs: per-role endpoints, retries,
rate limits, costs.

Built on ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) with the library's own retries turned off
(``max_retries=0``): our loop retries 429, 5xx, timeouts, dropped connections and garbage replies
with exponential backoff and full jitter, honouring ``Retry-After``, and it shares one concurrency
limit and one requests/tokens-per-minute budget across every request of an endpoint.
``run_requests`` drives a batch through a ``Journal`` so completed requests are never sent twice.
A ``ChatClient`` owns HTTP connections: open it with ``async with ChatClient(...) as client:``
(or ``start()`` / ``await close()``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import random
import time
from typing import Any, Mapping, Sequence

import httpx2
import openai
from tqdm.auto import tqdm

from cosa_jax.endpoint.journal import Journal, request_key

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "[::1]")


@dataclasses.dataclass
class EndpointConfig:
    """One role's endpoint (permissive generator, safe generator, judge...).

    ``params`` are sampling parameters sent with every request (temperature, max_tokens, top_p,
    seed, extra_body...). ``rpm``/``tpm`` of 0 mean unlimited. Prices are per million tokens.
    """

    model: str
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    api_type: str = "openai"  # "openai" (OpenAI, vLLM, our server) or "azure"
    api_version: str | None = None  # Azure only
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    concurrency: int = 16
    rpm: float = 0.0
    tpm: float = 0.0
    timeout_s: float = 120.0
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 600.0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    http_backend: str = "aiohttp"  # "aiohttp" (openai.DefaultAioHttpClient) or "httpx" (SDK default)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str = "endpoint") -> "EndpointConfig":
        """From a dict / ConfigDict; unknown or missing fields raise naming ``where``."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown endpoint field(s) {unknown}; known: {sorted(names)}")
        if not d.get("model"):
            raise ValueError(f"{where}: 'model' is required")
        if d.get("api_type", "openai") not in ("openai", "azure"):
            raise ValueError(f"{where}: api_type must be 'openai' or 'azure', got {d['api_type']!r}")
        if d.get("http_backend", "aiohttp") not in ("aiohttp", "httpx"):
            raise ValueError(f"{where}: http_backend must be 'aiohttp' or 'httpx', got {d['http_backend']!r}")
        d["params"] = dict(d.get("params") or {})
        return cls(**d)

    def is_local(self) -> bool:
        return bool(self.base_url) and any(h in self.base_url for h in _LOCAL_HOSTS)


class FatalEndpointError(RuntimeError):
    """Retrying cannot help (bad key, unknown model, missing deployment): stop the run."""


class RequestFailed(RuntimeError):
    """One request gave up (non-retryable 4xx, or attempts exhausted); the run goes on.
    ``status`` is the HTTP status of a refused request (None when attempts ran out)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class UsageStats:
    """Token and cost accounting for one endpoint.

    ``cached`` counts requests not sent because the journal already held them or an identical
    request in the same batch was sent instead.
    """

    requests: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> str:
        errs = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"requests={self.requests} cached={self.cached} retries={self.retries} "
            f"failed={self.failed} tokens(in/out)={self.prompt_tokens}/{self.completion_tokens} "
            f"cost=${self.cost_usd:.4f} errors: {errs}"
        )


class TokenBucket:
    """Continuous-refill bucket; a request larger than the burst may drive it into debt."""

    def __init__(self, per_minute: float, burst_s: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.t = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    async def acquire(self, amount: float) -> None:
        async with self._lock:  # FIFO: one waiter at a time owns the refill
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)

    def credit(self, amount: float) -> None:
        """Return an over-estimate (or charge an under-estimate, if negative)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from Retry-After-Ms / Retry-After (number or HTTP date), or None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    v = headers.get("retry-after")
    if v is None:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(v)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _estimate_tokens(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> int:
    chars = sum(len(str(m.get("content", ""))) for m in messages)
    return chars // 4 + int(params.get("max_tokens") or params.get("max_completion_tokens") or 256)


@dataclasses.dataclass
class ChatRequest:
    """One chat to send. ``salt`` separates otherwise identical requests (e.g. sample index)."""

    messages: list[dict[str, str]]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    salt: str = ""


class ChatClient:
    """An endpoint with its limits; ``complete`` returns a JSON-able result dict or raises.

    The API key is resolved at construction (a missing one fails before any work is queued); the
    HTTP client is made by ``start`` and closed by ``close``, which ``async with`` calls.
    """

    def __init__(self, endpoint: EndpointConfig, role: str = "endpoint", *, rng_seed: int | None = None):
        self.endpoint = endpoint
        self.role = role
        self.usage = UsageStats()
        self._sem = asyncio.Semaphore(max(1, endpoint.concurrency))
        self._rpm = TokenBucket(endpoint.rpm) if endpoint.rpm else None
        self._tpm = TokenBucket(endpoint.tpm) if endpoint.tpm else None
        self._jitter = random.Random(rng_seed)
        self._key = self._api_key()
        self._client = None

    def _api_key(self) -> str:
        env = self.endpoint.api_key_env
        if not env:
            return "EMPTY"  # local servers (vLLM, ours) accept any key
        key = os.environ.get(env)
        if key:
            return key
        if self.endpoint.is_local():
            return "EMPTY"
        raise FatalEndpointError(
            f"{self.role}: environment variable {env!r} (api_key_env) is not set; it must hold the "
            f"API key for {self.endpoint.base_url or 'api.openai.com'}"
        )

    def _make_client(self):
        ep = self.endpoint
        n = max(1, ep.concurrency)
        limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)  # reuse every connection
        if ep.http_backend == "aiohttp":  # the SDK's own aiohttp transport: ~2x less CPU per request
            http_client = openai.DefaultAioHttpClient(limits=limits, timeout=ep.timeout_s)
        else:
            http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=ep.timeout_s)
        common = dict(api_key=self._key, max_retries=0, timeout=ep.timeout_s, http_client=http_client)
        if ep.api_type == "azure":
            if not ep.base_url:
                raise ValueError(f"{self.role}: Azure endpoints need base_url (the azure_endpoint)")
            return openai.AsyncAzureOpenAI(
                azure_endpoint=ep.base_url, api_version=ep.api_version or "2024-10-21", **common
            )
        return openai.AsyncOpenAI(base_url=ep.base_url or None, **common)

    def start(self) -> "ChatClient":
        """Open the HTTP client (idempotent); ``async with`` does this for you."""
        if self._client is None:
            self._client = self._make_client()
        return self

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> "ChatClient":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def params_for(self, req: ChatRequest) -> dict[str, Any]:
        return {**self.endpoint.params, **req.params}

    def key_for(self, req: ChatRequest) -> str:
        params = self.params_for(req)
        if req.salt:
            params["__salt__"] = req.salt
        return request_key(self.endpoint.model, req.messages, params)

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self.endpoint.backoff_max_s, self.endpoint.backoff_base_s * (2.0**attempt))
        return self._jitter.uniform(0.0, cap)  # "full jitter": spreads out a thundering herd

    async def complete(self, req: ChatRequest) -> dict[str, Any]:
        """Send one chat with retries; returns {text, finish_reason, prompt_tokens, ...}."""
        if self._client is None:
            raise RuntimeError(f"{self.role}: ChatClient is not started; use `async with ChatClient(...)`")
        ep = self.endpoint
        params = self.params_for(req)
        estimate = _estimate_tokens(req.messages, params)
        last = "no attempt made"
        for attempt in range(ep.max_attempts):
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(estimate)
            wait_s: float | None = None
            try:
                async with self._sem:
                    # client.post is the SDK's documented raw-request path: same auth, Azure routing
                    # and HTTP error classes as chat.completions.create, without building typed
                    # request/response models (most of the per-request CPU at high concurrency).
                    resp = await self._client.post(
                        "/chat/completions", body=_body(ep.model, req.messages, params), cast_to=httpx2.Response
                    )
                result = _result_from(json.loads(resp.content))
                self.usage.requests += 1
                self.usage.prompt_tokens += result["prompt_tokens"]
                self.usage.completion_tokens += result["completion_tokens"]
                self.usage.cost_usd += (
                    result["prompt_tokens"] * ep.price_input_per_mtok
                    + result["completion_tokens"] * ep.price_output_per_mtok
                ) / 1e6
                if self._tpm:
                    used = result["prompt_tokens"] + result["completion_tokens"]
                    self._tpm.credit(estimate - used if used else 0)
                return result
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise FatalEndpointError(f"{self.role} ({ep.base_url or 'openai'}, model {ep.model!r}): {e}") from e
            except openai.APIStatusError as e:
                status = e.status_code
                if status == 429 or status >= 500 or status in (408, 409):
                    kind = "429" if status == 429 else ("5xx" if status >= 500 else str(status))
                    wait_s = _retry_after_s(e.response.headers)
                    last = f"HTTP {status}: {str(e)[:200]}"
                else:
                    self.usage.failed += 1
                    self.usage.count_error(str(status))
                    raise RequestFailed(f"{self.role}: HTTP {status} is not retryable: {str(e)[:300]}",
                                        status=status) from e
            except openai.APITimeoutError as e:
                kind, last = "timeout", f"timeout: {e}"
            except openai.APIConnectionError as e:
                kind, last = "connection", f"connection error: {e}"
            except (openai.APIResponseValidationError, _BadReply, json.JSONDecodeError, UnicodeDecodeError) as e:
                kind, last = "bad_reply", f"unusable reply: {str(e)[:200]}"
            self.usage.count_error(kind)
            if attempt + 1 >= ep.max_attempts:
                break
            self.usage.retries += 1
            if wait_s is not None:
                delay = min(wait_s, ep.max_retry_after_s) + self._jitter.uniform(0, 0.1 * ep.backoff_base_s)
            else:
                delay = self._backoff_s(attempt)
            await asyncio.sleep(delay)
        self.usage.failed += 1
        raise RequestFailed(f"{self.role}: gave up after {ep.max_attempts} attempts; last error: {last}")

class _BadReply(ValueError):
    pass


def _body(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """Chat-completions JSON body; ``extra_body`` entries are merged in as the SDK would."""
    body = {k: v for k, v in params.items() if k != "extra_body"}
    body.update(params.get("extra_body") or {})
    body["model"] = model
    body["messages"] = list(messages)
    return body


def _result_from(resp: Any) -> dict[str, Any]:
    """The parts of a chat.completion JSON we keep; anything unusable raises _BadReply (retried)."""
    if not isinstance(resp, dict):
        raise _BadReply(f"reply is not a JSON object: {str(resp)[:200]}")
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _BadReply(f"reply has no choices: {str(resp)[:200]}")
    msg = choices[0].get("message")
    text = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(text, str):
        raise _BadReply(f"reply has no text content: {str(resp)[:200]}")
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    out = {
        "text": text,
        "finish_reason": choices[0].get("finish_reason"),
        "model": resp.get("model"),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    lps = choices[0].get("logprobs")
    if isinstance(lps, dict) and isinstance(lps.get("content"), list):
        # token + top alternatives only (no bytes): enough for an expected rating, small in a journal
        out["logprobs"] = [{"token": e.get("token"), "logprob": e.get("logprob"),
                            "top_logprobs": [{"token": a.get("token"), "logprob": a.get("logprob")}
                                             for a in e.get("top_logprobs") or ()]}
                           for e in lps["content"] if isinstance(e, dict)]
    return out


async def run_requests(
    client: ChatClient,
    journal: Journal,
    requests: Sequence[ChatRequest],
    *,
    desc: str = "",
    progress: bool = True,
) -> list[dict[str, Any] | None]:
    """Results in request order; journaled ones are not re-sent; None where a request failed.

    Workers pull from a queue (never hundreds of thousands of pending tasks), each result goes to
    the journal the moment it arrives. Identical keys within the batch are sent once.
    """
    keys = [client.key_for(r) for r in requests]
    todo: dict[str, ChatRequest] = {}
    for k, r in zip(keys, requests):
        if k not in journal and k not in todo:
            todo[k] = r
    client.usage.cached += len(requests) - len(todo)
    journal.plan(todo)  # pending rows: what a progress reader counts as still to do
    bar = tqdm(total=len(todo), desc=desc or client.role, disable=not progress, leave=False)
    queue: asyncio.Queue[tuple[str, ChatRequest]] = asyncio.Queue()
    for item in todo.items():
        queue.put_nowait(item)
    fatal: list[BaseException] = []

    async def worker() -> None:
        while not fatal:
            try:
                k, r = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                result = await client.complete(r)
                journal.put(k, result)
            except RequestFailed as e:
                journal.fail(k, str(e))
                tqdm.write(f"[{client.role}] request failed: {e}") if progress else None
            except FatalEndpointError as e:
                fatal.append(e)
                return
            bar.update(1)
            if client.usage.retries or client.usage.failed:
                bar.set_postfix(retries=client.usage.retries, failed=client.usage.failed, refresh=False)

    n_workers = min(max(1, client.endpoint.concurrency), max(1, len(todo)))
    try:
        await asyncio.gather(*(worker() for _ in range(n_workers)))
    finally:
        bar.close()
    if fatal:
        raise fatal[0]
    return [journal.get(k) for k in keys]


def run_requests_sync(
    endpoint: EndpointConfig,
    journal: Journal,
    requests: Sequence[ChatRequest],
    *,
    role: str = "endpoint",
    desc: str = "",
    progress: bool = True,
) -> tuple[list[dict[str, Any] | None], UsageStats]:
    """Blocking wrapper: makes a client on a fresh event loop, runs the batch, closes it."""

    async def main():
        async with ChatClient(endpoint, role) as client:
            return await run_requests(client, journal, requests, desc=desc, progress=progress), client.usage

    return asyncio.run(main())

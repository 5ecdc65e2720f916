"""TEST DOUBLE: a ChatClient that answers in-process, with no HTTP, for journal-scale tests.

Everything above the wire is the production path (``run_requests``: keys, the journal, the
worker pool, failure accounting); only ``complete`` is replaced, so 100k requests take seconds.
Replies are a deterministic function of the request key (``reply_text``), so a test can check
every journaled reply. ``sent_log``: each call appends its key to this file with one unbuffered
``write`` (what a server's access log would show, and it survives a SIGKILL of the process).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, RequestFailed


def reply_text(key: str, size: int) -> str:
    seed = hashlib.sha256(key.encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


class InstantChatClient(ChatClient):
    """``fail_rate``: the fraction of keys (by hash) whose request fails (RequestFailed)."""

    def __init__(self, endpoint: EndpointConfig, role: str = "instant", *, reply_bytes: int = 256,
                 fail_rate: float = 0.0, sent_log: str | os.PathLike | None = None):
        super().__init__(endpoint, role)
        self.reply_bytes, self.fail_rate = reply_bytes, fail_rate
        self._log_fd = os.open(sent_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if sent_log else None
        self.calls = 0

    def start(self) -> "InstantChatClient":
        return self  # no HTTP client

    async def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    async def complete(self, req: ChatRequest) -> dict[str, Any]:
        key = self.key_for(req)
        await asyncio.sleep(0)  # yield like a real request, so the workers interleave
        self.calls += 1
        if self._log_fd is not None:
            os.write(self._log_fd, (key + "\n").encode())
        if self.fail_rate and int(key[:8], 16) / 0xFFFFFFFF < self.fail_rate:
            self.usage.failed += 1
            raise RequestFailed(f"{self.role}: injected failure for {key[:12]}")
        self.usage.requests += 1
        return {"text": reply_text(key, self.reply_bytes), "finish_reason": "stop", "model": self.endpoint.model,
                "prompt_tokens": 0, "completion_tokens": 0}

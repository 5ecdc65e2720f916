"""An endpoint as a config section: every ``EndpointConfig`` field, with a one-line doc each."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from cosa_jax.endpoint.client import EndpointConfig

# Shown by --help next to every endpoint section's keys.
FIELD_DOCS = {
    "model": "model name sent with each request (the server's served name, or a deployment)",
    "base_url": "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 ('' = api.openai.com)",
    "api_key_env": "environment variable holding the API key ('' = none needed)",
    "api_type": "openai (OpenAI, vLLM, cosa-jax) | azure",
    "api_version": "Azure API version (azure only)",
    "params": "sampling parameters sent with every request (temperature, max_tokens, ...)",
    "concurrency": "requests in flight at once",
    "rpm": "requests per minute limit (0 = none)",
    "tpm": "tokens per minute limit (0 = none)",
    "timeout_s": "seconds one request may take",
    "max_attempts": "tries per request before it counts as failed",
    "backoff_base_s": "first retry wait (doubles per retry)",
    "backoff_max_s": "longest retry wait",
    "max_retry_after_s": "longest Retry-After a server may ask for",
    "price_input_per_mtok": "USD per million prompt tokens (cost report)",
    "price_output_per_mtok": "USD per million completion tokens (cost report)",
    "http_backend": "aiohttp | httpx",
}


def endpoint_section(model: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A ConfigDict holding every EndpointConfig field at its default, then ``overrides``."""
    e = ml_collections.ConfigDict()
    for f in dataclasses.fields(EndpointConfig):
        if f.name == "params":
            e.params = ml_collections.ConfigDict()
        elif f.default is not dataclasses.MISSING:
            e[f.name] = f.default
    e.model = model
    for k, v in overrides.items():
        if k not in e:
            raise KeyError(f"endpoint_section: {k!r} is not an EndpointConfig field")
        e[k] = ml_collections.ConfigDict(v) if k == "params" else v
    return e

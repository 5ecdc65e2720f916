"""The OpenAI-compatible endpoint layer that synthesis and evaluation both run on (no JAX).

- ``client``   ``EndpointConfig`` per role, ``ChatClient`` (``async with``: retries/backoff,
               RPM/TPM limits, token and cost accounting), ``run_requests`` over a journal
- ``journal``  durable JSONL journal: a rerun never re-sends a completed request
"""

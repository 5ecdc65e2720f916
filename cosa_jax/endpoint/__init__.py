"""The OpenAI-compatible endpoint layer that synthesis and evaluation both run on (no JAX).

- ``client``   ``EndpointConfig`` per role, ``ChatClient`` (``async with``: retries/backoff,
               RPM/TPM limits, token and cost accounting), ``run_requests`` over a journal
- ``journal``  durable SQLite journal (per-key status; a rerun never re-sends a completed
               request; ``read_counts`` for progress readers)
"""

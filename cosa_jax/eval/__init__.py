"""Controllability evaluation (spec §6). Host-side: nothing here imports JAX.

- ``metrics``: CoSA-Score and companions (pure functions).
- ``datasets``: CoSAlign-Test / CoSApien loaders, shipped mild fixtures, seeded config rendering.
- ``baselines``: in-context shots, cascade decisions, message layout.
- ``pipeline``: ``evaluate(cfg)`` (generate, judge, score, report; journaled and resumable).
- ``report``: results.json / results.md / PNG plots and ``compare_report``.
"""

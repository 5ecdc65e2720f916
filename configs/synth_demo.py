"""Synthesis demo: the shipped mini prompt set through all six stages on a local endpoint.

Every role talks to an OpenAI-compatible server at 127.0.0.1:8000 (vLLM, or ours:
``python -m launch.serve --config.model=embedded:smollm2-135m-instruct``); then

    python -m launch.synthesize --config configs/synth_demo.py

Point a role elsewhere with e.g. ``--config.endpoints.judge.base_url=http://127.0.0.1:8001/v1``.
"""

from cosa_jax.synth.config import default_config


def get_config():
    c = default_config()
    c.out_dir = "runs/synth_demo"
    c.sources = [dict(kind="mini")]
    c.test_prompts = []  # e.g. ["path/to/test_prompts.jsonl"] or [dict(kind="hub", preset="cosalign_test")]
    c.min_label_group = 1  # the paper uses 10; the mini set is too small for that
    for role in ("permissive", "safe", "judge"):
        c.endpoints[role].concurrency = 16
    c.pairing.dev_fraction = 0.1
    return c

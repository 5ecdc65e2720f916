"""The paper's CoSAlign-Test evaluation: 8 configs x 400 prompts from the hub (needs network),
greedy generation up to 1,024 tokens from a served candidate, GPT-4o as the judge.

Candidate: ``python -m launch.serve --config.model=PATH --config.served_model_name=cosa`` on port 8000 (or any OpenAI-compatible server).
Judge: OpenAI (``OPENAI_API_KEY``); for Azure set ``judge.api_type='azure'``, ``judge.base_url``
and ``judge.api_version``. Baselines: ``--config.baseline.name=in_context`` with
``--config.baseline.train_pairs=<CoSAlign-Train file or microsoft/CoSAlign-Train>``,
``cascade_judge`` or ``cascade_self``.

    python -m launch.evaluate --config configs/eval_cosalign_test.py
"""

from cosa_jax.eval.config import default_config


def get_config():
    c = default_config()  # the paper's settings: GPT-4o judge, 1,024 tokens, candidate "cosa" at :8000
    c.output_dir = "runs/eval_cosalign_test"
    c.dataset.update(name="cosalign_test", source="microsoft/CoSAlign-Test")
    c.candidate.concurrency = 32
    return c

"""Evaluation demo: the shipped mild CoSAlign-Test fixture (8 configs) with small token limits.

Candidate and judge talk to an OpenAI-compatible server at 127.0.0.1:8000: serve a model
(``python -m launch.serve --model PATH``) and run it, or point them elsewhere with e.g.
``--config.judge.base_url=http://127.0.0.1:8001/v1 --config.judge.model=NAME``.
Other datasets and baselines: ``--config.dataset.name=cosapien``,
``--config.baseline.name=in_context --config.baseline.train_pairs=runs/synth_demo/pairs_jsonl/train.jsonl``.
"""

from cosa_jax.eval.pipeline import base_config


def get_config():
    c = base_config()
    c.label = "demo"
    c.output_dir = "runs/eval_demo"
    c.max_new_tokens = 96
    c.dataset.name = "cosalign_test"
    c.dataset.source = "mini"
    c.candidate.update(model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", concurrency=4)
    c.judge.update(model="judge", base_url="http://127.0.0.1:8000/v1", api_key_env="", max_tokens=256, concurrency=4)
    c.baseline.name = "none"
    c.baseline.train_pairs = "runs/synth_demo/pairs_jsonl/train.jsonl"
    return c

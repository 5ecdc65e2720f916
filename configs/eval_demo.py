"""Evaluation demo: the shipped mild CoSAlign-Test fixture (8 configs) with small token limits.

Candidate and judge are the model served as ``cosa`` at 127.0.0.1:8000 (the same model judges
itself, which only checks the plumbing; point the judge elsewhere for real scores):

    python -m launch.serve --config.model=embedded:smollm2-135m-instruct --config.served_model_name=cosa
    python -m launch.evaluate --config configs/eval_demo.py

A separate judge: ``--config.judge.base_url=http://127.0.0.1:8001/v1 --config.judge.model=NAME``.
Other datasets and baselines:

    python -m launch.evaluate --config configs/eval_demo.py --config.dataset.name=cosapien
    python -m launch.evaluate --config configs/eval_demo.py --config.baseline.name=in_context --config.baseline.train_pairs=runs/synth_demo/pairs_jsonl/train.jsonl
"""

from cosa_jax.eval.config import default_config


def get_config():
    c = default_config()
    c.label = "demo"
    c.output_dir = "runs/eval_demo"
    c.max_new_tokens = 96
    c.dataset.name = "cosalign_test"
    c.dataset.source = "mini"
    c.candidate.update(model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", concurrency=4)
    c.judge.update(model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", max_tokens=256, concurrency=4)
    c.baseline.name = "none"
    c.baseline.train_pairs = "runs/synth_demo/pairs_jsonl/train.jsonl"
    return c

"""Evaluation demo: the shipped mild CoSAlign-Test fixture (8 configs) with small token limits.

By default candidate and judge talk to the scripted test-double server (``local_server=
'scripted'``, started in-process: canned answers, not a model), so this runs offline in seconds.
To evaluate a real model, serve it (``python -m launch.serve --model PATH``) and run e.g.
``--config.local_server= --config.candidate.base_url=http://127.0.0.1:8000/v1
--config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=NAME``.
Other datasets and baselines: ``--config.dataset.name=cosapien``,
``--config.baseline.name=in_context --config.baseline.train_pairs=runs/synth_demo/pairs_jsonl/train.jsonl``.
"""

from cosa_jax.eval.pipeline import base_config


def get_config():
    c = base_config()
    c.label = "demo"
    c.output_dir = "runs/eval_demo"
    c.local_server = "scripted"
    c.scripted_judge_garbage_rate = 0.05  # exercises the invalid-judgement path
    c.max_new_tokens = 96
    c.dataset.name = "cosalign_test"
    c.dataset.source = "mini"
    c.candidate.update(model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", concurrency=4)
    c.judge.update(model="judge", base_url="http://127.0.0.1:8000/v1", api_key_env="", max_tokens=256, concurrency=4)
    c.baseline.name = "none"
    c.baseline.train_pairs = "runs/synth_demo/pairs_jsonl/train.jsonl"
    return c

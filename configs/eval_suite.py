"""The paper's whole evaluation: CoSAlign-Test (seen / unseen), CoSApien, over-refusal (XSTest),
general capability (lm-eval) and general safety (Llama-Guard-3), one report per model.

Serve each model with ``python -m launch.serve --config.model=PATH`` (one port per model), the CoSA
judge wherever ``judge`` points, and Llama-Guard-3 with vLLM on port 8001
(``vllm serve meta-llama/Llama-Guard-3-8B --port 8001``). Offline, point ``suite.safety_judge``
at our server with ``--config.suite.safety_judge.format=judge_prompt``. With network, the real
sets: ``--config.suite.over_refusal.source=walledai/XSTest``, ``--config.suite.cosalign_test.source=hub``,
``--config.suite.capability.tasks=mmlu,gsm8k``. Then
``python -m launch.evaluate --config configs/eval_suite.py``; rerunning resumes.
"""

import ml_collections

from cosa_jax.eval.suite import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/eval_suite"
    c.max_new_tokens = 512
    c.judge.update(model="gpt-4o", base_url="", api_key_env="OPENAI_API_KEY", max_tokens=512)
    c.baseline.train_pairs = "runs/synth_demo/pairs_jsonl/train.jsonl"
    endpoint = dict(kind="openai", api_key_env="", concurrency=8, timeout_s=600.0, max_attempts=4, fn=None,
                    batch_size=8)
    c.suite.models = [
        ml_collections.ConfigDict(dict(endpoint, label="llama31-8b-instruct", model="cosa",
                                       base_url="http://127.0.0.1:8000/v1", tokenizer="")),
        ml_collections.ConfigDict(dict(endpoint, label="cosalign", model="cosa",
                                       base_url="http://127.0.0.1:8002/v1", tokenizer="")),
    ]
    c.suite.baselines = ["in_context", "cascade_judge"]
    c.suite.capability.tasks = ["capability_mini"]
    return c

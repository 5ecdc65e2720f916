"""Synthesis demo: the shipped mini prompt set through all six stages on a local endpoint.

Every role talks to an OpenAI-compatible server at 127.0.0.1:8000 (``python -m launch.serve``,
vLLM...); point a role elsewhere with e.g.
``--config.endpoints.judge.base_url=http://127.0.0.1:8001/v1``.
"""

import ml_collections

from cosa_jax.taxonomy import SEEN_CATEGORIES


def _endpoint(model: str, temperature: float, max_tokens: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=model,
            base_url="http://127.0.0.1:8000/v1",
            api_key_env="",  # local servers take any key
            api_type="openai",
            params=dict(temperature=temperature, max_tokens=max_tokens),
            concurrency=16,
            rpm=0.0,
            tpm=0.0,
            timeout_s=120.0,
            max_attempts=6,
            backoff_base_s=0.5,
            backoff_max_s=10.0,
        )
    )


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/synth_demo"
    c.seed = 0
    c.progress = True
    c.allow_partial = False
    c.sources = [dict(kind="mini")]
    c.test_prompts = []  # e.g. ["path/to/test_prompts.jsonl"] or [dict(kind="hub", preset="cosalign_test")]
    c.length_filter = dict(min_exclusive=3, max=64, tokenizer="")
    c.train_categories = [cat.value for cat in SEEN_CATEGORIES]
    c.min_label_group = 1  # the paper uses 10; the mini set is too small for that
    c.max_per_label_group = 2500
    c.judge_retries = 1
    # structured_outputs: auto | vllm | openai | off (auto: vLLM's field, else OpenAI's, else free
    # text, falling back where the endpoint answers 400); rating: argmax (paper) | expected
    c.judge = ml_collections.ConfigDict(dict(structured_outputs="auto", rating="argmax"))
    c.judge_retry_temperature = 0.7
    c.endpoints = ml_collections.ConfigDict(
        dict(
            permissive=_endpoint("permissive", 1.0, 512),
            safe=_endpoint("safe", 1.0, 512),
            judge=_endpoint("judge", 0.0, 512),
        )
    )
    c.generation = dict(n_superset=4, n_not_superset=4, n_safe=1, skip_outside_train=True)
    c.score = dict(alpha=0.1, beta=3.0, gamma=1.0)
    c.pairing = dict(modes=["exact_match", "superset", "safe", "not_superset"], dev_fraction=0.1)
    return c

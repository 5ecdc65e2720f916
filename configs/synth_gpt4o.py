"""Paper-scale synthesis (spec §4): BeaverTails + WildGuardMix prompts, GPT-4o judge.

Keys come from environment variables named by ``api_key_env``. The permissive generator is any
OpenAI-compatible server (e.g. vLLM serving an uncensored instruct model); the safe generator
and judge default to OpenAI. For Azure set ``api_type='azure'``, ``base_url`` to the resource
endpoint, ``model`` to the deployment name and ``api_version``.
"""

import ml_collections

from cosa_jax.taxonomy import SEEN_CATEGORIES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/synth_cosalign"
    c.seed = 0
    c.progress = True
    c.allow_partial = False
    c.sources = [dict(kind="hub", preset="beavertails"), dict(kind="hub", preset="wildguardmix")]
    c.test_prompts = [dict(kind="hub", preset="cosalign_test")]
    c.length_filter = dict(min_exclusive=3, max=64, tokenizer="")  # set a tokenizer dir to count tokens
    c.train_categories = [cat.value for cat in SEEN_CATEGORIES]
    c.min_label_group = 10
    c.max_per_label_group = 2500
    c.judge_retries = 1
    # structured_outputs: auto | vllm | openai | off (auto: vLLM's field, else OpenAI's, else free
    # text, falling back where the endpoint answers 400); rating: argmax (paper) | expected
    c.judge = ml_collections.ConfigDict(dict(structured_outputs="auto", rating="argmax"))
    c.judge_retry_temperature = 0.7
    openai_common = dict(
        base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY", api_type="openai",
        rpm=5000.0, tpm=2_000_000.0, timeout_s=120.0, max_attempts=12, backoff_base_s=1.0, backoff_max_s=120.0,
        price_input_per_mtok=2.5, price_output_per_mtok=10.0,
    )
    c.endpoints = ml_collections.ConfigDict(
        dict(
            permissive=dict(
                model="permissive-model", base_url="http://127.0.0.1:8000/v1", api_key_env="", api_type="openai",
                params=dict(temperature=1.0, max_tokens=1024), concurrency=64, timeout_s=600.0, max_attempts=12,
            ),
            safe=dict(model="gpt-4o", params=dict(temperature=1.0, max_tokens=1024), concurrency=64, **openai_common),
            judge=dict(model="gpt-4o", params=dict(temperature=0.0, max_tokens=1024), concurrency=64, **openai_common),
        )
    )
    c.generation = dict(n_superset=4, n_not_superset=4, n_safe=1, skip_outside_train=True)
    c.score = dict(alpha=0.1, beta=3.0, gamma=1.0)
    c.pairing = dict(modes=["exact_match", "superset", "safe", "not_superset"], dev_fraction=0.023)
    return c

"""Paper-scale synthesis (spec §4): BeaverTails + WildGuardMix prompts, GPT-4o judge.

Keys come from environment variables named by ``api_key_env``. The permissive generator is any
OpenAI-compatible server (e.g. vLLM serving an uncensored instruct model); the safe generator
and judge default to OpenAI. For Azure set ``api_type='azure'``, ``base_url`` to the resource
endpoint, ``model`` to the deployment name and ``api_version``.

    python -m launch.synthesize --config configs/synth_gpt4o.py
"""

from cosa_jax.synth.config import default_config


def get_config():
    c = default_config()
    c.out_dir = "runs/synth_cosalign"
    c.sources = [dict(kind="hub", preset="beavertails"), dict(kind="hub", preset="wildguardmix")]
    c.test_prompts = [dict(kind="hub", preset="cosalign_test")]
    c.min_label_group = 10
    c.max_per_label_group = 2500
    c.endpoints.permissive.update(
        model="permissive-model", base_url="http://127.0.0.1:8000/v1", api_key_env="",
        params=dict(temperature=1.0, max_tokens=1024), concurrency=64, timeout_s=600.0, max_attempts=12,
        backoff_base_s=1.0, backoff_max_s=60.0)
    for role in ("safe", "judge"):
        c.endpoints[role].update(
            model="gpt-4o", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
            params=dict(temperature=1.0 if role == "safe" else 0.0, max_tokens=1024), concurrency=64,
            rpm=5000.0, tpm=2_000_000.0, timeout_s=120.0, max_attempts=12, backoff_base_s=1.0,
            backoff_max_s=120.0, price_input_per_mtok=2.5, price_output_per_mtok=10.0)
    c.pairing.dev_fraction = 0.023
    return c

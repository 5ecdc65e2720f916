"""The paper's CoSApien evaluation: 5 human-written scenarios x 40 prompts from the hub (needs
network); helpfulness and compliance judged by GPT-4o. The in-context baseline uses the shipped
hand-written shots (``baseline.shots='mini'``) unless pointed at another shots file.

    python -m launch.evaluate --config configs/eval_cosapien.py
"""

from cosa_jax.eval.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/eval_cosapien"
    c.max_new_tokens = 1024
    c.dataset.name = "cosapien"
    c.dataset.source = "microsoft/CoSApien"
    c.candidate.update(model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", concurrency=32)
    c.judge.update(model="gpt-4o", base_url="", api_key_env="OPENAI_API_KEY", max_tokens=1024, concurrency=16)
    c.baseline.name = "none"
    c.baseline.k = 5
    c.baseline.shots = "mini"
    return c

"""Judge agreement: every judge kind scored against the shipped labelled set.

``python -m launch.judge_agreement --config configs/judge_agreement.py`` asks the embedded model
in-process; an endpoint instead: ``--config.judge.kind=openai --config.judge.model=NAME
--config.judge.base_url=http://127.0.0.1:8000/v1`` (vLLM, ``launch.serve``, OpenAI with
``--config.judge.api_key_env=OPENAI_API_KEY``). Writes ``agreement.json`` and ``agreement.md``
under ``output_dir``.
"""

import ml_collections

from cosa_jax.eval.config import default_config as base_config


def get_config():
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/judge_agreement"
    c.data = "bundled:judge_agreement.jsonl"   # or a path to a JSONL file with the same fields
    c.kinds = "prompt_risk,response_risk,addressed,helpfulness,compliance"
    c.model = "embedded:smollm2-135m-instruct"  # the in-process judge (judge.kind="callable")
    c.progress = True
    c.judge = base_config().judge
    c.judge.update(kind="callable", model="embedded-smollm2", max_tokens=128)
    return c

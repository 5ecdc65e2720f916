"""`make demo`: the whole CoSAlign pipeline, offline, on the embedded SmolLM2-135M-Instruct.

answers (greedy, KV cache) -> serve the model locally -> synthesize a small preference set
through that server -> SFT -> DPO -> evaluate base and trained models on the mini
CoSAlign-Test configs -> table + report. Sized for a 2-core CPU; every size is a key below.

The judge is the embedded 135M model unless an endpoint is configured: set OPENAI_API_KEY
(judge.model defaults to gpt-4o), or --config.judge.base_url=http://host:port/v1.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/demo"
    c.model = "embedded:smollm2-135m-instruct"
    c.seed = 0
    c.stages = "answers,synth,sft,dpo,eval,agreement"

    c.judge = ml_collections.ConfigDict(dict(
        base_url="",                 # "" + no OPENAI_API_KEY: the embedded model judges
        model="gpt-4o",
        api_key_env="OPENAI_API_KEY",
        max_tokens=128,
        structured_outputs="auto",   # auto | vllm | openai | off: judges ask for their schema
        rating="argmax",             # argmax (paper) | expected (log-prob-weighted over 0..5)
    ))

    c.synth = ml_collections.ConfigDict(dict(
        prompts=4,                   # first N shipped mini prompts
        n_superset=1, n_not_superset=1, n_safe=1,
        max_tokens=48,
        timeout_s=1800.0,            # per request to the local server (a shared CPU can be slow)
    ))

    c.train = ml_collections.ConfigDict(dict(
        sft_steps=4, dpo_steps=8, batch_size=4, lr_sft=1e-5, lr_dpo=1e-5, warmup_steps=1,
        max_length=256, max_prompt_length=192,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        dataset="cosalign_test", limit_per_config=5, max_new_tokens=48,
    ))
    return c

"""`make demo`: the whole CoSAlign pipeline, offline, on the embedded SmolLM2-135M-Instruct.

answers (greedy, KV cache) -> serve the model locally -> synthesize a small preference set
through that server -> SFT -> DPO -> evaluate base and trained models on the mini
CoSAlign-Test configs -> table + report. Sized for a 2-core CPU; every size is a key below.
Each stage's config is its pipeline's own default_config() with the demo's sizes; the demo
fills in only what follows from the run (output dirs, the server URL, the model of each stage).

    python -m launch.demo --config configs/demo_pipeline.py

The judge is the embedded 135M model unless an endpoint is configured: set OPENAI_API_KEY
(judge.model defaults to gpt-4o), or --config.judge.base_url=http://host:port/v1.
"""

import ml_collections

from cosa_jax.eval.config import default_config as eval_config
from cosa_jax.synth.config import default_config as synth_config
from cosa_jax.train.config import default_config as train_config


def _train(mode: str, steps: int):
    t = train_config()
    t.model.compute_dtype = "float32"
    t.data.train = "bundled:mini_prefs.jsonl"  # the demo adds the synthesized pairs to these
    t.data.eval = "bundled:mini_prefs_dev.jsonl"
    t.data.eval_pairs = 8
    t.data.max_length = 256
    t.data.max_prompt_length = 192
    t.train.mode = mode
    t.train.max_steps = steps
    t.train.batch_size = 4
    t.train.grad_accum = 1
    t.train.lr = 1e-5
    t.train.warmup_steps = 1
    t.mesh.shape = (1, 1, 1)
    t.checkpoint.every = max(1, steps // 2)
    return t


def get_config():
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/demo"  # every stage writes under this directory
    c.model = "embedded:smollm2-135m-instruct"  # the base model (answers, synthesis, SFT start)
    c.seed = 0  # passed to every stage
    c.stages = "answers,synth,sft,dpo,eval,agreement"  # stages to run, in this order
    c.train_pairs = 32  # SFT/DPO data: the synthesized pairs, topped up with shipped ones to this many

    c.judge = ml_collections.ConfigDict(dict(
        base_url="",                 # "" + no OPENAI_API_KEY: the embedded model judges
        model="gpt-4o",
        api_key_env="OPENAI_API_KEY",
        max_tokens=128,
        structured_outputs="auto",   # auto | vllm | openai | off: judges ask for their schema
        rating="argmax",             # argmax (paper) | expected (log-prob-weighted over 0..5)
        calibration="auto",          # auto: content_free for the embedded judge, off (the paper's argmax) for an endpoint
    ))

    s = synth_config()  # synthesis through the local server (launch.synthesize's keys)
    s.sources = [dict(kind="mini", limit=12)]  # first 12 shipped mini prompts
    s.allow_partial = True
    s.min_label_group = 1
    s.generation.n_superset = 1
    s.generation.n_not_superset = 1
    s.generation.n_safe = 1
    s.pairing.dev_fraction = 0.1
    for role in ("permissive", "safe", "judge"):
        s.endpoints[role].model = "smollm2"
        s.endpoints[role].params.max_tokens = 48 if role != "judge" else 128
        s.endpoints[role].timeout_s = 1800.0  # per request to the local server (a shared CPU can be slow)
    c.synth = s

    c.sft = _train("sft", 4)  # SFT on the chosen responses (launch.train's keys)
    c.dpo = _train("dpo", 8)  # DPO from the SFT model (launch.train's keys)

    e = eval_config()  # CoSA-Score of base and trained models (launch.evaluate's keys)
    e.max_new_tokens = 48
    e.dataset.name = "cosalign_test"
    e.dataset.source = "mini"
    e.dataset.limit_per_config = 5
    e.candidate.kind = "callable"
    e.judge.max_tokens = 128
    c.eval = e
    return c

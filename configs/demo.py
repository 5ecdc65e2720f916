"""Demo: DPO on the embedded SmolLM2-135M-Instruct with the bundled mini pairs, on CPU.

Larger lr and tiny batches so that a few minutes of CPU show the rewards separating; the
paper recipe is configs/cosalign_llama31_8b_dpo.py. ``--config.train.mode=sft`` for SFT.

    python -m launch.train --config configs/demo.py
"""

from cosa_jax.train.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/demo_dpo"
    c.model.path = "embedded:smollm2-135m-instruct"
    c.model.compute_dtype = "float32"
    c.data.train = "bundled:mini_prefs.jsonl"
    c.data.eval = "bundled:mini_prefs_dev.jsonl"
    c.data.eval_pairs = 8
    c.data.max_length = 256
    c.data.max_prompt_length = 192
    c.train.mode = "dpo"
    c.train.max_steps = 12
    c.train.batch_size = 4
    c.train.grad_accum = 1
    c.train.lr = 2e-5
    c.train.warmup_steps = 2
    c.dpo.share_prompt = True
    c.train.save_logits = True
    c.checkpoint.every = 4
    return c

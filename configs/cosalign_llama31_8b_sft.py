"""CoSAlign stage 1: SFT of Llama-3.1-8B-Instruct on the chosen responses (4 GPUs, FSDP).

One target per unique (system, prompt): the chosen response of the last pair seen for it.
    python -m launch.train --config configs/cosalign_llama31_8b_sft.py \\
        --config.model.path=/path/to/Meta-Llama-3.1-8B-Instruct
"""

from cosa_jax.train.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/cosalign_llama31_8b_sft"
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"  # or a local snapshot directory
    c.model.param_dtype = "float32"      # fp32 master weights; "bfloat16" = the reference's mode
    c.model.compute_dtype = "bfloat16"
    c.model.attention_impl = "cudnn"     # "xla" on TPU / CPU
    # Unrolled layers: scanned, XLA:GPU copied each layer's weights out of (and residuals into)
    # the stacked buffers every step (bench/results/h200_2026-11-30/). Costs a longer compile.
    c.model.scan_layers = False
    c.data.train = "microsoft/CoSAlign-Train"
    c.data.eval = "microsoft/CoSAlign-Train"
    c.data.eval_split = "dev"
    c.data.eval_pairs = 256
    c.data.truncation = "reference"      # 640 / 512, responses cut to 128 when too long
    c.train.mode = "sft"
    c.train.epochs = 3
    c.train.batch_size = 32
    c.train.grad_accum = 4               # 8 sequences per micro-batch = 2 per GPU
    c.train.lr = 5e-7
    c.train.warmup_steps = 150
    c.train.clip_norm = 10.0
    c.train.eval_every = 156             # ~5k examples
    c.mesh.shape = (1, 4, 1)             # data, fsdp, tensor
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    return c

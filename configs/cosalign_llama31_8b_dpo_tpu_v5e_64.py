"""The DPO recipe on a TPU v5e-64 pod slice: same code, other mesh sizes.

Launch on every host of the slice (see launch/tpu_pod.sh); jax.distributed.initialize() runs by
itself on TPU pods. 64 chips: data 4 x fsdp 16; global batch 64 pairs, no accumulation.

    python -m launch.train --config configs/cosalign_llama31_8b_dpo_tpu_v5e_64.py
"""

from configs.cosalign_llama31_8b_dpo import get_config as gpu_config


def get_config():
    c = gpu_config()
    c.output_dir = "gs://YOUR_BUCKET/cosalign_llama31_8b_dpo_v5e64"
    c.checkpoint.dir = "gs://YOUR_BUCKET/cosalign_llama31_8b_dpo_v5e64/checkpoints"
    c.model.attention_impl = "xla"
    c.model.remat = "dots_with_no_batch_dims"   # v5e has 16 GiB HBM per chip
    c.mesh.shape = (4, 16, 1)
    c.train.batch_size = 64
    c.train.grad_accum = 1
    c.distributed.initialize = "yes"
    return c

"""The CoSAlign DPO recipe on ONE 141 GB GPU (H200): same objective and batch, leaner memory.

The 4-GPU recipe shards 8B of fp32 weights, RMSprop moments and gradients four ways. On one
device the resident set would be fp32 weights 32 GB + moments 32 GB + fp32 gradients 32 GB +
bf16 reference 16 GB + the bf16 layer copy and its gradients, over 141 GB before activations.
Here: gradients and their accumulator in bf16 (-16 GB), reference log-probs computed once and
read from disk (-16 GB, no reference weights resident), 16 micro-batches of 2 pairs (the
recipe's 32 pairs a step). launch.train prints the compiled step's memory plan first and stops,
naming what to change, if it still does not fit (e.g. model.remat='dots_with_no_batch_dims').
XLA:CPU's estimate under each setting: bench/results/memory_plan_8b_cpu.txt.
    python -m launch.train --config configs/cosalign_llama31_8b_dpo_1gpu.py \\
        --config.model.path=runs/cosalign_llama31_8b_sft/hf
"""

from configs.cosalign_llama31_8b_dpo import get_config as dpo_config


def get_config():
    c = dpo_config()
    c.output_dir = "runs/cosalign_llama31_8b_dpo_1gpu"
    c.mesh.shape = (1, 1, 1)
    c.train.batch_size = 32
    c.train.grad_accum = 16              # 2 pairs per micro-batch, as on each of the 4 GPUs
    c.train.grad_dtype = "bfloat16"
    c.dpo.precompute_ref = True
    c.model.remat = "none"               # the recipe's; "dots_with_no_batch_dims" if the plan says so
    return c

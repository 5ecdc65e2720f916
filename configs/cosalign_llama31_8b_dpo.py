"""CoSAlign stage 2: DPO (beta 0.1) on CoSAlign-Train pairs, the paper recipe on 4 GPUs.

Reference model = the frozen starting checkpoint of this stage (the SFT export, or the
instruct model for the no-SFT variant).
    python -m launch.train --config configs/cosalign_llama31_8b_dpo.py \\
        --config.model.path=runs/cosalign_llama31_8b_sft/hf
"""

from configs.cosalign_llama31_8b_sft import get_config as sft_config


def get_config():
    c = sft_config()
    c.output_dir = "runs/cosalign_llama31_8b_dpo"
    c.model.path = "runs/cosalign_llama31_8b_sft/hf"
    c.train.mode = "dpo"
    c.train.epochs = 3
    c.train.batch_size = 32              # pairs; 2 pairs per GPU per micro-batch
    c.train.grad_accum = 4
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.dpo.label_smoothing = 0.0
    c.dpo.precompute_ref = False         # True: reference log-probs once, cached on disk
    c.dpo.share_prompt = True            # one row per pair: the (up to 512-token) prompt runs once
    c.train.save_logits = True           # no vocab matmul recompute; holds 2 rows x 256 window x
                                         # 128256 x fp32 = 0.26 GB per GPU
    return c

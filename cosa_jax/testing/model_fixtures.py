"""Tiny random Llama-3.1-style checkpoints written by transformers itself (the reference)."""

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

TINY_LLAMA31 = dict(
    vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=8, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    # Llama-3.1 rope: theta 5e5 and llama3 scaling; original_max_position_embeddings is small so
    # the scaled, blended and unscaled frequency bands all occur with head_dim 8.
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
)


def make_hf_model(out_dir: Path, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random HF Llama saved as safetensors in ``out_dir`` (weights scaled up from init so
    that layers actually mix: HF's 0.02 init makes a 3-layer model nearly the identity)."""
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(**{**TINY_LLAMA31, **overrides})
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def make_loaded_model(out_dir: Path, **overrides):
    """``make_hf_model`` and the same checkpoint as cosa_jax loads it: (hf model, params, cfg)."""
    from cosa_jax.models import load_hf

    hf = make_hf_model(out_dir, **overrides)
    model, cfg = load_hf(out_dir)
    return hf, model.params(), cfg


def right_padded_batch(vocab: int, lengths, seed: int = 0, pad_id: int = 0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.float().numpy()


def make_tiny_chat_model(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama that speaks the embedded SmolLM2 tokenizer (vocab 49,152), so the
    whole training pipeline (chat template, tokenisation, export) runs in seconds."""
    import shutil

    from cosa_jax.models import EMBEDDED_MODEL, resolve_model_dir
    src = resolve_model_dir(EMBEDDED_MODEL)
    make_hf_model(out_dir, seed=seed, vocab_size=49152, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out_dir / name)
    return out_dir

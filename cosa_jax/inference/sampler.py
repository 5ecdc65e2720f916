"""Batched generation with a KV cache: one compiled program per shape bucket.

Prefill and the whole decode loop (a ``lax.while_loop`` that exits once every row has hit an
end-of-sequence token) run inside one ``jax.jit``, so there is no Python dispatch per token and
no recompilation per token. Shapes are bucketed (batch to a power of two, prompt length to a
multiple of 64, new tokens to a multiple of 32) so a server sees few distinct programs.
Greedy rows (temperature 0) and sampled rows (temperature / top-k / top-p) mix in one batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.llama import Params, forward, forward_hidden, init_cache, unembed


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names); temperature 0 means greedy."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = no top-k cut
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str        # "stop" (eos or stop string) or "length"
    prompt_tokens: int


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucketed_lengths(prompt_lens: Sequence[int], max_new_tokens: Sequence[int]) -> tuple[int, int]:
    """(prompt bucket, new-token bucket): the shapes ``generate`` compiles for; the KV cache
    holds their sum."""
    return _round_up(max(prompt_lens), 64), _round_up(max(max_new_tokens), 32)


def _bucket_batch(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def select_tokens(logits_bv, temperature_b, top_p_b, top_k_b, key, *, any_sampling: bool):
    """Greedy where temperature == 0, otherwise temperature + top-k + top-p sampling."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if not any_sampling:
        return greedy_b
    vocab = logits_bv.shape[-1]
    scaled = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k_b - 1)[:, None], axis=-1)
    probs_sorted = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = (mass_before < top_p_b[:, None]) & (sorted_desc >= kth)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled_b = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(temperature_b > 0, sampled_b, greedy_b)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "cache_len", "any_sampling"))
def _generate_program(params, ids_bt, mask_bt, temperature_b, top_p_b, top_k_b, seeds_b,
                      eos_ids, pad_id, *, cfg: LlamaConfig, max_new: int, cache_len: int,
                      any_sampling: bool):
    b = ids_bt.shape[0]
    cache = init_cache(cfg, b, cache_len)
    hidden_btd, cache = forward_hidden(params, cfg, ids_bt, mask_bt, cache=cache)
    last_b = jnp.maximum(mask_bt.sum(axis=1) - 1, 0)
    logits_bv = unembed(params, cfg, hidden_btd[jnp.arange(b), last_b][:, None])[:, 0]
    keys_b = jax.vmap(jax.random.key)(seeds_b)

    def pick(logits, step):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
        # One independent stream per row, so a row's sample does not depend on its batch mates.
        return jax.vmap(lambda lg, t, p, k, key: select_tokens(
            lg[None], t[None], p[None], k[None], key, any_sampling=any_sampling)[0])(
            logits, temperature_b, top_p_b, top_k_b, step_keys)

    tok_b = pick(logits_bv, 0)
    done_b = jnp.isin(tok_b, eos_ids)
    out_bn = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok_b)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out = state
        logits, cache = forward(params, cfg, tok[:, None], jnp.ones((b, 1), bool), cache=cache)
        new = jnp.where(done, pad_id, pick(logits[:, 0], step))
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
        return step + 1, new, cache, done | jnp.isin(new, eos_ids), out

    _, _, _, _, out_bn = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_b, cache, done_b, out_bn))
    return out_bn


def generate(params: Params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             *, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
             tokenizer=None) -> list[Completion]:
    """Generate for a batch of token-id prompts; returns one Completion per prompt.

    With a tokenizer, completions carry text, and stop strings cut the text (and tokens).
    """
    if not prompts:
        return []
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} sampling settings for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    eos = list(eos_ids if eos_ids is not None else cfg.eos_token_id)
    if not eos:
        raise ValueError("no end-of-sequence id: pass eos_ids (config.json has no eos_token_id)")
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos[0])

    n = len(prompts)
    batch = _bucket_batch(n)
    prompt_len, max_new = bucketed_lengths([len(p) for p in prompts],
                                           [s.max_new_tokens for s in per_row])
    if prompt_len + max_new > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len}) + new tokens ({max_new}) exceed the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    ids = np.full((batch, prompt_len), pad, np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = True
    mask[n:, 0] = True  # filler rows: one token so they are well-formed
    rows = per_row + [per_row[0]] * (batch - n)
    out = _generate_program(
        params, jnp.asarray(ids), jnp.asarray(mask),
        jnp.asarray([s.temperature for s in rows], jnp.float32),
        jnp.asarray([s.top_p for s in rows], jnp.float32),
        jnp.asarray([s.top_k for s in rows], jnp.int32),
        jnp.asarray([s.seed for s in rows], jnp.uint32),
        jnp.asarray(eos, jnp.int32), jnp.int32(pad),
        cfg=cfg, max_new=max_new, cache_len=prompt_len + max_new,
        any_sampling=any(s.temperature > 0 for s in rows))
    out = np.asarray(out)
    results = []
    eos_set = set(eos)
    for i in range(n):
        limit = per_row[i].max_new_tokens
        toks = out[i, :limit].tolist()
        finish = "length"
        for j, t in enumerate(toks):
            if t in eos_set:
                toks, finish = toks[:j + 1], "stop"
                break
        text = None
        if tokenizer is not None:
            text = tokenizer.decode([t for t in toks if t not in eos_set], skip_special_tokens=True)
            for stop in per_row[i].stop:
                cut = text.find(stop)
                if stop and cut >= 0:
                    text, finish = text[:cut], "stop"
                    toks = tokenizer.encode(text, add_special_tokens=False)
        results.append(Completion(toks, text, finish, len(prompts[i])))
    return results

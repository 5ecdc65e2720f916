"""Batched generation with a KV cache: compiled programs per shape bucket.

Two decode loops, one result. "fused": prefill and the whole decode (a ``lax.while_loop`` that
exits once every row has hit an end-of-sequence token) in one ``jax.jit``, no Python per token.
"stepped": a jitted prefill, then per token a jitted select and a jitted one-token decode step
with the cache donated; the host sees each token. Constrained rows
(``cosa_jax.inference.constraints``) need the stepped loop, as the grammar matcher runs on the
host: the select masks logits to -inf with a packed [B, V/32] bitmask on device, only the mask
goes in and the token ids come out, and the decode step is dispatched before the host waits for
the ids, so the matchers compute the next mask while the device runs the forward. Free rows in
such a batch get an all-ones mask and decode exactly as they would alone. ``generate`` steps on
CPU and fuses elsewhere unless told (see its ``loop`` argument).

Shapes are bucketed (batch to a power of two, prompt length to 16, 32 or a multiple of 64, new
tokens to a multiple of 32) so a server sees few distinct programs. Greedy rows (temperature 0)
and sampled rows (temperature / top-k / top-p) mix in one batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosa_jax.inference.constraints import (ConstraintCompiler, OutputConstraint, fill_bitmasks,
                                            new_bitmask)
from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.llama import (Params, _write_rows, apply_rope, dense, forward_hidden,
                                   init_cache, rms_norm, rope_inv_freq, rope_tables, swiglu,
                                   unembed)


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
    longest = max(prompt_lens)
    # Short prompts get 16 / 32 / 64: a 64-slot bucket doubled a 32-token prompt's prefill.
    prompt_bucket = _round_up(longest, 64) if longest > 32 else max(16, 1 << math.ceil(math.log2(longest)))
    return prompt_bucket, _round_up(max(max_new_tokens), 32)


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


def _pick(logits_bv, temperature_b, top_p_b, top_k_b, keys_b, step, *, any_sampling: bool):
    """One token per row; row i draws from ``fold_in(key_i, step)``, so a row's sample does not
    depend on its batch mates or on which path (fused or stepped) decodes it."""
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
    return jax.vmap(lambda lg, t, p, k, key: select_tokens(
        lg[None], t[None], p[None], k[None], key, any_sampling=any_sampling)[0])(
        logits_bv, temperature_b, top_p_b, top_k_b, step_keys)


def apply_bitmask(logits_bv: jax.Array, bitmask_bw: jax.Array) -> jax.Array:
    """-inf where bit v of row b's packed int32 mask is 0 (bit v of word v // 32, LSB first)."""
    b, vocab = logits_bv.shape
    bits = (bitmask_bw[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(b, -1)[:, :vocab].astype(bool)
    return jnp.where(allowed, logits_bv, -jnp.inf)


class LayerCache(NamedTuple):
    """The decode loop's KV cache: one K and one V buffer per layer instead of ``KVCache``'s
    stacked [l, b, s, k, h] arrays, so a step writes each layer's new slot in place and reads
    the layer's keys without slicing them out of the stack. Keys are stored [b, k, h, s] and
    values [b, k, s, h]: the layouts the two attention products read, so no step transposes
    the cache (XLA:CPU copied a transposed [b, k, h, s] key tensor per layer per step)."""
    k: tuple[jax.Array, ...]   # [b, k, h, s] per layer
    v: tuple[jax.Array, ...]   # [b, k, s, h] per layer
    valid_bs: jax.Array
    end_b: jax.Array


def _unstack_layers(params: Params) -> tuple[Params, tuple[Params, ...]]:
    """(embedding/norm/head, one weight dict per layer). Why: XLA:CPU's library dots take whole
    buffers, so a layer loop over the stacked [l, ...] weights copied every layer's weights out
    of the stack on every decode step, about as many bytes again as the matmuls read."""
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return rest, tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n))


def _prefill(params, cfg: LlamaConfig, ids_bt, mask_bt, cache_len: int):
    """Logits [b, v] at each row's last prompt token and the per-layer cache."""
    b = ids_bt.shape[0]
    hidden_btd, cache = forward_hidden(params, cfg, ids_bt, mask_bt,
                                       cache=init_cache(cfg, b, cache_len))
    last_b = jnp.maximum(mask_bt.sum(axis=1) - 1, 0)
    logits_bv = unembed(params, cfg, hidden_btd[jnp.arange(b), last_b][:, None])[:, 0]
    split = LayerCache(tuple(cache.k_lbskh[i].transpose(0, 2, 3, 1) for i in range(cfg.num_layers)),
                       tuple(cache.v_lbskh[i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
                       cache.valid_bs, cache.end_b)
    return logits_bv, split


def _decode_layer(x_bd, w, cfg: LlamaConfig, cos_bh, sin_bh, valid_bs, k_bkhs, v_bksh, start_b):
    """``llama.decoder_layer`` for one new token per row against this module's cache layout."""
    cdt = x_bd.dtype
    b, d = x_bd.shape
    n, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = {name: value.astype(cdt) for name, value in w.items()}
    h_bd = rms_norm(x_bd, w["input_norm"], cfg.rms_norm_eps)
    q = dense(h_bd, w["q_proj"].reshape(d, n * hd)).reshape(b, 1, n, hd)
    k = dense(h_bd, w["k_proj"].reshape(d, kv * hd)).reshape(b, 1, kv, hd)
    v = dense(h_bd, w["v_proj"].reshape(d, kv * hd)).reshape(b, kv, 1, hd)
    q = apply_rope(q, cos_bh[:, None], sin_bh[:, None]).reshape(b, kv, n // kv, hd)
    k = apply_rope(k, cos_bh[:, None], sin_bh[:, None]).reshape(b, kv, hd, 1)
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=-1))
    k_bkhs = write(k_bkhs, k.astype(k_bkhs.dtype), start_b)
    v_bksh = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))(
        v_bksh, v.astype(v_bksh.dtype), start_b)
    scores_bkgs = jnp.matmul(q, k_bkhs.astype(cdt), preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores_bkgs = jnp.where(valid_bs[:, None, None, :], scores_bkgs, jnp.finfo(jnp.float32).min)
    probs_bkgs = jax.nn.softmax(scores_bkgs, axis=-1).astype(cdt)
    a_bd = jnp.matmul(probs_bkgs, v_bksh.astype(cdt)).reshape(b, n * hd)
    x_bd = x_bd + dense(a_bd, w["o_proj"].reshape(n * hd, d))
    h_bd = rms_norm(x_bd, w["post_attn_norm"], cfg.rms_norm_eps)
    return x_bd + swiglu(h_bd, w["gate_proj"], w["up_proj"], w["down_proj"]), k_bkhs, v_bksh


def _decode_forward(rest, layers, cfg: LlamaConfig, cache: LayerCache, tok_b):
    """One new token per row through the unrolled layers: float32 logits [b, v] and the cache.
    The same math as ``llama.forward`` with a cache (row b writes slot ``end_b[b]``, which is
    also its position, and sees the valid slots up to it)."""
    b = tok_b.shape[0]
    start_b = cache.end_b
    valid_bs = _write_rows(cache.valid_bs, jnp.ones((b, 1), bool), start_b)
    visible_bs = valid_bs & (jnp.arange(valid_bs.shape[1], dtype=jnp.int32)[None] <= start_b[:, None])
    x_bd = jnp.take(rest["embed_tokens"], tok_b, axis=0).astype(cfg.compute_dtype)
    cos_bth, sin_bth = rope_tables(start_b[:, None], rope_inv_freq(cfg))
    ks, vs = list(cache.k), list(cache.v)
    for i, layer in enumerate(layers):
        x_bd, ks[i], vs[i] = _decode_layer(x_bd, layer, cfg, cos_bth[:, 0], sin_bth[:, 0],
                                           visible_bs, ks[i], vs[i], start_b)
    x_bd = rms_norm(x_bd, rest["norm"], cfg.rms_norm_eps)
    logits_bv = unembed(rest, cfg, x_bd[:, None])[:, 0]
    return logits_bv, LayerCache(tuple(ks), tuple(vs), valid_bs, start_b + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill_program(params, ids_bt, mask_bt, *, cfg: LlamaConfig, cache_len: int):
    return _prefill(params, cfg, ids_bt, mask_bt, cache_len)


_unstack_program = jax.jit(_unstack_layers)


@functools.partial(jax.jit, static_argnames=("any_sampling",))
def _select_program(logits_bv, bitmask_bw, temperature_b, top_p_b, top_k_b, seeds_b, step, *,
                    any_sampling: bool):
    keys_b = jax.vmap(jax.random.key)(seeds_b)
    if bitmask_bw is not None:
        logits_bv = apply_bitmask(logits_bv, bitmask_bw)
    return _pick(logits_bv, temperature_b, top_p_b, top_k_b, keys_b,
                 step, any_sampling=any_sampling)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_program(rest, layers, cache: LayerCache, tok_b, *, cfg: LlamaConfig):
    return _decode_forward(rest, layers, cfg, cache, tok_b)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "cache_len", "any_sampling"))
def _generate_program(params, ids_bt, mask_bt, temperature_b, top_p_b, top_k_b, seeds_b,
                      eos_ids, pad_id, *, cfg: LlamaConfig, max_new: int, cache_len: int,
                      any_sampling: bool):
    b = ids_bt.shape[0]
    logits_bv, cache = _prefill(params, cfg, ids_bt, mask_bt, cache_len)
    rest, layers = _unstack_layers(params)
    keys_b = jax.vmap(jax.random.key)(seeds_b)

    def pick(logits, step):
        return _pick(logits, temperature_b, top_p_b, top_k_b, keys_b, step,
                     any_sampling=any_sampling)

    tok_b = pick(logits_bv, 0)
    done_b = jnp.isin(tok_b, eos_ids)
    out_bn = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok_b)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out = state
        logits, cache = _decode_forward(rest, layers, cfg, cache, tok)
        new = jnp.where(done, pad_id, pick(logits, step))
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
        return step + 1, new, cache, done | jnp.isin(new, eos_ids), out

    _, _, _, _, out_bn = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_b, cache, done_b, out_bn))
    return out_bn


def generate(params: Params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             *, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
             tokenizer=None,
             constraints: Sequence[OutputConstraint | None] | None = None,
             loop: str = "auto") -> list[Completion]:
    """Generate for a batch of token-id prompts; returns one Completion per prompt.

    With a tokenizer, completions carry text, and stop strings cut the text (and tokens).
    ``constraints`` (one per prompt, None = free) restrict rows to a choice, regex, JSON schema
    or grammar; they need the tokenizer. A constrained row that has not ended its grammar
    by ``max_new_tokens`` finishes with "length".

    ``loop``: "fused" runs the whole decode in one while_loop program, "stepped" one jitted
    program per token (needed for constraints). "auto" steps on CPU as well: there XLA ran the
    fused loop's body slower than the same step as its own program with a donated cache
    (``bench/generate.py`` compares them), and fuses on accelerators, where a host round trip
    per token costs more.
    """
    if not prompts:
        return []
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} sampling settings for {len(prompts)} prompts")
    row_constraints = list(constraints) if constraints is not None else [None] * len(prompts)
    if len(row_constraints) != len(prompts):
        raise ValueError(f"{len(row_constraints)} constraints for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    eos = list(eos_ids if eos_ids is not None else cfg.eos_token_id)
    if not eos:
        raise ValueError("no end-of-sequence id: pass eos_ids (config.json has no eos_token_id)")
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos[0])
    constrained = any(c is not None for c in row_constraints)
    if constrained and tokenizer is None:
        raise ValueError("constraints need the tokenizer (pass tokenizer=)")

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
    row_args = (jnp.asarray([s.temperature for s in rows], jnp.float32),
                jnp.asarray([s.top_p for s in rows], jnp.float32),
                jnp.asarray([s.top_k for s in rows], jnp.int32),
                jnp.asarray([s.seed for s in rows], jnp.uint32))
    any_sampling = any(s.temperature > 0 for s in rows)
    if loop not in ("auto", "stepped", "fused"):
        raise ValueError(f"loop={loop!r}; expected 'auto', 'stepped' or 'fused'")
    if constrained and loop == "fused":
        raise ValueError("constrained rows need the stepped loop (the matcher runs on the host)")
    if loop == "auto":
        loop = "stepped" if constrained or jax.default_backend() == "cpu" else "fused"
    if loop == "stepped":
        compiler = (ConstraintCompiler.for_tokenizer(tokenizer, vocab_size=cfg.vocab_size,
                                                     eos_ids=eos) if constrained else None)
        out = _generate_stepped(params, cfg, ids, mask, row_args, row_constraints, compiler,
                                [s.max_new_tokens for s in per_row], eos, pad,
                                max_new=max_new, any_sampling=any_sampling)
    else:
        out = np.asarray(_generate_program(
            params, jnp.asarray(ids), jnp.asarray(mask), *row_args,
            jnp.asarray(eos, jnp.int32), jnp.int32(pad),
            cfg=cfg, max_new=max_new, cache_len=prompt_len + max_new, any_sampling=any_sampling))
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


def _generate_stepped(params, cfg, ids, mask, row_args, row_constraints, compiler,
                      row_max_new, eos, pad, *, max_new, any_sampling):
    """The host-stepped decode loop (any batch; the only one for constrained rows): token ids
    [B, max_new]. A batch without constraints sends no mask."""
    batch = ids.shape[0]
    n = len(row_constraints)
    states = [compiler.start(c) if c is not None else None for c in row_constraints]
    states += [None] * (batch - n)
    limits = np.asarray(list(row_max_new) + [1] * (batch - n))
    eos_set = set(eos)
    out = np.full((batch, max_new), pad, np.int32)
    done = np.zeros(batch, bool)
    constrained = any(st is not None for st in states)
    bitmask = new_bitmask(batch, cfg.vocab_size) if constrained else None
    logits, cache = _prefill_program(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg,
                                     cache_len=ids.shape[1] + max_new)
    rest, layers = _unstack_program(params)
    if constrained:
        fill_bitmasks(states, bitmask, compiler)
    last = int(limits.max())
    for step in range(last):
        tok_dev = _select_program(logits, None if bitmask is None else jnp.asarray(bitmask),
                                  *row_args, jnp.int32(step),
                                  any_sampling=any_sampling)
        if step + 1 < last:
            # Dispatched before the host blocks on the ids: the forward runs while the
            # matchers accept this token and compute the next mask.
            logits, cache = _decode_program(rest, layers, cache, tok_dev, cfg=cfg)
        tok = np.asarray(tok_dev)
        for i in np.flatnonzero(~done):
            t = int(tok[i])
            out[i, step] = t
            if states[i] is not None:
                states[i].accept(t)
            if t in eos_set or step + 1 >= limits[i]:
                done[i] = True
                states[i] = None
        if done.all():
            break
        if constrained:
            fill_bitmasks(states, bitmask, compiler)
    return out

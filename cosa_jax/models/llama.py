"""Llama-3.x decoder: pure functions over a params pytree, and a thin Flax NNX wrapper.

Axis letters: b batch, t query positions, s key slots, d model, n query heads, k kv heads,
h head dim, f MLP hidden, v vocab, l layers.

Params pytree (layer weights stacked on a leading ``l`` axis, so the layer loop is one
``lax.scan``: compile time does not grow with depth)::

    embed_tokens [v, d]          norm [d]            lm_head [d, v]  (absent when tied)
    layers/input_norm [l, d]     layers/post_attn_norm [l, d]
    layers/q_proj [l, d, n, h]   layers/k_proj [l, d, k, h]   layers/v_proj [l, d, k, h]
    layers/o_proj [l, n, h, d]   layers/gate_proj [l, d, f]   layers/up_proj [l, d, f]
    layers/down_proj [l, f, d]

Dtype policy: weights are stored in ``config.param_dtype`` and cast to ``config.compute_dtype``
where used; RMSNorm statistics, RoPE tables, attention softmax and logits are float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cosa_jax.models.config import LlamaConfig

Params = dict


class KVCache(NamedTuple):
    """Per-layer keys/values in slots; rows write at their own ``end`` (right-padded batches)."""
    k_lbskh: jax.Array
    v_lbskh: jax.Array
    valid_bs: jax.Array   # bool: slot holds a real token
    end_b: jax.Array      # int32: next slot to write (= number of real tokens so far)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((batch,), jnp.int32))


# ---------------------------------------------------------------------------- building blocks
def rms_norm(x_btd: jax.Array, w_d: jax.Array, eps: float) -> jax.Array:
    """Statistics in float32, result back in the input dtype, then the learned scale."""
    x32 = x_btd.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w_d.astype(x_btd.dtype) * x32.astype(x_btd.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [h/2] in float32, with llama3 / linear scaling applied."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    kind = cfg.rope_scaling[0]
    if kind == "linear":
        inv = inv / np.float32(cfg.rope_scaling[1])
    elif kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        _, factor, low, high, original = cfg.rope_scaling
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = original / low, original / high
        slowed = np.where(wavelen > low_wavelen, inv / factor, inv)
        blend = (original / wavelen - low) / (high - low)
        smoothed = (1 - blend) * slowed / factor + blend * slowed
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(in_band, smoothed, slowed).astype(np.float32)
    return inv


def rope_tables(positions_bt: jax.Array, inv_freq_h2: np.ndarray):
    """cos/sin [b, t, h] in float32 (each frequency used for both halves of the head)."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half RoPE, the HF layout (no q/k permutation of HF weights needed)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :].astype(x_btnh.dtype), sin_bth[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin


def attention(q_btnh, k_bskh, v_bskh, mask_bts, impl: str) -> jax.Array:
    """Grouped-query attention; ``impl`` is 'xla', 'cudnn' (GPU, bf16/fp16) or 'reference'."""
    if impl == "reference":
        b, t, n, h = q_btnh.shape
        kv = k_bskh.shape[2]
        q = q_btnh.reshape(b, t, kv, n // kv, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
        scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
        return out.reshape(b, t, n, h)
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None],
                                        implementation=impl)


# Query blocks of a causal pass without a cache (training rows, prefill of logps): block i of
# T/4 queries sees keys up to its own end only, so the masked upper triangle is mostly never
# formed: 10/16 of the square's score and value FLOPs. Real positions get the same result
# (what is skipped is masked anyway); fully masked padding queries differ, as garbage does.
CAUSAL_QUERY_BLOCKS = 4


def grouped_attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jax.Array:
    """The 'xla' attention of training passes, laid out for the matmul: the g query heads that
    share a kv head stack into one [g*t, h] operand per (batch, kv head), so scores and their
    gradients stay [.., g*t, s] row-major and only the narrow q/k/v/out tensors get transposed.
    (jax.nn.dot_product_attention's [b, k, g, t, s] einsums made XLA:CPU copy the score-sized
    tensors around every batched dot; docs/design.md.)"""
    b, t, n, hd = q_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    q_bkmh = q_btnh.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    scores_bkms = jnp.matmul(q_bkmh, k_bskh.transpose(0, 2, 3, 1),
                             preferred_element_type=jnp.float32) / math.sqrt(hd)
    mask_bkms = jnp.broadcast_to(mask_bts[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
    scores_bkms = jnp.where(mask_bkms, scores_bkms, jnp.finfo(jnp.float32).min)
    probs_bkms = jax.nn.softmax(scores_bkms, axis=-1).astype(v_bskh.dtype)
    out_bkmh = jnp.matmul(probs_bkms, v_bskh.transpose(0, 2, 1, 3))
    return out_bkmh.reshape(b, kv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)


def causal_attention(q_btnh, k_bskh, v_bskh, mask_bts, impl: str) -> jax.Array:
    """``attention`` for s == t key slots in query order (no cache), by query blocks."""
    t = q_btnh.shape[1]
    blocks = CAUSAL_QUERY_BLOCKS
    if impl == "cudnn" or k_bskh.shape[1] != t:
        return attention(q_btnh, k_bskh, v_bskh, mask_bts, impl)
    one = grouped_attention if impl == "xla" else functools.partial(attention, impl=impl)
    if t % blocks or t < 2 * blocks:
        return one(q_btnh, k_bskh, v_bskh, mask_bts)
    tq = t // blocks
    outs = [one(q_btnh[:, i * tq:(i + 1) * tq], k_bskh[:, :(i + 1) * tq],
                v_bskh[:, :(i + 1) * tq], mask_bts[:, i * tq:(i + 1) * tq, :(i + 1) * tq])
            for i in range(blocks)]
    return jnp.concatenate(outs, axis=1)


# Backward recomputes the softmax from q and k instead of saving [b, k, g, t, s] probabilities
# for every layer (the largest activation of a training step; on CPU saving them was also
# slower, docs/design.md); inference is unaffected.
_attention_recomputed = jax.checkpoint(attention, static_argnums=(4,))
_causal_attention_recomputed = jax.checkpoint(causal_attention, static_argnums=(4,))


def _write_rows(cache_bs, update_bt, start_b):
    """Write each row's update at its own start slot."""
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))(
        cache_bs, update_bt, start_b)


# Linear maps with a hand-written backward. Autodiff of ``einsum`` asks for the weight gradient
# as dy^T-contracted-with-x on the token axis; XLA:CPU answers by fusing a transpose into the
# wide elementwise backward (the SwiGLU derivative) and by running that dot outside its fast
# GEMM path. Stating dW = x^T @ dy (and dWd^T = dy^T @ a) makes it transpose the narrow
# d-wide activation instead (faster on CPU, docs/design.md), same math
# everywhere. Remat policies still see the dots (``dots`` saves them, ``full`` recomputes).
@jax.custom_vjp
def dense(x_mk: jax.Array, w_kn: jax.Array) -> jax.Array:
    """x @ w for 2-D operands."""
    return x_mk @ w_kn


def _dense_fwd(x_mk, w_kn):
    return x_mk @ w_kn, (x_mk, w_kn)


def _dense_bwd(res, dy_mn):
    x_mk, w_kn = res
    return dy_mn @ w_kn.T, x_mk.T @ dy_mn


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def swiglu(x_md: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    """(silu(x @ gate) * (x @ up)) @ down for 2-D ``x``."""
    return _swiglu_fwd(x_md, gate_df, up_df, down_fd)[0]


def _swiglu_fwd(x_md, gate_df, up_df, down_fd):
    g_mf, u_mf = x_md @ gate_df, x_md @ up_df
    return (jax.nn.silu(g_mf) * u_mf) @ down_fd, (x_md, g_mf, u_mf, gate_df, up_df, down_fd)


def _swiglu_bwd(res, dy_md):
    x_md, g_mf, u_mf, gate_df, up_df, down_fd = res
    sig_mf = jax.nn.sigmoid(g_mf)
    silu_mf = g_mf * sig_mf
    da_mf = dy_md @ down_fd.T
    du_mf = da_mf * silu_mf
    dg_mf = da_mf * u_mf * (sig_mf * (1 + g_mf * (1 - sig_mf)))
    x_dm = x_md.T
    d_down = (dy_md.T @ (silu_mf * u_mf)).T
    dx_md = dg_mf @ gate_df.T + du_mf @ up_df.T
    return dx_md, x_dm @ dg_mf, x_dm @ du_mf, d_down


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def decoder_layer(x_btd, layer, cfg: LlamaConfig, cos_bth, sin_bth, mask_bts,
                  cache_kv=None, start_b=None):
    """One pre-norm block. With ``cache_kv`` the new keys/values are written at ``start_b``."""
    cdt = x_btd.dtype
    b, t, d = x_btd.shape
    n, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = {name: value.astype(cdt) for name, value in layer.items()}
    h_md = rms_norm(x_btd, w["input_norm"], cfg.rms_norm_eps).reshape(b * t, d)
    # Three products, not one over [d, (n + 2k) h]: the fused one was no faster on CPU
    # (docs/design.md).
    q = dense(h_md, w["q_proj"].reshape(d, n * hd)).reshape(b, t, n, hd)
    k = dense(h_md, w["k_proj"].reshape(d, kv * hd)).reshape(b, t, kv, hd)
    v = dense(h_md, w["v_proj"].reshape(d, kv * hd)).reshape(b, t, kv, hd)
    q, k = apply_rope(q, cos_bth, sin_bth), apply_rope(k, cos_bth, sin_bth)
    if cache_kv is not None:
        k = _write_rows(cache_kv[0], k.astype(cache_kv[0].dtype), start_b)
        v = _write_rows(cache_kv[1], v.astype(cache_kv[1].dtype), start_b)
        new_kv = (k, v)
        k, v = k.astype(cdt), v.astype(cdt)
    else:
        new_kv = None
    if cache_kv is None and cfg.attention_impl == "cudnn":
        # Flash attention saves only its output and log-sum-exp for the backward: nothing to
        # gain from recomputing its forward.
        a_btnh = attention(q, k, v, mask_bts, "cudnn")
    elif cache_kv is None:
        a_btnh = _causal_attention_recomputed(q, k, v, mask_bts, cfg.attention_impl)
    else:
        a_btnh = _attention_recomputed(q, k, v, mask_bts, cfg.attention_impl)
    x_btd = x_btd + dense(a_btnh.reshape(b * t, n * hd), w["o_proj"].reshape(n * hd, d)).reshape(b, t, d)
    h_md = rms_norm(x_btd, w["post_attn_norm"], cfg.rms_norm_eps).reshape(b * t, d)
    x_btd = x_btd + swiglu(h_md, w["gate_proj"], w["up_proj"], w["down_proj"]).reshape(b, t, d)
    return x_btd, new_kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# ---------------------------------------------------------------------------- forward
def forward_hidden(params: Params, cfg: LlamaConfig, input_ids_bt: jax.Array,
                   attention_mask_bt: jax.Array | None = None,
                   positions_bt: jax.Array | None = None,
                   cache: KVCache | None = None,
                   segment_ids_bt: jax.Array | None = None):
    """Final-normed hidden states [b, t, d] (compute dtype) and the updated cache (or None).

    Batches are right-padded. Without a cache, positions default to ``cumsum(mask) - 1``;
    with one, token t of row b goes to slot ``cache.end_b[b] + t`` and takes that position.
    ``segment_ids_bt`` (no cache) packs several continuations of one prefix in a row: segment 0
    is the shared prefix, visible to every token after it; a token of segment k > 0 also sees
    earlier tokens of segment k only (prompt-shared DPO rows, see ``cosa_jax.train.data``).
    """
    b, t = input_ids_bt.shape
    mask_bt = (jnp.ones((b, t), bool) if attention_mask_bt is None
               else attention_mask_bt.astype(bool))
    t_idx = jnp.arange(t, dtype=jnp.int32)
    if cache is None:
        if positions_bt is None:
            positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)
        q_slot_bt = jnp.broadcast_to(t_idx, (b, t))
        valid_bs = mask_bt
        start_b = None
    else:
        start_b = cache.end_b
        q_slot_bt = start_b[:, None] + t_idx[None, :]
        if positions_bt is None:
            positions_bt = q_slot_bt
        valid_bs = _write_rows(cache.valid_bs, mask_bt, start_b)
    s_idx = jnp.arange(valid_bs.shape[1], dtype=jnp.int32)
    mask_bts = (s_idx[None, None, :] <= q_slot_bt[:, :, None]) & valid_bs[:, None, :]
    if segment_ids_bt is not None:
        if cache is not None:
            raise ValueError("segment_ids_bt is for training rows, not for cached decoding")
        seg_q, seg_k = segment_ids_bt[:, :, None], segment_ids_bt[:, None, :]
        mask_bts = mask_bts & ((seg_k == 0) | (seg_k == seg_q))

    cdt = jnp.dtype(cfg.compute_dtype)
    x_btd = jnp.take(params["embed_tokens"], input_ids_bt, axis=0).astype(cdt)
    cos_bth, sin_bth = rope_tables(positions_bt, rope_inv_freq(cfg))

    if cache is None:
        def body(x, layer):
            return decoder_layer(x, layer, cfg, cos_bth, sin_bth, mask_bts)[0], None
        carry = x_btd
        xs = params["layers"]
    else:
        # The cache rides in the loop carry and each layer writes its slab in place; passing
        # it through scan's xs/ys would copy the whole cache on every decode step.
        def body(carry, xs):
            x, k_all, v_all = carry
            layer, i = xs
            x, (k_l, v_l) = decoder_layer(x, layer, cfg, cos_bth, sin_bth, mask_bts,
                                          (k_all[i], v_all[i]), start_b)
            k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_l, i, axis=0)
            v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_l, i, axis=0)
            return (x, k_all, v_all), None
        carry = (x_btd, cache.k_lbskh, cache.v_lbskh)
        xs = (params["layers"], jnp.arange(cfg.num_layers, dtype=jnp.int32))

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    if cfg.scan_layers:
        carry, _ = jax.lax.scan(body, carry, xs)
    else:
        for i in range(cfg.num_layers):
            carry, _ = body(carry, jax.tree.map(lambda w, i=i: w[i], xs))
    x_btd = carry if cache is None else carry[0]
    x_btd = rms_norm(x_btd, params["norm"], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(carry[1], carry[2], valid_bs,
                            start_b + mask_bt.sum(axis=1, dtype=jnp.int32))
    return x_btd, new_cache


def unembed_matrix(params: Params, cfg: LlamaConfig) -> jax.Array:
    """[d, v]: the output projection (the embedding's transpose when tied)."""
    return params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]


def unembed(params: Params, cfg: LlamaConfig, x_btd: jax.Array) -> jax.Array:
    """float32 logits [b, t, v]."""
    w_dv = unembed_matrix(params, cfg).astype(x_btd.dtype)
    return jnp.einsum("btd,dv->btv", x_btd, w_dv, preferred_element_type=jnp.float32)


def forward(params: Params, cfg: LlamaConfig, input_ids_bt, attention_mask_bt=None,
            positions_bt=None, cache: KVCache | None = None):
    """float32 logits [b, t, v]; with a cache, also the updated cache."""
    x_btd, new_cache = forward_hidden(params, cfg, input_ids_bt, attention_mask_bt,
                                      positions_bt, cache)
    logits = unembed(params, cfg, x_btd)
    return logits if cache is None else (logits, new_cache)


def init_params(cfg: LlamaConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random weights (normal(std), unit norms) in ``cfg.param_dtype``: tests and benchmarks."""
    d, f, v, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "embed_tokens": (v, d),
        "layers": {
            "q_proj": (l, d, n, h), "k_proj": (l, d, k, h), "v_proj": (l, d, k, h),
            "o_proj": (l, n, h, d), "gate_proj": (l, d, f), "up_proj": (l, d, f),
            "down_proj": (l, f, d),
        },
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    params = jax.tree.unflatten(
        treedef, [std * jax.random.normal(kk, s, jnp.float32) for kk, s in zip(keys, leaves)])
    params["norm"] = jnp.ones((d,), jnp.float32)
    params["layers"]["input_norm"] = jnp.ones((l, d), jnp.float32)
    params["layers"]["post_attn_norm"] = jnp.ones((l, d), jnp.float32)
    return jax.tree.map(lambda x: x.astype(dtype), params)


# ---------------------------------------------------------------------------- NNX wrapper
class Llama(nnx.Module):
    """Flax NNX view of the weights; ``model(input_ids, attention_mask)`` gives float32 logits.

    Training and sampling use the pure functions on ``model.params()`` (or ``nnx.split``), so
    there is exactly one implementation of the math.
    """

    def __init__(self, config: LlamaConfig, params: Params):
        self.config = config
        self.embed_tokens = nnx.Param(params["embed_tokens"])
        self.layers = nnx.Dict({name: nnx.Param(w) for name, w in params["layers"].items()})
        self.norm = nnx.Param(params["norm"])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0) -> "Llama":
        return cls(config, init_params(config, jax.random.key(seed)))

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, input_ids, attention_mask=None, positions=None):
        return forward(self.params(), self.config, jnp.asarray(input_ids),
                       None if attention_mask is None else jnp.asarray(attention_mask),
                       None if positions is None else jnp.asarray(positions))

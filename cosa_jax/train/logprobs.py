"""Log-probabilities: per token, per sequence, memory-lean over the vocabulary, and per pair
of a training batch in either DPO layout (pure JAX). The losses (``losses``) take their output.

Conventions (cosalign.md §5): labels use -100 (``batches.IGNORE_INDEX``) for positions that
carry no loss (prompt and padding); the token at position t is predicted from position t-1
(shift by one); log-softmax is taken in fp32; a response's log-prob is the SUM of its token
log-probs. Axis letters: b batch, t time, v vocabulary, d model width, k target sets, w window.
Batch layouts: ``cosa_jax.train.data``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.llama import Params, forward_hidden, unembed_matrix
from cosa_jax.train import losses
from cosa_jax.train.batches import IGNORE_INDEX, PairBatch, RowBatch, SharedPromptBatch


def _shifted_labels(labels_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets for positions 0..T-2 (label of the next token) and their 0/1 mask."""
    targets_bt = labels_bt[:, 1:]
    mask_bt = targets_bt != IGNORE_INDEX
    # -100 is not a valid index; any in-range id works because the mask zeroes it afterwards.
    return jnp.where(mask_bt, targets_bt, 0), mask_bt


def token_logps(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Per-token log p(label) of shape [B, T-1]; 0 where the label is -100.

    Position t of the result scores labels[:, t+1] under logits[:, t].
    """
    targets_bt, mask_bt = _shifted_labels(labels_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    picked_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.where(mask_bt, picked_bt, 0.0)


def sequence_logps(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Summed response log-prob per example, [B] fp32 (the quantity DPO compares)."""
    return token_logps(logits_btv, labels_bt).sum(axis=-1)


def chunked_target_logps(
    hidden_btd: jax.Array,
    unembed_dv: jax.Array,
    targets_kbt: jax.Array,
    *,
    chunk: int = 128,
    save_logits: bool = False,
) -> jax.Array:
    """log p(targets_kbt[k, b, t] | position t) for K target sets, [K, B, T] fp32, 0 at -100.

    Targets are aligned with the position that PREDICTS them (already shifted). Several sets
    share one log-softmax: a prompt-shared DPO row predicts both responses' first tokens from
    the prompt's last position.

    Why chunks: with a 128k vocabulary the fp32 logits of a 2x640-token batch alone are ~0.6 GB
    per sequence pair, more than the rest of the activations. We walk over the sequence in
    chunks of `chunk` positions; each chunk's logits are formed (fp32 accumulation), reduced
    with logsumexp and dropped. The backward pass (`_target_logps_bwd`) forms one chunk's logits
    again, unless ``save_logits`` keeps them from the forward: one vocabulary matmul fewer per
    step for the memory of the fp32 logits (what a PyTorch step holds anyway), worth it for
    small vocabularies and on CPU. Saved logits are all held at once, so chunking them would
    bound nothing: the window is then one chunk, and each vocabulary matmul one large GEMM.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    b, t, d = hidden_btd.shape
    k = targets_kbt.shape[0]
    mask_kbt = targets_kbt != IGNORE_INDEX
    # -100 is not a valid index; any in-range id works because the mask zeroes it afterwards.
    targets_kbt = jnp.where(mask_kbt, targets_kbt, 0)
    if save_logits:
        chunk = t
    n_chunks = max(1, math.ceil(t / chunk))
    # As many chunks as `chunk` asks for, but evened out: a 192-position window in chunks of
    # 128 runs as 2 x 96, not 2 x 128 with a quarter of the vocabulary matmuls on padding.
    chunk = min(chunk, 8 * math.ceil(t / n_chunks / 8))
    pad = n_chunks * chunk - t
    h_btd = hidden_btd
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_kbt = jnp.pad(targets_kbt, ((0, 0), (0, 0), (0, pad)))
    # [n_chunks, B, chunk, ...] so the loops walk over the chunks.
    h_nbcd = h_btd.reshape(b, n_chunks, chunk, d).transpose(1, 0, 2, 3)
    tgt_nkbc = targets_kbt.reshape(k, b, n_chunks, chunk).transpose(2, 0, 1, 3)
    logp_nkbc = _target_logps(h_nbcd, unembed_dv, tgt_nkbc, save_logits)
    logp_kbt = logp_nkbc.transpose(1, 2, 0, 3).reshape(k, b, n_chunks * chunk)[:, :, :t]
    return jnp.where(mask_kbt, logp_kbt, 0.0)


def _vocab_block(v: int) -> int | None:
    """Largest divisor of v in [512, 4096], or None (then the row is reduced whole)."""
    return next((blk for blk in range(min(v // 2, 4096), 511, -1) if v % blk == 0), None)


def vocab_logsumexp(logits_xv: jax.Array) -> jax.Array:
    """logsumexp over the last (vocabulary) axis, as a logsumexp of per-block logsumexps.

    Same value up to rounding. Why: XLA:CPU's YNNPACK reduction is much slower over one
    vocabulary-wide row than over blocks of a few thousand (docs/design.md); on accelerators
    the reshape is free.
    """
    blk = _vocab_block(logits_xv.shape[-1])
    if blk is None:
        return jax.nn.logsumexp(logits_xv, axis=-1)
    blocks = logits_xv.reshape(*logits_xv.shape[:-1], logits_xv.shape[-1] // blk, blk)
    return jax.nn.logsumexp(jax.nn.logsumexp(blocks, axis=-1), axis=-1)


def _chunk_logits(h_bcd: jax.Array, unembed_dv: jax.Array) -> jax.Array:
    """A chunk's fp32 logits as one [b*c, V] matrix: 2-D, so that the backward's cotangent,
    elementwise in them, can take their buffer over (see `_target_logps_bwd`)."""
    b, c, d = h_bcd.shape
    return jnp.dot(h_bcd.reshape(b * c, d), unembed_dv, preferred_element_type=jnp.float32)


def _target_logps_fwd(h_nbcd, unembed_dv, tgt_nkbc, save_logits):
    _, b, c, _ = h_nbcd.shape

    def one_chunk(args):
        h_bcd, tgt_kbc = args
        logits_mv = _chunk_logits(h_bcd, unembed_dv)
        lse_m = vocab_logsumexp(logits_mv)
        picked_km = jax.vmap(
            lambda tgt_m: jnp.take_along_axis(logits_mv, tgt_m[:, None], axis=-1)[:, 0]
        )(tgt_kbc.reshape(-1, b * c))
        logp_kbc = (picked_km - lse_m).reshape(-1, b, c)
        return logp_kbc, lse_m.reshape(b, c), (logits_mv if save_logits else None)

    # A loop bounds the live logits to one chunk; saved logits are one chunk (the window).
    if save_logits:
        logp_kbc, lse_bc, logits_mv = one_chunk((h_nbcd[0], tgt_nkbc[0]))
        return logp_kbc[None], (h_nbcd, unembed_dv, tgt_nkbc, lse_bc[None], logits_mv)
    logp_nkbc, lse_nbc, _ = jax.lax.map(one_chunk, (h_nbcd, tgt_nkbc))
    return logp_nkbc, (h_nbcd, unembed_dv, tgt_nkbc, lse_nbc, None)


def _target_logps_bwd(save_logits, res, g_nkbc):
    """d logp_k / d logits = onehot(target_k) - softmax, so with upstream g_k the logits'
    cotangent is sum_k g_k onehot_k - (sum_k g_k) softmax, formed one chunk at a time. Written
    out (not left to autodiff) so that the two matmuls keep the weight in its stored layout:
    dh = G @ W^T and dW += h^T @ G, the [V, d] matrix never copied per chunk, and so that saved
    logits can replace the recompute. The cotangent keeps the logits' 2-D [b*c, V] layout, so
    XLA writes it over the saved logits' buffer instead of faulting in a fresh one. h^T is
    formed behind an optimization barrier: folded into the dot as a transposed operand, XLA:CPU
    ran a [d, V] lm_head's dW on a slow Eigen path. A tied embedding wants dW^T, and XLA's own
    folding (G^T @ h) beat every explicit layout tried. Figures: docs/design.md."""
    h_nbcd, unembed_dv, tgt_nkbc, lse_nbc, logits = res
    _, b, c, d = h_nbcd.shape
    v = unembed_dv.shape[1]
    cdt = h_nbcd.dtype
    w_vd = unembed_dv.T

    def one_chunk(dw_dv, args):
        h_bcd, tgt_kbc, lse_bc, g_kbc, logits_mv = args
        if logits_mv is None:
            logits_mv = _chunk_logits(h_bcd, unembed_dv)
        tgt_km, g_km = tgt_kbc.reshape(-1, b * c), g_kbc.reshape(-1, b * c)
        vocab_v = jnp.arange(v, dtype=tgt_km.dtype)
        hits_mv = sum(jnp.where(vocab_v == tgt_km[i, :, None], g_km[i, :, None], 0.0)
                      for i in range(tgt_km.shape[0]))
        probs_mv = jnp.exp(logits_mv - lse_bc.reshape(b * c)[:, None])
        dlogits_mv = (hits_mv - g_km.sum(axis=0)[:, None] * probs_mv).astype(cdt)
        h_dm = jax.lax.optimization_barrier(h_bcd.reshape(b * c, d).T)
        dh_bcd = jnp.dot(dlogits_mv, w_vd, preferred_element_type=jnp.float32).astype(cdt)
        dw = jnp.dot(h_dm, dlogits_mv, preferred_element_type=jnp.float32)
        return (dw if dw_dv is None else dw_dv + dw), dh_bcd.reshape(b, c, d)

    if save_logits:
        dw_dv, dh_bcd = one_chunk(None, (h_nbcd[0], tgt_nkbc[0], lse_nbc[0], g_nkbc[0], logits))
        dh_nbcd = dh_bcd[None]
    else:
        dw_dv, dh_nbcd = jax.lax.scan(one_chunk, jnp.zeros((d, v), jnp.float32),
                                      (h_nbcd, tgt_nkbc, lse_nbc, g_nkbc, None))
    return dh_nbcd, dw_dv.astype(unembed_dv.dtype), None


# Without a gradient (the reference model) nothing is saved.
_target_logps = jax.custom_vjp(lambda h, w, tgt, save: _target_logps_fwd(h, w, tgt, False)[0],
                               nondiff_argnums=(3,))
_target_logps.defvjp(_target_logps_fwd, _target_logps_bwd)


def chunked_token_logps(
    hidden_btd: jax.Array,
    unembed_dv: jax.Array,
    labels_bt: jax.Array,
    *,
    chunk: int = 128,
    save_logits: bool = False,
) -> jax.Array:
    """Same result as `token_logps(hidden @ unembed, labels)`, without a full [B,T,V] tensor.

    hidden_btd: final hidden states (after the last norm), any float dtype.
    unembed_dv: output projection [D, V] (for tied embeddings pass `embedding_vd.T`).
    Returns [B, T-1] fp32, 0 where the shifted label is -100 (see `chunked_target_logps`).
    """
    return chunked_target_logps(hidden_btd[:, :-1], unembed_dv, labels_bt[None, :, 1:],
                                chunk=chunk, save_logits=save_logits)[0]


def chunked_sequence_logps(
    hidden_btd: jax.Array, unembed_dv: jax.Array, labels_bt: jax.Array, *, chunk: int = 128,
    save_logits: bool = False,
) -> jax.Array:
    """Summed response log-prob per example [B], memory-lean (see `chunked_token_logps`)."""
    return chunked_token_logps(hidden_btd, unembed_dv, labels_bt, chunk=chunk,
                               save_logits=save_logits).sum(axis=-1)


# ------------------------------------------------------------- a batch's log-probs
def response_window(hidden_btd: jax.Array, start_b: jax.Array, width: int) -> jax.Array:
    """hidden[b, start_b[b] : start_b[b] + width] as [b, width, d]. Only these positions meet
    the vocabulary projection; the prompt's positions predict nothing we score. Padding by
    ``width`` keeps every row's slice in range."""
    padded_btd = jnp.pad(hidden_btd, ((0, 0), (0, width), (0, 0)))
    return jax.vmap(lambda h_td, s: jax.lax.dynamic_slice_in_dim(h_td, s, width, axis=0))(
        padded_btd, start_b)


def row_logps(params: Params, cfg: LlamaConfig, rows: RowBatch, chunk: int,
              save_logits: bool = False) -> jax.Array:
    """Summed response log-probs [rows] without materialising [rows, T, V] logits: over the
    response windows when the batch has them (``data.collate``), else over all positions."""
    hidden_btd, _ = forward_hidden(params, cfg, rows.input_ids, rows.attention_mask,
                                   rows.position_ids)
    w_dv = unembed_matrix(params, cfg).astype(hidden_btd.dtype)
    if rows.targets is not None:
        window_bwd = response_window(hidden_btd, rows.response_start, rows.targets.shape[-1])
        return chunked_target_logps(window_bwd, w_dv, rows.targets[None], chunk=chunk,
                                    save_logits=save_logits)[0].sum(axis=-1)
    return chunked_sequence_logps(hidden_btd, w_dv, rows.labels, chunk=chunk,
                                  save_logits=save_logits)


def pair_logps(params: Params, cfg: LlamaConfig, micro: PairBatch, chunk: int,
               save_logits: bool = False) -> tuple[jax.Array, jax.Array]:
    """Summed (chosen, rejected) response log-probs [pairs] of a DPO micro-batch in either layout:
    concatenated rows (``TwoRowBatch``), or one prompt-shared row per pair."""
    if not isinstance(micro, SharedPromptBatch):
        return losses.split_pairs(row_logps(params, cfg, micro, chunk, save_logits))
    hidden_btd, _ = forward_hidden(params, cfg, micro.input_ids, micro.attention_mask,
                                   micro.position_ids, segment_ids_bt=micro.segment_ids)
    window_bwd = response_window(hidden_btd, micro.response_start, micro.chosen_targets.shape[-1])
    w_dv = unembed_matrix(params, cfg).astype(hidden_btd.dtype)
    targets_kbw = jnp.stack([micro.chosen_targets, micro.rejected_targets])
    logp_kbw = chunked_target_logps(window_bwd, w_dv, targets_kbw, chunk=chunk,
                                    save_logits=save_logits)
    chosen_b, rejected_b = logp_kbw.sum(axis=-1)
    return chosen_b, rejected_b


def pair_lengths(micro: PairBatch) -> tuple[jax.Array, jax.Array]:
    """Scored tokens of the (chosen, rejected) responses [pairs], after truncation: the |y| that
    SimPO and ORPO normalise by, read off the same targets the log-probs sum over."""
    if isinstance(micro, SharedPromptBatch):
        return ((micro.chosen_targets != IGNORE_INDEX).sum(-1),
                (micro.rejected_targets != IGNORE_INDEX).sum(-1))
    if micro.targets is not None:
        n_rows = (micro.targets != IGNORE_INDEX).sum(-1)
    else:
        n_rows = (micro.labels[:, 1:] != IGNORE_INDEX).sum(-1)
    return losses.split_pairs(n_rows)

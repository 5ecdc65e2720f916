"""Sequence log-probabilities and the SFT / DPO losses (pure JAX).

Conventions (cosalign.md §5): labels use -100 for positions that carry no loss (prompt and
padding); the token at position t is predicted from position t-1 (shift by one); log-softmax is
taken in fp32; a response's log-prob is the SUM of its token log-probs (no length
normalisation; SimPO and ORPO divide by the response length themselves). Axis letters: b batch,
t time, v vocabulary, d model width. Which objectives are the paper's and which are ours:
docs/objectives.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100

# DPO family (policy against a frozen reference): the paper's sigmoid DPO, IPO, hinge (SLiC),
# and score_margin (ours). Reference-free: SimPO, ORPO.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "score_margin", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


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


def count_target_tokens(labels_bt: jax.Array) -> jax.Array:
    """Number of tokens that carry loss (after the shift), as int32."""
    return (labels_bt[:, 1:] != IGNORE_INDEX).sum().astype(jnp.int32)


def sft_loss(logps_b: jax.Array, labels_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SFT loss = mean over examples of the summed token NLL; also the target token count.

    Takes the summed log-probs (from `sequence_logps` or `chunked_sequence_logps`) so the caller
    picks the memory strategy. Summed, not averaged per token, as in the reference recipe.
    """
    return -jnp.mean(logps_b), count_target_tokens(labels_bt)


def split_pairs(x_2b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a concatenated [2B, ...] batch (chosen rows first, then rejected) into two halves."""
    half = x_2b.shape[0] // 2
    return x_2b[:half], x_2b[half:]


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example DPO losses [B] and the (gradient-free) chosen / rejected rewards [B].

    h = (pi_c - pi_r) - (ref_c - ref_r)
      sigmoid: -(1-eps) log s(beta h) - eps log s(-beta h)   (eps = label_smoothing, cDPO)
      ipo:     (h - 1/(2 beta))^2
      hinge:   relu(1 - beta h)
    Rewards are beta * (policy - reference) log-prob, as TRL reports them.
    """
    if loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, ipo or hinge "
                         f"(the others in {LOSS_TYPES} have their own functions)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    f32 = jnp.float32
    pi_c, pi_r = policy_chosen_logps.astype(f32), policy_rejected_logps.astype(f32)
    ref_c, ref_r = ref_chosen_logps.astype(f32), ref_rejected_logps.astype(f32)
    h_b = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses_b = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_b) - (
            label_smoothing * jax.nn.log_sigmoid(-beta * h_b)
        )
    elif loss_type == "ipo":
        losses_b = (h_b - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses_b = jax.nn.relu(1.0 - beta * h_b)
    chosen_rewards_b = jax.lax.stop_gradient(beta * (pi_c - ref_c))
    rejected_rewards_b = jax.lax.stop_gradient(beta * (pi_r - ref_r))
    return losses_b, chosen_rewards_b, rejected_rewards_b


def dpo_metrics(
    losses_b: jax.Array,
    chosen_rewards_b: jax.Array,
    rejected_rewards_b: jax.Array,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
) -> dict[str, jax.Array]:
    """Batch means under TRL's metric names (equal-sized micro-batches average exactly)."""
    return {
        "loss": jnp.mean(losses_b),
        "rewards/chosen": jnp.mean(chosen_rewards_b),
        "rewards/rejected": jnp.mean(rejected_rewards_b),
        "rewards/accuracies": jnp.mean((chosen_rewards_b > rejected_rewards_b).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards_b - rejected_rewards_b),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(policy_chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(policy_rejected_logps)),
    }


def _mean_logps(logps_b: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """Summed log-prob over response length (a length below 1 counts as 1: no division by 0)."""
    return logps_b.astype(jnp.float32) / jnp.maximum(lengths_b.astype(jnp.float32), 1.0)


def log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's two-branch form):
    log1p(-exp(x)) loses digits as x -> 0, log(-expm1(x)) as x -> -inf."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def score_margin_dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    score_gap_b: jax.Array,
    *,
    beta: float = 0.1,
    margin_scale: float = 0.5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ours (not in the CoSA paper): DPO whose pairs must be separated by more the larger
    the gap between their category-error scores, gap = rejected_score - chosen_score:

        -log s(beta h - margin_scale * gap),   h as in `dpo_loss`

    An offset in the spirit of ODPO (Amini et al. 2024), with the offset read off CoSAlign's
    error scores: a rejected response that breaks the config badly must lose by more than one
    that is nearly as good. margin_scale = 0 is sigmoid DPO.
    """
    f32 = jnp.float32
    pi_c, pi_r = policy_chosen_logps.astype(f32), policy_rejected_logps.astype(f32)
    ref_c, ref_r = ref_chosen_logps.astype(f32), ref_rejected_logps.astype(f32)
    h_b = (pi_c - pi_r) - (ref_c - ref_r)
    losses_b = -jax.nn.log_sigmoid(beta * h_b - margin_scale * score_gap_b.astype(f32))
    rew_c = jax.lax.stop_gradient(beta * (pi_c - ref_c))
    rew_r = jax.lax.stop_gradient(beta * (pi_r - ref_r))
    return losses_b, rew_c, rew_r


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths_b: jax.Array,
    rejected_lengths_b: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SimPO (Meng et al. 2024), reference-free: the reward is the length-normalised log-prob.

        -log s(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)

    Returns per-pair losses and the (gradient-free) rewards beta/|y| log pi(y).
    """
    rew_c = beta * _mean_logps(policy_chosen_logps, chosen_lengths_b)
    rew_r = beta * _mean_logps(policy_rejected_logps, rejected_lengths_b)
    losses_b = -jax.nn.log_sigmoid(rew_c - rew_r - gamma)
    return losses_b, jax.lax.stop_gradient(rew_c), jax.lax.stop_gradient(rew_r)


def orpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths_b: jax.Array,
    rejected_lengths_b: jax.Array,
    *,
    lam: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ORPO (Hong et al. 2024), reference-free: SFT on the chosen response plus an odds ratio.

        P(y) = exp(log pi(y) / |y|)                     (length-normalised likelihood)
        odds(y) = P(y) / (1 - P(y))
        loss = -log pi(y_c) / |y_c| - lam * log s(log odds(y_c) - log odds(y_r))

    Returns per-pair losses, the rewards lam * log pi(y)/|y| (gradient-free, as TRL reports
    them) and the per-pair NLL term.
    """
    mean_c = _mean_logps(policy_chosen_logps, chosen_lengths_b)
    mean_r = _mean_logps(policy_rejected_logps, rejected_lengths_b)
    log_odds_b = (mean_c - mean_r) - (log1m_exp(mean_c) - log1m_exp(mean_r))
    nll_b = -mean_c
    losses_b = nll_b - lam * jax.nn.log_sigmoid(log_odds_b)
    return (losses_b, jax.lax.stop_gradient(lam * mean_c), jax.lax.stop_gradient(lam * mean_r),
            jax.lax.stop_gradient(nll_b))

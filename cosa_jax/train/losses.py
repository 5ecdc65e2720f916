"""The SFT and preference losses (pure JAX), on summed response log-probs.

The log-probs themselves (token / sequence, the chunked vocabulary head, and a batch's
per-layout pair log-probs) come from ``cosa_jax.train.logprobs``. A response's log-prob is the
SUM of its token log-probs (no length normalisation; SimPO and ORPO divide by the response
length themselves). Axis letters: b batch. Which objectives are the paper's and which are
ours: docs/objectives.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cosa_jax.train.batches import IGNORE_INDEX

# DPO family (policy against a frozen reference): the paper's sigmoid DPO, IPO, hinge (SLiC),
# and score_margin (ours). Reference-free: SimPO, ORPO.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "score_margin", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def loss_type_error(loss_type: str) -> str | None:
    """Why ``loss_type`` names no loss here, or None; the train config and the step's LossConfig
    both ask here, each naming ``dpo.loss_type`` in its own error."""
    return None if loss_type in LOSS_TYPES else f"{loss_type!r} is not one of {LOSS_TYPES}"


def label_smoothing_error(label_smoothing: float) -> str | None:
    """Why ``label_smoothing`` is out of cDPO's range [0, 0.5), or None (the config and dpo_loss ask)."""
    return None if 0.0 <= label_smoothing < 0.5 else f"must be in [0, 0.5), got {label_smoothing}"


def count_target_tokens(labels_bt: jax.Array) -> jax.Array:
    """Number of tokens that carry loss (after the shift), as int32."""
    return (labels_bt[:, 1:] != IGNORE_INDEX).sum().astype(jnp.int32)


def sft_loss(logps_b: jax.Array, labels_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SFT loss = mean over examples of the summed token NLL; also the target token count.

    Takes the summed log-probs (from `logprobs.sequence_logps` or
    `logprobs.chunked_sequence_logps`) so the caller picks the memory strategy. Summed, not
    averaged per token, as in the reference recipe.
    """
    return -jnp.mean(logps_b), count_target_tokens(labels_bt)


def split_pairs(x_2b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a concatenated [2B, ...] batch (chosen rows first, then rejected) into two halves."""
    half = x_2b.shape[0] // 2
    return x_2b[:half], x_2b[half:]


def _margin_and_rewards(pi_c, pi_r, ref_c, ref_r, beta: float):
    """The DPO family's fp32 h = (pi_c - pi_r) - (ref_c - ref_r) [B] and the gradient-free
    rewards beta * (policy - reference) log-prob [B], as TRL reports them."""
    f32 = jnp.float32
    pi_c, pi_r, ref_c, ref_r = (x.astype(f32) for x in (pi_c, pi_r, ref_c, ref_r))
    h_b = (pi_c - pi_r) - (ref_c - ref_r)
    return (h_b, jax.lax.stop_gradient(beta * (pi_c - ref_c)),
            jax.lax.stop_gradient(beta * (pi_r - ref_r)))


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
    if why := label_smoothing_error(label_smoothing):
        raise ValueError(f"label_smoothing {why}")
    h_b, chosen_rewards_b, rejected_rewards_b = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    if loss_type == "sigmoid":
        losses_b = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_b) - (
            label_smoothing * jax.nn.log_sigmoid(-beta * h_b)
        )
    elif loss_type == "ipo":
        losses_b = (h_b - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses_b = jax.nn.relu(1.0 - beta * h_b)
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
    h_b, rew_c, rew_r = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    losses_b = -jax.nn.log_sigmoid(beta * h_b - margin_scale * score_gap_b.astype(jnp.float32))
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

"""The reference optimiser: global-norm clipping, then PyTorch-style RMSprop with linear warm-up.

PyTorch's RMSprop (the reference) differs from optax's defaults: decay 0.99 (optax 0.9), eps added
OUTSIDE the square root (optax: inside), zero initial second moment, no momentum. Its L2 weight
decay is added to the (clipped) gradient before the second-moment update, so we chain
`add_decayed_weights` in that position. The warm-up `lr * min(1, (k+1)/(W+1))` has a +1 that
`optax.linear_schedule` lacks, so step 0 already uses lr/(W+1) as `LambdaLR` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def warmup_factor(step, warmup_steps: int):
    """min(1, (k+1)/(W+1)): the multiplier of the base lr at optimiser step k (0-based)."""
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / (warmup_steps + 1.0))


def warmup_schedule(
    lr: float,
    warmup_steps: int,
    *,
    schedule: str = "constant",
    total_steps: int | None = None,
) -> optax.Schedule:
    """Learning rate at optimiser step k: linear warm-up, then constant or cosine to zero.

    Cosine: after the warm-up the rate follows lr * 0.5 * (1 + cos(pi * p)) with
    p = (k - W) / (total_steps - W) clipped to [0, 1].
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"schedule='cosine' needs total_steps > warmup_steps, got total_steps={total_steps}"
        )

    def lr_at(step):
        factor = warmup_factor(step, warmup_steps)
        if schedule == "cosine":
            k = jnp.asarray(step, jnp.float32)
            p = jnp.clip((k - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
            factor = factor * 0.5 * (1.0 + jnp.cos(math.pi * p))
        return lr * factor

    return lr_at


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: every gradient times min(1, max_norm / (norm + 1e-6)).

    One scalar factor, so XLA fuses the product into each consumer (the second-moment update and
    the parameter update) and the clipped gradients are never written out; optax's
    ``clip_by_global_norm`` divides each element by the norm, and XLA materialised its result
    (a third pass over the gradients). The 1e-6 is torch's."""

    def update_fn(updates, state, params=None):
        del params
        # Squares summed in fp32 even for bf16 gradients (train.grad_dtype), fused, no copy.
        norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    lr: float,
    warmup_steps: int,
    *,
    clip_norm: float | None = 10.0,
    decay: float = 0.99,
    eps: float = 1e-8,
    schedule: str = "constant",
    total_steps: int | None = None,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """clip_by_global_norm -> [L2 weight decay] -> RMSprop(torch semantics) with the warm-up lr.

    Equal to torch `clip_grad_norm_(params, clip_norm)` + `RMSprop(lr, alpha=decay, eps=eps,
    weight_decay=weight_decay)` + `LambdaLR(lambda k: min(1, (k+1)/(W+1)))`.
    Wrap with `optax.MultiSteps` for gradient accumulation if the caller does not accumulate.
    """
    parts = []
    if clip_norm is not None:
        parts.append(clip_by_global_norm(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(
        optax.rmsprop(
            warmup_schedule(lr, warmup_steps, schedule=schedule, total_steps=total_steps),
            decay=decay,
            eps=eps,
            initial_scale=0.0,
            eps_in_sqrt=False,
            centered=False,
            momentum=None,
        )
    )
    return optax.chain(*parts)

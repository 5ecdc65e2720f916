"""Optimiser vs torch.optim.RMSprop + clip_grad_norm_ + LambdaLR over 20 steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cosa_jax.train import optim

SHAPES = {"embed": (7, 5), "layer": {"w": (5, 5), "b": (5,)}, "head": (5, 3)}
STEPS = 20
LARGE_STEPS = {2, 3, 9, 15}  # gradients scaled up so the global norm exceeds the clip of 10


def _init_params(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _grads(seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(STEPS):
        scale = 40.0 if k in LARGE_STEPS else 0.3
        out.append(jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), SHAPES,
                                is_leaf=lambda x: isinstance(x, tuple)))
    return out


def _run_ours(tx, params, grads):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    traj = []
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        traj.append(jax.tree.map(np.asarray, params))
    return traj


def _run_torch(params, grads, lr, lam, weight_decay=0.0, clip=10.0):
    leaves, treedef = jax.tree.flatten(params)
    tparams = [torch.nn.Parameter(torch.tensor(np.array(x))) for x in leaves]
    opt = torch.optim.RMSprop(tparams, lr=lr, alpha=0.99, eps=1e-8, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    traj, norms = [], []
    for g in grads:
        for p, gl in zip(tparams, jax.tree.leaves(g)):
            p.grad = torch.tensor(np.array(gl))
        norms.append(float(torch.nn.utils.clip_grad_norm_(tparams, clip)))
        opt.step()
        sched.step()
        traj.append(jax.tree.unflatten(treedef, [p.detach().numpy().copy() for p in tparams]))
    return traj, norms


def _max_rel_diff(a, b, init):
    """Relative difference of the parameter change since init (so tiny updates still count)."""
    worst = 0.0
    for x, y, x0 in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(init)):
        dx, dy = x - x0, y - x0
        assert np.abs(dy).max() > 0, "no update happened: the comparison would be vacuous"
        worst = max(worst, float(np.abs(dx - dy).max() / np.abs(dy).max()))
    return worst


def _max_abs_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The reference lr 5e-7 moves O(1) fp32 weights by less than their rounding step, so that case
# starts from small weights where every update is representable.
@pytest.mark.parametrize("lr,warmup,scale", [(1e-2, 5, 1.0), (5e-7, 150, 1e-8)])
def test_matches_torch_rmsprop_with_warmup_and_clipping(lr, warmup, scale):
    params, grads = _init_params(scale=scale), _grads()
    ours = _run_ours(optim.make_optimizer(lr, warmup), params, grads)
    ref, norms = _run_torch(params, grads, lr, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    assert sum(n > 10.0 for n in norms) == len(LARGE_STEPS), norms  # clipping really triggered
    assert sum(n < 10.0 for n in norms) == STEPS - len(LARGE_STEPS)
    worst_rel, worst_abs = 0.0, 0.0
    for k in range(STEPS):
        worst_rel = max(worst_rel, _max_rel_diff(ours[k], ref[k], params))
        worst_abs = max(worst_abs, _max_abs_diff(ours[k], ref[k]))
    print(f"lr={lr} W={warmup}: max rel diff of updates {worst_rel:.2e}, max abs {worst_abs:.2e}")
    assert worst_rel < 5e-6


def test_weight_decay_and_cosine_match_torch():
    lr, warmup, total = 1e-2, 4, 20
    params, grads = _init_params(3), _grads(4)

    def lam(k):
        f = min(1.0, (k + 1) / (warmup + 1))
        p = min(1.0, max(0.0, (k - warmup) / (total - warmup)))
        return f * 0.5 * (1 + math.cos(math.pi * p))

    tx = optim.make_optimizer(lr, warmup, schedule="cosine", total_steps=total, weight_decay=0.01)
    ours = _run_ours(tx, params, grads)
    ref, _ = _run_torch(params, grads, lr, lam, weight_decay=0.01)
    worst = max(_max_rel_diff(o, r, params) for o, r in zip(ours, ref))
    print(f"cosine + weight decay: max rel diff of updates {worst:.2e}")
    assert worst < 5e-6


def test_warmup_schedule_values():
    sched = optim.warmup_schedule(5e-7, 150)
    assert float(sched(0)) == pytest.approx(5e-7 / 151, rel=1e-6)
    assert float(sched(149)) == pytest.approx(5e-7 * 150 / 151, rel=1e-6)
    assert float(sched(150)) == pytest.approx(5e-7, rel=1e-6)
    assert float(sched(10_000)) == pytest.approx(5e-7, rel=1e-6)
    cos = optim.warmup_schedule(1.0, 10, schedule="cosine", total_steps=110)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(cos(110)) == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        optim.make_optimizer(1e-3, 10, schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_optimizer(1e-3, 10, schedule="cosine")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_schedule(1e-3, -1)

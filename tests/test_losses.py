"""Losses vs PyTorch implementations of the reference formulas, written here independently."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosa_jax.train import logprobs, losses

B, T, V, D = 4, 37, 101, 16


def _random_batch(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    # prompts of different lengths and right padding, both masked with -100
    for b in range(B):
        p = rng.integers(1, T // 2)
        end = rng.integers(p + 2, T + 1)
        labels[b, :p] = -100
        labels[b, end:] = -100
    return logits, labels


def torch_sequence_logps(logits, labels):
    """Reference: shift, fp32 log_softmax, gather, mask -100, sum."""
    logits = torch.as_tensor(logits, dtype=torch.float32)[:, :-1]
    labels = torch.as_tensor(labels, dtype=torch.long)[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    per_tok = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_tok * mask).sum(-1)


def torch_dpo(pc, pr, rc, rr, beta, ls, loss_type):
    pc, pr, rc, rr = (torch.as_tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr))
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "ipo":
        loss = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * logits)
    return loss, beta * (pc - rc), beta * (pr - rr)


def test_sequence_logps_matches_torch():
    logits, labels = _random_batch()
    ours = np.asarray(logprobs.sequence_logps(jnp.asarray(logits), jnp.asarray(labels)))
    ref = torch_sequence_logps(logits, labels).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    print("sequence_logps max abs diff vs torch:", np.abs(ours - ref).max())


def test_sequence_logps_bf16_logits_upcast():
    logits, labels = _random_batch(1)
    bf = jnp.asarray(logits).astype(jnp.bfloat16)
    ours = np.asarray(logprobs.sequence_logps(bf, jnp.asarray(labels)))
    assert ours.dtype == np.float32
    ref = torch_sequence_logps(torch.as_tensor(np.array(bf.astype(jnp.float32))), labels).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)


def test_sum_not_mean():
    """Doubling the response length (identical tokens, uniform logits) doubles the log-prob."""
    logits = np.zeros((1, 9, 8), np.float32)
    lab = np.full((1, 9), -100, np.int32)
    lab[0, 1:5] = 3
    lab2 = np.full((1, 9), -100, np.int32)
    lab2[0, 1:9] = 3
    a = float(logprobs.sequence_logps(logits, lab)[0])
    b = float(logprobs.sequence_logps(logits, lab2)[0])
    assert a == pytest.approx(4 * -math.log(8), rel=1e-6)
    assert b == pytest.approx(2 * a, rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_matches_full_and_torch(chunk):
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed = rng.normal(size=(D, V)).astype(np.float32)
    _, labels = _random_batch(2)
    full = logprobs.token_logps(jnp.asarray(hidden @ unembed), jnp.asarray(labels))
    chunked = logprobs.chunked_token_logps(
        jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(labels), chunk=chunk
    )
    assert chunked.shape == (B, T - 1)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-4)
    seq = np.asarray(logprobs.chunked_sequence_logps(hidden, unembed, labels, chunk=chunk))
    logits_t = torch.as_tensor(hidden) @ torch.as_tensor(unembed)
    ref = torch_sequence_logps(logits_t, labels).numpy()
    np.testing.assert_allclose(seq, ref, rtol=1e-5, atol=1e-4)
    print(f"chunk={chunk} chunked_sequence_logps max abs diff vs torch:", np.abs(seq - ref).max())


@pytest.mark.parametrize("save_logits", [False, True])
def test_chunked_gradients_match_torch(save_logits):
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed = rng.normal(size=(D, V)).astype(np.float32)
    _, labels = _random_batch(3)

    def f(h, w):
        return logprobs.chunked_sequence_logps(h, w, labels, chunk=8, save_logits=save_logits).sum()

    gh, gw = jax.grad(f, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(unembed))
    ht = torch.tensor(hidden, requires_grad=True)
    wt = torch.tensor(unembed, requires_grad=True)
    torch_sequence_logps(ht @ wt, labels).sum().backward()
    np.testing.assert_allclose(np.asarray(gh), ht.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    print("chunked grad max abs diff vs torch:", np.abs(np.asarray(gw) - wt.grad.numpy()).max())


@pytest.mark.parametrize("vocab", [8192, 6006, 4099, 700])
def test_vocab_logsumexp_matches_torch(vocab):
    """Blocked (4096, 3003) and whole-row (prime 4099, small 700) reductions alike."""
    x = np.random.default_rng(7).normal(0, 4, size=(3, 5, vocab)).astype(np.float32)
    ours = np.asarray(logprobs.vocab_logsumexp(jnp.asarray(x)))
    ref = torch.logsumexp(torch.as_tensor(x, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)
    assert {8192: 4096, 6006: 3003, 4099: None, 700: None}[vocab] == logprobs._vocab_block(vocab)


@pytest.mark.parametrize("save_logits", [False, True])
@pytest.mark.parametrize("chunk,vocab", [(4, V), (64, V), (16, 3072)])
def test_target_sets_share_a_softmax_values_and_grads_match_torch(chunk, vocab, save_logits):
    """K target sets over one log-softmax (prompt-shared rows), weighted per set and row as the
    DPO loss weights them: values and both gradients against torch autograd. A 3072 vocabulary
    takes the blocked logsumexp."""
    rng = np.random.default_rng(6)
    k = 2
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed = rng.normal(size=(D, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(k, B, T)).astype(np.int32)
    targets[:, :, :5] = -100
    targets[1, 0, 20:] = -100
    weight = rng.normal(size=(k, B)).astype(np.float32)

    def f(h, w):
        logp = logprobs.chunked_target_logps(h, w, jnp.asarray(targets), chunk=chunk,
                                           save_logits=save_logits)
        return (logp.sum(-1) * weight).sum(), logp

    (val, logp), (gh, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(hidden), jnp.asarray(unembed))
    ht = torch.tensor(hidden, requires_grad=True)
    wt = torch.tensor(unembed, requires_grad=True)
    logp_t = (ht @ wt).log_softmax(-1)
    tt = torch.as_tensor(targets, dtype=torch.long)
    picked = torch.stack([torch.gather(logp_t, 2, tt[i].clamp(min=0).unsqueeze(-1)).squeeze(-1)
                          * (tt[i] != -100) for i in range(k)])
    ref = (picked.sum(-1) * torch.as_tensor(weight)).sum()
    ref.backward()
    np.testing.assert_allclose(np.asarray(logp), picked.detach().numpy(), rtol=1e-5, atol=1e-4)
    assert float(val) == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(gh), ht.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), wt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_sft_loss_matches_torch_cross_entropy():
    logits, labels = _random_batch(4)
    logps = logprobs.sequence_logps(jnp.asarray(logits), jnp.asarray(labels))
    loss, n_tok = losses.sft_loss(logps, jnp.asarray(labels))
    lt = torch.as_tensor(logits)[:, :-1]
    yt = torch.as_tensor(labels, dtype=torch.long)[:, 1:]
    per_tok = F.cross_entropy(lt.reshape(-1, V), yt.reshape(-1), ignore_index=-100, reduction="none")
    ref = per_tok.reshape(B, T - 1).sum(-1).mean().item()
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert int(n_tok) == int((yt != -100).sum())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_matches_torch(loss_type, beta, ls):
    rng = np.random.default_rng(5)
    pc, pr, rc, rr = (rng.normal(-60, 15, size=8).astype(np.float32) for _ in range(4))
    ours = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls, loss_type=loss_type)
    ref = torch_dpo(pc, pr, rc, rr, beta, ls, loss_type)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(o), r.numpy(), rtol=1e-5, atol=1e-5)
    diff = max(float(np.abs(np.asarray(o) - r.numpy()).max()) for o, r in zip(ours, ref))
    print(f"dpo {loss_type} beta={beta} ls={ls} max abs diff vs torch: {diff:.2e}")


def test_label_smoothing_changes_loss_and_is_symmetric_at_half_point():
    pc, pr, rc, rr = (jnp.array([x]) for x in (-10.0, -20.0, -12.0, -18.0))
    plain, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    smooth, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.3)
    h = (-10 + 20) - (-12 + 18)
    sig = 1 / (1 + math.exp(-0.1 * h))
    assert float(plain[0]) == pytest.approx(-math.log(sig), rel=1e-6)
    assert float(smooth[0]) == pytest.approx(-0.7 * math.log(sig) - 0.3 * math.log(1 - sig), rel=1e-6)


def test_first_step_property():
    """Policy == reference: loss ln 2, rewards and margins 0, accuracy 0 (ties are not wins)."""
    logits, labels = _random_batch(6)
    lp = logprobs.sequence_logps(jnp.asarray(logits), jnp.asarray(labels))
    chosen, rejected = losses.split_pairs(lp)
    out = losses.dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    m = losses.dpo_metrics(*out, chosen, rejected)
    assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-7)
    assert float(m["rewards/margins"]) == 0.0
    assert float(m["rewards/chosen"]) == 0.0 and float(m["rewards/rejected"]) == 0.0
    assert float(m["rewards/accuracies"]) == 0.0
    assert float(m["logps/chosen"]) == pytest.approx(float(chosen.mean()), rel=1e-6)


def test_dpo_metrics_match_trl_definitions():
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.normal(-50, 10, size=6).astype(np.float32) for _ in range(4))
    m = losses.dpo_metrics(*losses.dpo_loss(pc, pr, rc, rr, beta=0.1), pc, pr)
    loss_t, cr, rj = torch_dpo(pc, pr, rc, rr, 0.1, 0.0, "sigmoid")
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected"}
    assert float(m["loss"]) == pytest.approx(loss_t.mean().item(), rel=1e-5)
    assert float(m["rewards/accuracies"]) == pytest.approx((cr > rj).double().mean().item())
    assert float(m["rewards/margins"]) == pytest.approx((cr - rj).mean().item(), rel=1e-4, abs=1e-5)
    assert float(m["logps/rejected"]) == pytest.approx(float(pr.mean()), rel=1e-6)


def test_dpo_gradient_matches_torch():
    rng = np.random.default_rng(8)
    pc, pr, rc, rr = (rng.normal(-30, 5, size=5).astype(np.float64) for _ in range(4))
    g = jax.grad(lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=0.1)[0].mean(), argnums=(0, 1))(
        jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32)
    )
    a = torch.tensor(pc, requires_grad=True)
    b = torch.tensor(pr, requires_grad=True)
    torch_dpo(a, b, rc, rr, 0.1, 0.0, "sigmoid")[0].mean().backward()
    np.testing.assert_allclose(np.asarray(g[0]), a.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[1]), b.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_unknown_loss_type_raises():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")


def test_chunked_never_holds_full_logits():
    """XLA's own buffer accounting: forward+backward temp memory stays below one [B,T,V] fp32."""
    b, t, v, d = 2, 512, 32000, 64
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    lab = jax.ShapeDtypeStruct((b, t), jnp.int32)
    full_logits_bytes = b * t * v * 4

    def chunked(h, w, lab):
        return logprobs.chunked_sequence_logps(h, w, lab, chunk=64).sum()

    def full(h, w, lab):
        return logprobs.sequence_logps(jnp.einsum("btd,dv->btv", h, w), lab).sum()

    def temp_bytes(f):
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w, lab).compile() \
            .memory_analysis().temp_size_in_bytes

    lean, fat = temp_bytes(chunked), temp_bytes(full)
    print(f"grad temp memory: chunked {lean / 1e6:.1f} MB, full {fat / 1e6:.1f} MB, "
          f"one [B,T,V] fp32 {full_logits_bytes / 1e6:.1f} MB")
    assert fat >= full_logits_bytes  # the accounting does see the full logits when they exist
    assert lean < full_logits_bytes / 2


def test_chunks_are_evened_out_not_padded():
    """A 192-position window in chunks of 128 forms its logits as 2 x 96 positions (one
    [b * 96, v] product a chunk): the vocabulary matmuls see no padding rows (the values are
    checked against torch above)."""
    b, t, d, v = 2, 192, 16, 101
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tgt = jax.ShapeDtypeStruct((1, b, t), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda h, w, tgt: logprobs.chunked_target_logps(h, w, tgt, chunk=128))(h, w, tgt)
    shapes = {tuple(e.outvars[0].aval.shape) for e in _all_eqns(jaxpr.jaxpr)
              if e.primitive.name == "dot_general"}
    assert shapes == {(b * 96, v)}, shapes


def _all_eqns(jaxpr):
    """Equations of a jaxpr and of every jaxpr nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


# ----- SimPO, ORPO, score-margin DPO against the papers' formulas written out in torch ------
def _pairs(seed, n=16):
    """Summed response log-probs and lengths shaped like real ones: mean token log-prob in
    [-3, -0.05] (so P(y) = exp(mean) stays away from 0 and 1, where the torch form is exact)."""
    rng = np.random.default_rng(seed)
    len_c, len_r = (rng.integers(1, 200, size=n).astype(np.int32) for _ in range(2))
    pc = (rng.uniform(-3, -0.05, size=n) * len_c).astype(np.float32)
    pr = (rng.uniform(-3, -0.05, size=n) * len_r).astype(np.float32)
    return pc, pr, len_c, len_r


def _f64(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)


def torch_simpo(pc, pr, len_c, len_r, beta, gamma):
    """SimPO eq. 6: -log s(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)."""
    pc, pr, lc, lr = (_f64(x) for x in (pc, pr, len_c, len_r))
    return -F.logsigmoid(beta / lc * pc - beta / lr * pr - gamma)


def torch_orpo(pc, pr, len_c, len_r, lam):
    """ORPO eqs. 1-7: P_theta(y|x) = exp(1/m sum_t log P(y_t|x, y_<t)); odds = P / (1 - P);
    L = L_SFT - lam * log s(log(odds(y_w) / odds(y_l))), L_SFT the chosen response's NLL
    averaged over its tokens."""
    pc, pr, lc, lr = (_f64(x) for x in (pc, pr, len_c, len_r))
    p_w, p_l = torch.exp(pc / lc), torch.exp(pr / lr)
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
    l_sft = -pc / lc
    return l_sft - lam * F.logsigmoid(torch.log(odds_w / odds_l))


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0), (10.0, 3.0)])
def test_simpo_loss_matches_torch(beta, gamma):
    pc, pr, len_c, len_r = _pairs(11)
    ours, rew_c, rew_r = losses.simpo_loss(pc, pr, len_c, len_r, beta=beta, gamma=gamma)
    ref = torch_simpo(pc, pr, len_c, len_r, beta, gamma).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rew_c), beta * pc / len_c, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rew_r), beta * pr / len_r, rtol=1e-6)
    print(f"simpo beta={beta} gamma={gamma} max abs diff vs torch: {np.abs(np.asarray(ours) - ref).max():.2e}")


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0])
def test_orpo_loss_matches_torch(lam):
    pc, pr, len_c, len_r = _pairs(12)
    ours, rew_c, _, nll = losses.orpo_loss(pc, pr, len_c, len_r, lam=lam)
    ref = torch_orpo(pc, pr, len_c, len_r, lam).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(nll), -pc / len_c, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rew_c), lam * pc / len_c, rtol=1e-6)
    print(f"orpo lam={lam} max abs diff vs torch: {np.abs(np.asarray(ours) - ref).max():.2e}")


def test_orpo_and_simpo_gradients_match_torch():
    pc, pr, len_c, len_r = _pairs(13, n=6)
    for name, ours_fn, ref_fn in (
        ("simpo", lambda a, b: losses.simpo_loss(a, b, len_c, len_r, beta=2.0, gamma=0.5)[0],
         lambda a, b: torch_simpo(a, b, len_c, len_r, 2.0, 0.5)),
        ("orpo", lambda a, b: losses.orpo_loss(a, b, len_c, len_r, lam=0.2)[0],
         lambda a, b: torch_orpo(a, b, len_c, len_r, 0.2)),
    ):
        g = jax.grad(lambda a, b: ours_fn(a, b).mean(), argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
        a = torch.tensor(pc.astype(np.float64), requires_grad=True)
        b = torch.tensor(pr.astype(np.float64), requires_grad=True)
        ref_fn(a, b).mean().backward()
        np.testing.assert_allclose(np.asarray(g[0]), a.grad.numpy(), rtol=1e-4, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(np.asarray(g[1]), b.grad.numpy(), rtol=1e-4, atol=1e-8, err_msg=name)


def test_log1m_exp_is_accurate_at_both_ends():
    x = np.array([-1e-7, -1e-3, -0.5, -0.7, -5.0, -50.0], np.float64)
    ours = np.asarray(losses.log1m_exp(jnp.asarray(x, jnp.float32)))
    ref = torch.log(-torch.expm1(torch.as_tensor(x))).numpy()  # exact in float64
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-20)


@pytest.mark.parametrize("margin_scale", [0.0, 0.5, 2.0])
def test_score_margin_dpo_matches_torch(margin_scale):
    """Ours: -log s(beta h - margin_scale * (score_rejected - score_chosen)); scale 0 = DPO."""
    rng = np.random.default_rng(14)
    pc, pr, rc, rr = (rng.normal(-60, 15, size=8).astype(np.float32) for _ in range(4))
    s_c, s_r = rng.choice([1.0, 2.0, 3.0], 8), rng.choice([1.0, 2.0, 3.0], 8)
    gap = (s_r - s_c).astype(np.float32)
    ours, rew_c, rew_r = losses.score_margin_dpo_loss(pc, pr, rc, rr, gap, beta=0.1,
                                                      margin_scale=margin_scale)
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)
    h = (t(pc) - t(pr)) - (t(rc) - t(rr))
    ref = -F.logsigmoid(0.1 * h - margin_scale * t(gap))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)
    _, ref_c, ref_r = torch_dpo(pc, pr, rc, rr, 0.1, 0.0, "sigmoid")
    np.testing.assert_allclose(np.asarray(rew_c), ref_c.numpy(), rtol=1e-5, atol=1e-5)
    if margin_scale == 0.0:
        np.testing.assert_allclose(np.asarray(ours),
                                   np.asarray(losses.dpo_loss(pc, pr, rc, rr, beta=0.1)[0]), rtol=1e-6)

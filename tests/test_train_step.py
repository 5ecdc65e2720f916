"""The jitted train step against a PyTorch DPO/SFT step, sharded vs single device, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosa_jax import sharding as shd
from cosa_jax.models import load_hf
from cosa_jax.train import logprobs, optim
from cosa_jax.train import data as td
from cosa_jax.train import step as ts
from cosa_jax.train.batches import SftBatch, TwoRowBatch
from cosa_jax.testing.model_fixtures import make_hf_model

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_train")
    make_hf_model(path, seed=11)
    return path


def assert_params_close(p1, p2):
    """Summation order differs (sharded reductions, micro-batches), and early RMSprop updates are
    sign-like, so an element with a ~0 gradient may move differently; everything else must
    agree far below one update (~1e-2 at lr 1e-3)."""
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
        assert np.quantile(diff, 0.999) < 1e-5 and diff.max() < 3e-4


def pair_batch(n_pairs, seed, t=24):
    """Concatenated DPO layout: chosen rows, then rejected rows; prompts masked with -100."""
    rng = np.random.default_rng(seed)
    rows = 2 * n_pairs
    ids = np.zeros((rows, t), np.int32)
    mask = np.zeros((rows, t), np.int32)
    labels = np.full((rows, t), -100, np.int32)
    for i in range(n_pairs):
        p = int(rng.integers(4, 10))
        prompt = rng.integers(3, VOCAB, p)
        for r, row in enumerate((i, n_pairs + i)):
            n = int(rng.integers(p + 3, t + 1))
            ids[row, :p] = prompt
            ids[row, p:n] = rng.integers(3, VOCAB, n - p)
            mask[row, :n] = 1
            labels[row, p:n] = ids[row, p:n]
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
    return TwoRowBatch(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos)


def sft_rows(batch, n):
    """The first n rows of a row batch as an SFT batch."""
    return SftBatch(input_ids=batch.input_ids[:n], attention_mask=batch.attention_mask[:n],
                    labels=batch.labels[:n], position_ids=batch.position_ids[:n])


def shared_batch(batch):
    """The same pairs in the prompt-shared layout (one row per pair), built by the data module."""
    n = batch.input_ids.shape[0] // 2
    examples = []
    for i in range(n):
        rows = [batch.input_ids[r][batch.attention_mask[r] == 1] for r in (i, n + i)]
        p = int(np.argmax(batch.labels[i] != -100))
        examples.append(td.TokenizedExample(tuple(rows[0][:p].tolist()),
                                            tuple(tuple(r[p:].tolist()) for r in rows), False))
    return td.collate_prompt_shared(examples, pad_id=0, pad_multiple=8)


def jax_run(path, batches, *, mode="dpo", lr=1e-3, warmup=2, grad_accum=1, mesh_shape=None,
            **loss_kw):
    model, cfg = load_hf(path)
    tx = optim.make_optimizer(lr, warmup, clip_norm=1.0)
    loss_cfg = ts.LossConfig(mode=mode, **loss_kw)
    params = model.params()
    ref = jax.tree.map(jnp.copy, params) if loss_cfg.needs_reference else None
    state = ts.init_state(params, tx, 0)
    step_fn = ts.make_train_step(cfg, loss_cfg, tx, optim.warmup_schedule(lr, warmup))
    if mesh_shape is not None:
        mesh = shd.make_mesh(mesh_shape)
        state_sh = ts.state_shardings(jax.eval_shape(lambda: state), tx, mesh)
        state = jax.device_put(state, state_sh)
        if ref is not None:
            ref = jax.device_put(ref, state_sh["params"])
        example = ts.to_micro_batches(batches[0], grad_accum)
        jitted = ts.jit_train_step(step_fn, mesh, state_sh, example, with_ref=ref is not None)
    else:
        jitted = jax.jit(step_fn)
    history = []
    for batch in batches:
        micro = ts.to_micro_batches(batch, grad_accum)
        state, metrics = jitted(state, ref, micro)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(state["params"]), history, cfg


# ------------------------------------------------------------------------- torch reference
def torch_run(path, batches, *, mode="dpo", lr=1e-3, warmup=2, beta=0.1, loss_type="sigmoid",
              gaps=None, simpo=(2.0, 1.0), orpo_lambda=0.1, margin_scale=0.5):
    """The reference recipe written directly in PyTorch: summed response log-probs, DPO sigmoid
    loss, clip_grad_norm_, torch.optim.RMSprop and LambdaLR with the +1 warm-up. Other
    ``loss_type``s from their papers' formulas: SimPO, ORPO (length = scored tokens), and our
    score_margin (``gaps`` per pair, one array per batch)."""
    from transformers import AutoModelForCausalLM
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opt = torch.optim.RMSprop(policy.parameters(), lr=lr, alpha=0.99, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / (warmup + 1)))

    def seq_logps(model, b):
        ids = torch.as_tensor(b.input_ids, dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(b.attention_mask)).logits
        labels = torch.as_tensor(b.labels, dtype=torch.long)[:, 1:]
        logp = logits[:, :-1].float().log_softmax(-1)
        keep = labels != -100
        picked = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(-1)

    losses = []
    for i, b in enumerate(batches):
        opt.zero_grad()
        lp = seq_logps(policy, b)
        n = lp.shape[0] // 2
        length = (torch.as_tensor(b.labels)[:, 1:] != -100).sum(-1).double()
        if mode == "dpo" and loss_type == "simpo":
            sb, sg = simpo
            r = sb * lp.double() / length
            loss = -F.logsigmoid(r[:n] - r[n:] - sg).mean()
        elif mode == "dpo" and loss_type == "orpo":
            p = torch.exp(lp.double() / length)          # length-normalised likelihood
            odds = p / (1 - p)
            loss = (-lp[:n].double() / length[:n]
                    - orpo_lambda * F.logsigmoid(torch.log(odds[:n] / odds[n:]))).mean()
        elif mode == "dpo" and loss_type == "score_margin":
            with torch.no_grad():
                rlp = seq_logps(reference, b)
            h = (lp[:n] - lp[n:]) - (rlp[:n] - rlp[n:])
            gap = torch.as_tensor(gaps[i], dtype=torch.float32)
            loss = -F.logsigmoid(beta * h - margin_scale * gap).mean()
        elif mode == "dpo":
            with torch.no_grad():
                rlp = seq_logps(reference, b)
            h = (lp[:n] - lp[n:]) - (rlp[:n] - rlp[n:])
            loss = -F.logsigmoid(beta * h).mean()
        else:
            loss = -lp.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return policy, losses


@pytest.mark.parametrize("mode", ["dpo", "sft", "dpo-windows", "sft-windows", "dpo-prompt-shared"])
def test_three_steps_match_pytorch_reference(tiny, mode):
    """Windows project only the response positions onto the vocabulary; the prompt-shared
    layout runs each prompt once. PyTorch sees the usual rows and full logits every time."""
    batches = [pair_batch(3, seed=s) for s in range(3)]
    if mode.startswith("sft"):
        batches = [sft_rows(b, 3) for b in batches]
    ours_batches = batches
    if mode.endswith("-windows"):
        ours_batches = [td.add_response_windows(b, window_multiple=1) for b in batches]
        assert ours_batches[0].targets.shape[1] < batches[0].labels.shape[1] - 1
    elif mode.endswith("-prompt-shared"):
        ours_batches = [shared_batch(b) for b in batches]
    mode = mode.split("-")[0]
    params, history, cfg = jax_run(tiny, ours_batches, mode=mode)
    policy, ref_losses = torch_run(tiny, batches, mode=mode)
    ours = [h["loss"] for h in history]
    print(f"{mode} losses jax {ours} torch {ref_losses}")
    np.testing.assert_allclose(ours, ref_losses, rtol=2e-4, atol=1e-5)
    if mode == "dpo":
        assert abs(ours[0] - np.log(2)) < 1e-6 and abs(history[0]["rewards/margins"]) < 1e-6
    sd = policy.state_dict()
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    ours_q = np.asarray(params["layers"]["q_proj"][1]).reshape(cfg.hidden_size, -1).T
    down = sd["model.layers.2.mlp.down_proj.weight"].numpy()
    ours_down = np.asarray(params["layers"]["down_proj"][2]).T
    emb = sd["model.embed_tokens.weight"].numpy()
    for theirs, mine in ((q, ours_q), (down, ours_down), (emb, np.asarray(params["embed_tokens"]))):
        # Early RMSprop steps are sign-like (|update| ~ 10 lr = 1e-2 per step), so an element
        # whose gradient is ~0 may flip; the bulk must agree to far below one step.
        diff = np.abs(theirs - mine)
        assert np.quantile(diff, 0.999) < 2e-5 and diff.max() < 3e-4


def test_first_dpo_step_is_ln2_with_zero_margin(tiny):
    _, history, _ = jax_run(tiny, [pair_batch(4, seed=5)])
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_grad_accumulation_equals_one_big_batch(tiny):
    batches = [pair_batch(4, seed=s) for s in (7, 8)]
    p1, h1, _ = jax_run(tiny, batches, grad_accum=1)
    p2, h2, _ = jax_run(tiny, batches, grad_accum=2)
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert [h[key] for h in h1] == pytest.approx([h[key] for h in h2], rel=1e-4, abs=1e-6)
    # Step 1 rewards are ~0 (ties decided by rounding); after one update they are real.
    assert h1[1]["rewards/accuracies"] == h2[1]["rewards/accuracies"]
    assert_params_close(p1, p2)


@pytest.mark.parametrize("layout", ["concatenated", "windows", "prompt-shared"])
@pytest.mark.parametrize("mesh_shape", [(1, 4, 1), (2, 2, 1)])
def test_sharded_step_equals_single_device(tiny, mesh_shape, layout):
    batches = [pair_batch(4, seed=s) for s in (9, 10)]
    if layout == "windows":
        batches = [td.add_response_windows(b, window_multiple=8) for b in batches]
    elif layout == "prompt-shared":
        batches = [shared_batch(b) for b in batches]
    p1, h1, _ = jax_run(tiny, batches)
    p2, h2, _ = jax_run(tiny, batches, mesh_shape=mesh_shape)
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], rel=1e-5, abs=1e-6)
    assert_params_close(p1, p2)


def test_dozens_of_steps_raise_accuracy_and_margin(tiny):
    batch = pair_batch(6, seed=12)
    _, history, _ = jax_run(tiny, [batch] * 30, lr=3e-4)
    first, last = history[0], history[-1]
    assert last["rewards/accuracies"] == 1.0
    assert last["rewards/margins"] > 1.0 > first["rewards/margins"]
    assert last["loss"] < 0.3 * first["loss"]


def test_nonfinite_update_is_skipped(tiny):
    model, cfg = load_hf(tiny)
    tx = optim.make_optimizer(1e-3, 0)
    params = model.params()
    params["norm"] = params["norm"].at[0].set(jnp.nan)
    state = ts.init_state(params, tx, 0)
    step_fn = jax.jit(ts.make_train_step(cfg, ts.LossConfig(mode="sft"), tx))
    batch = ts.to_micro_batches(sft_rows(pair_batch(2, seed=1), 2), 1)
    new_state, metrics = step_fn(state, None, batch)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new_state["step"]) == 0
    np.testing.assert_array_equal(np.asarray(new_state["params"]["embed_tokens"]),
                                  np.asarray(params["embed_tokens"]))


def test_bad_loss_config_is_named():
    with pytest.raises(ValueError, match="train.mode"):
        ts.LossConfig(mode="ppo")
    with pytest.raises(ValueError, match="dpo.loss_type"):
        ts.LossConfig(loss_type="kto")


def test_bf16_compute_shortcuts_keep_the_numbers(tiny):
    """Two memory/bandwidth shortcuts of mixed precision (fp32 master, bf16 compute) must not
    change a number: the reference stored in bf16 (``reference_params``) and the layers cast
    once per step, differentiated as bf16 (``with_compute_layers``). The forward casts every
    weight to bf16 before use either way, and the cast's VJP only widens the bf16 cotangent."""
    model, cfg = load_hf(tiny, compute_dtype="bfloat16")
    params = model.params()
    micro = jax.tree.map(lambda x: x[0], ts.to_micro_batches(shared_batch(pair_batch(4, seed=3)), 1))
    ref_bf16 = ts.reference_params(params, cfg)
    assert {x.dtype for x in jax.tree.leaves(ref_bf16)} == {jnp.dtype(jnp.bfloat16)}
    logps = jax.jit(lambda p: logprobs.pair_logps(p, cfg, micro, 128))
    for a, b in zip(logps(params), logps(ref_bf16)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    loss_cfg = ts.LossConfig(mode="dpo")
    grad = jax.jit(jax.grad(lambda p: ts.loss_and_metrics(p, ref_bf16, micro, cfg, loss_cfg)[0]))
    g_master = grad(params)
    g_hoisted = grad(ts.with_compute_layers(params, cfg))
    assert g_hoisted["layers"]["q_proj"].dtype == jnp.bfloat16
    assert g_hoisted["embed_tokens"].dtype == jnp.float32
    # Equal up to bf16 rounding of the layer gradients: on XLA:CPU the master-weight path may
    # keep the dW products in fp32 (excess precision); the hoisted path rounds them to bf16 as
    # PyTorch autocast does. Every other leaf is bit-identical.
    def compare(path, a, b):
        a, b = np.asarray(a), np.asarray(b, np.float32)
        if path[0].key == "layers":
            scale = np.abs(a).max()
            np.testing.assert_allclose(b, a, rtol=8e-3, atol=1e-2 * scale, err_msg=str(path))
            assert np.abs(b - a).mean() < 2e-3 * np.abs(a).mean()
        else:
            np.testing.assert_array_equal(b, a, err_msg=str(path))

    jax.tree_util.tree_map_with_path(compare, g_master, g_hoisted)


@pytest.mark.parametrize("loss_type,layout", [("simpo", "windows"), ("orpo", "prompt-shared"),
                                              ("orpo", "concatenated"),
                                              ("score_margin", "prompt-shared")])
def test_other_objectives_match_pytorch_formulas(tiny, loss_type, layout):
    """Three steps of SimPO / ORPO (reference-free: no reference passed at all) and our
    score-margin DPO against PyTorch steps on the papers' formulas; response lengths come
    from the batch's targets, score gaps ride along as per-pair values."""
    batches = [pair_batch(3, seed=s) for s in range(20, 23)]
    gaps = [np.asarray([2.0, 0.0, 1.0], np.float32) + s for s in range(3)]
    ours = batches
    if layout == "windows":
        ours = [td.add_response_windows(b, window_multiple=1) for b in batches]
    elif layout == "prompt-shared":
        ours = [shared_batch(b) for b in batches]
    if loss_type == "score_margin":
        ours = [b.replace(pair_score_gap=g) for b, g in zip(ours, gaps)]
    kw = dict(simpo_beta=2.5, simpo_gamma=0.5, orpo_lambda=0.3, margin_scale=0.7)
    _, history, _ = jax_run(tiny, ours, loss_type=loss_type, **kw)
    _, ref_losses = torch_run(tiny, batches, loss_type=loss_type, gaps=gaps, simpo=(2.5, 0.5),
                              orpo_lambda=0.3, margin_scale=0.7)
    got = [h["loss"] for h in history]
    print(f"{loss_type} {layout} losses jax {got} torch {ref_losses}")
    np.testing.assert_allclose(got, ref_losses, rtol=2e-4, atol=1e-5)
    assert ts.LossConfig(loss_type=loss_type).needs_reference == (loss_type == "score_margin")


def test_bf16_gradients_track_fp32_gradients(tiny):
    """train.grad_dtype='bfloat16' rounds the accumulated and averaged gradients to bf16: the
    losses and updates follow the fp32 run to bf16 rounding (RMSprop's fp32 moments and
    master weights are untouched)."""
    batches = [pair_batch(4, seed=s) for s in (30, 31, 32)]
    p32, h32, _ = jax_run(tiny, batches, grad_accum=2)
    p16, h16, _ = jax_run(tiny, batches, grad_accum=2, grad_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in h16], [h[key] for h in h32], rtol=1e-2)
    assert [h["loss"] for h in h16] != [h["loss"] for h in h32] or \
        [h["grad_norm"] for h in h16] != [h["grad_norm"] for h in h32], "bf16 must change bits"
    # Per element the three updates moved weights by up to ~3e-2 (early RMSprop steps are
    # sign-like, 10 lr each); bf16 gradients may flip a ~0 element, the bulk agrees to ~1 %.
    p0 = load_hf(tiny)[0].params()
    for w0, a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p32), jax.tree.leaves(p16)):
        u32, u16 = np.asarray(a) - np.asarray(w0), np.asarray(b) - np.asarray(w0)
        diff = np.abs(u16 - u32)
        assert np.quantile(diff, 0.99) < 0.02 * np.abs(u32).max(), (np.quantile(diff, 0.99),
                                                                     np.abs(u32).max())
        assert np.abs(diff).mean() < 0.02 * np.abs(u32).mean()

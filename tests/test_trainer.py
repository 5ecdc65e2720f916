"""launch.train end to end: outputs, SIGKILL + restart equals an uninterrupted run, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cosa_jax.train import config as tc
from cosa_jax.train.metrics_log import read_metrics
from cosa_jax.train.trainer import Trainer
from cosa_jax.testing.model_fixtures import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


def cli(model, out, *extra):
    return [sys.executable, "-m", "launch.train", "--config", str(ROOT / "configs" / "demo.py"),
            f"--config.model.path={model}", f"--config.output_dir={out}",
            "--config.train.max_steps=6", "--config.train.batch_size=2",
            "--config.checkpoint.every=2", "--config.data.eval_pairs=2",
            "--config.train.lr=1e-3", *extra]


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e.pop("XLA_FLAGS", None)
    return e


def losses(out: Path):
    records = read_metrics(out / "metrics.jsonl")  # a kill can leave a torn last line
    train = [r for r in records if "loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train]


def test_sigkill_and_restart_equals_uninterrupted_run(tiny_chat, tmp_path):
    full = tmp_path / "full"
    subprocess.run(cli(tiny_chat, full), check=True, cwd=ROOT, env=env(), capture_output=True)
    steps_full, loss_full = losses(full)
    assert steps_full == [1, 2, 3, 4, 5, 6]
    assert (full / "curves.png").stat().st_size > 0
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    assert (full / "hf" / "config.json").exists()

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(tiny_chat, killed), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        # Step 2's asynchronous save must be committed (its directory renamed from the tmp
        # name), or under load the restart could rightly begin from scratch.
        if (metrics.exists() and len(metrics.read_text().splitlines()) >= 3
                and (killed / "checkpoints" / "2").is_dir()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before, _ = losses(killed)
    assert 3 <= len(steps_before) < 6, "the kill must land mid-run"

    resumed = subprocess.run(cli(tiny_chat, killed), check=True, cwd=ROOT, env=env(),
                             capture_output=True, text=True)
    assert "resumed from" in resumed.stdout
    steps_resumed, loss_resumed = losses(killed)
    print(f"killed after step {steps_before[-1]}; full {loss_full}; resumed {loss_resumed}")
    assert steps_resumed == [1, 2, 3, 4, 5, 6]  # each step logged exactly once
    np.testing.assert_allclose(loss_resumed, loss_full, rtol=1e-6, atol=1e-7)


def small_config(model, out, **train):
    c = tc.default_config()
    c.model.path = str(model)
    c.model.compute_dtype = "float32"
    c.output_dir = str(out)
    c.data.train = "bundled:mini_prefs.jsonl"
    c.data.eval = "bundled:mini_prefs_dev.jsonl"
    c.data.eval_pairs = 2
    c.data.max_length = 256
    c.data.max_prompt_length = 192
    c.train.max_steps = 2
    c.train.batch_size = 2
    c.train.grad_accum = 1
    c.train.lr = 1e-3
    c.train.warmup_steps = 0
    c.checkpoint.every = 0
    for k, v in train.items():
        section, name = k.split("__")
        c[section][name] = v
    return c


def test_precomputed_reference_equals_in_step_reference(tiny_chat, tmp_path):
    """On 4 fake devices (fsdp=4): the cached reference log-probs give the same run."""
    a = Trainer(small_config(tiny_chat, tmp_path / "a")).run()
    b = Trainer(small_config(tiny_chat, tmp_path / "b", dpo__precompute_ref=True)).run()
    assert list((tmp_path / "b" / "ref_logps").glob("train-*.npy"))
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert a["train"][key] == pytest.approx(b["train"][key], rel=1e-4, abs=1e-6)
    assert a["eval"]["eval/loss"] == pytest.approx(b["eval"]["eval/loss"], rel=1e-4)


def test_prompt_shared_rows_equal_concatenated_rows(tiny_chat, tmp_path):
    """dpo.share_prompt runs each prompt once; losses, rewards and gradients are unchanged."""
    a = Trainer(small_config(tiny_chat, tmp_path / "a", train__batch_size=4,
                             data__eval_pairs=4)).run()
    b = Trainer(small_config(tiny_chat, tmp_path / "b", train__batch_size=4, data__eval_pairs=4,
                             dpo__share_prompt=True)).run()
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert a["train"][key] == pytest.approx(b["train"][key], rel=1e-4, abs=1e-5)
    assert a["eval"]["eval/loss"] == pytest.approx(b["eval"]["eval/loss"], rel=1e-4)
    with pytest.raises(tc.TrainConfigError, match="prompt-shared row per pair"):
        Trainer(small_config(tiny_chat, tmp_path / "c", train__batch_size=2, dpo__share_prompt=True))


def test_sft_mode_runs_and_exports(tiny_chat, tmp_path):
    from transformers import AutoModelForCausalLM
    out = Trainer(small_config(tiny_chat, tmp_path / "sft", train__mode="sft", train__batch_size=4)).run()
    assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
    assert "rewards/chosen" not in out["train"]
    AutoModelForCausalLM.from_pretrained(out["hf_dir"])


def test_bad_config_values_name_the_key(tiny_chat, tmp_path):
    with pytest.raises(tc.TrainConfigError, match="train.batch_size.*grad_accum"):
        tc.validate(small_config(tiny_chat, tmp_path, train__batch_size=3, train__grad_accum=2))
    with pytest.raises(tc.TrainConfigError, match="train.mode"):
        tc.validate(small_config(tiny_chat, tmp_path, train__mode="ppo"))
    with pytest.raises(tc.TrainConfigError, match="data.train"):
        tc.validate(small_config(tiny_chat, tmp_path, data__train=""))
    with pytest.raises(tc.TrainConfigError, match="train.batch_size.*not divisible by data x fsdp"):
        Trainer(small_config(tiny_chat, tmp_path, train__batch_size=1))


def test_unknown_cli_key_is_rejected(tiny_chat, tmp_path):
    proc = subprocess.run(cli(tiny_chat, tmp_path / "x", "--config.train.lrr=1"), cwd=ROOT,
                          env=env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "lrr" in proc.stderr


def test_bad_data_row_names_file_and_line(tiny_chat, tmp_path):
    from cosa_jax.train.data import DataError
    bad = tmp_path / "bad.jsonl"
    good = (Path(__file__).resolve().parents[1] / "cosa_jax/data/mini_prefs.jsonl").read_text()
    lines = good.splitlines()[:4]
    row = json.loads(lines[2])
    del row["chosen_response"]
    lines[2] = json.dumps(row)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*3.*chosen_response"):
        Trainer(small_config(tiny_chat, tmp_path / "o", data__train=str(bad)))


def test_memory_plan_is_printed_and_an_unfittable_config_refused(tiny_chat, tmp_path, capsys):
    """XLA's per-device accounting of the compiled step; on CPU the check runs only with
    train.device_memory_gb set, and the refusal names the settings that would shrink it."""
    from cosa_jax.train import memory_plan
    trainer = Trainer(small_config(tiny_chat, tmp_path / "ok", train__max_steps=1))
    trainer.run()
    assert "memory plan per device" in capsys.readouterr().out
    plan = trainer.memory_plan
    # The state's own bytes on one device (fsdp=4) are among the step's arguments.
    import jax
    state_bytes = sum(s.data.nbytes for x in jax.tree.leaves(trainer.ref_params)
                      for s in x.addressable_shards if s.device == jax.local_devices()[0])
    assert plan.argument_bytes > state_bytes > 0 and plan.peak_bytes >= plan.argument_bytes
    assert plan.device_bytes is None  # CPU: memory_stats() has no limit

    too_small = plan.peak_bytes / memory_plan.GB / 2
    with pytest.raises(memory_plan.MemoryPlanError) as err:
        Trainer(small_config(tiny_chat, tmp_path / "no", train__device_memory_gb=too_small)).run()
    msg = str(err.value)
    for key in ("train.device_memory_gb", "model.remat", "train.grad_dtype", "dpo.precompute_ref",
                "train.grad_accum", "mesh.shape"):
        assert key in msg, (key, msg)
    # The same plan on a device of a given size: refused only above the headroom, and settings
    # already at their leanest are not suggested again.
    import dataclasses
    lean = small_config(tiny_chat, tmp_path, train__grad_dtype="bfloat16", dpo__precompute_ref=True)
    roomy = dataclasses.replace(plan, device_bytes=int(plan.peak_bytes / 0.9), device_source="test")
    memory_plan.check(roomy, lean)  # 90 % of the device, under the 95 % headroom
    lean.train.memory_headroom = 0.85
    with pytest.raises(memory_plan.MemoryPlanError, match="train.memory_headroom=0.85") as err:
        memory_plan.check(roomy, lean)
    assert "train.grad_dtype" not in str(err.value) and "dpo.precompute_ref" not in str(err.value)
    assert "model.remat" in str(err.value)


def test_score_margin_gaps_come_from_the_rows(tiny_chat, tmp_path):
    """First step, policy = reference (h = 0): the loss is mean -log s(-scale * gap) over the
    batch's pairs, the gaps read from the file's two error-score fields."""
    import math
    from cosa_jax.train.data import load_preference_rows
    scale = 0.7
    out = Trainer(small_config(tiny_chat, tmp_path / "m", train__max_steps=1, train__shuffle=False,
                               dpo__loss_type="score_margin", dpo__margin_scale=scale,
                               data__eval="")).run()
    rows = load_preference_rows("bundled:mini_prefs.jsonl")[:2]
    gaps = [r["rejected_category_error_score"] - r["chosen_category_error_score"] for r in rows]
    expected = sum(math.log1p(math.exp(scale * g)) for g in gaps) / len(gaps)
    assert out["train"]["loss"] == pytest.approx(expected, rel=1e-5)


def test_reference_free_objectives_hold_no_reference(tiny_chat, tmp_path):
    trainer = Trainer(small_config(tiny_chat, tmp_path / "s", train__max_steps=1,
                                   dpo__loss_type="simpo", dpo__precompute_ref=True))
    out = trainer.run()
    assert trainer.ref_params is None and not (tmp_path / "s" / "ref_logps").exists()
    assert np.isfinite(out["train"]["loss"]) and np.isfinite(out["eval"]["eval/loss"])
    with pytest.raises(tc.TrainConfigError, match="dpo.loss_type"):
        tc.validate(small_config(tiny_chat, tmp_path, dpo__loss_type="kto"))
    with pytest.raises(tc.TrainConfigError, match="dpo.label_smoothing"):
        tc.validate(small_config(tiny_chat, tmp_path, dpo__loss_type="orpo", dpo__label_smoothing=0.1))
    with pytest.raises(tc.TrainConfigError, match="train.grad_dtype"):
        tc.validate(small_config(tiny_chat, tmp_path, train__grad_dtype="float16"))
    with pytest.raises(tc.TrainConfigError, match="model.remat"):
        tc.validate(small_config(tiny_chat, tmp_path, model__remat="dots_saveable"))

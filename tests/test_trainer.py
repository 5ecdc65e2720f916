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
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
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

"""Checkpoints and metrics that survive kills and damage (issues 25 and 27).

End to end: real ``launch.train`` processes SIGKILLed at exact points of Orbax's asynchronous
save, its deletion of old steps and the HF export (cosa_jax.testing.kill_points), a truncated
newest checkpoint in between; the finished run must log every step and eval exactly once
with the losses of one uninterrupted run. In process: every damage kind of a step directory
falls back to the previous step with one line, or stops with one line naming the directory.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosa_jax.train import checkpoints as ckpt
from cosa_jax.train.data import DataPosition
from cosa_jax.train.metrics_log import MetricsLog, read_metrics
from cosa_jax.testing.model_fixtures import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ end to end, real kills
@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             # every process of this module compiles the same step: compile it once
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))
    e.pop("XLA_FLAGS", None)
    return e


def train_cmd(model, out, kill_at=None):
    head = ([sys.executable, "-m", "cosa_jax.testing.kill_points", kill_at] if kill_at
            else [sys.executable, "-m", "launch.train"])
    return [*head, "--config", str(ROOT / "configs" / "demo.py"),
            f"--config.model.path={model}", f"--config.output_dir={out}",
            "--config.train.max_steps=6", "--config.train.batch_size=2",
            "--config.checkpoint.every=2", "--config.checkpoint.keep=2",
            "--config.data.eval_pairs=2", "--config.train.lr=1e-3"]


def run(cmd, env, expect_killed=False):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_killed:
        assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def records(out: Path):
    rs = read_metrics(out / "metrics.jsonl")
    train = [r for r in rs if "loss" in r]
    evals = [r for r in rs if "loss" not in r]
    return train, evals


@pytest.fixture(scope="module")
def reference(tiny_chat, run_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run(train_cmd(tiny_chat, out), run_env)
    return out


def test_kills_during_saves_and_export_then_resume_equal_an_uninterrupted_run(
        tiny_chat, run_env, reference, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"

    # 1. Killed after step 4 was written, before Orbax renamed it: a tmp dir is left.
    run(train_cmd(tiny_chat, out, "before_finalize:4"), run_env, expect_killed=True)
    assert (ckpts / "2").is_dir() and not (ckpts / "4").exists()
    assert ckpt.unfinished_saves(ckpts), "the kill must leave step 4's tmp directory"

    # 2. Resumed from 2; killed while Orbax deletes step 2 after finalizing step 6.
    p = run(train_cmd(tiny_chat, out, "mid_delete:2"), run_env, expect_killed=True)
    skip_lines = [l for l in p.stdout.splitlines() if "skipping checkpoint" in l]
    assert len(skip_lines) == 1 and "unfinished save" in skip_lines[0], p.stdout
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert not ckpt.unfinished_saves(ckpts)
    assert ckpt.check_complete(ckpts / "2") is not None  # half deleted
    assert ckpt.check_complete(ckpts / "6") is None

    # 3. The newest checkpoint is damaged on disk: its largest array file is truncated.
    data_files = sorted((ckpts / "6" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    os.truncate(data_files[-1], data_files[-1].stat().st_size // 3)

    # 4. Resumed from 4 (6 skipped, one line); killed in the middle of the HF export.
    p = run(train_cmd(tiny_chat, out, "mid_export"), run_env, expect_killed=True)
    skip_lines = [l for l in p.stdout.splitlines() if "skipping checkpoint" in l]
    assert len(skip_lines) == 1, p.stdout
    assert f"{ckpts / '6'}:" in skip_lines[0] and "6.unusable" in skip_lines[0]
    assert "at step 4" in p.stdout
    assert (ckpts / "6.unusable").is_dir() and ckpt.check_complete(ckpts / "6") is None
    assert not (out / "hf").exists(), "a half-written export must not sit at hf/"

    # 5. Resumed at the last step: no step reruns, the final eval is not logged again.
    p = run(train_cmd(tiny_chat, out), run_env)
    assert "at step 6" in p.stdout and "skipping" not in p.stdout
    assert (out / "hf" / "config.json").exists() and not (out / "hf.partial").exists()
    assert sorted(int(s.name) for s in ckpts.iterdir() if s.name.isdigit()) == [4, 6]

    train, evals = records(out)
    ref_train, ref_evals = records(reference)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    assert [r["step"] for r in evals] == [6]                  # the final eval exactly once
    np.testing.assert_allclose([r["loss"] for r in train], [r["loss"] for r in ref_train],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(evals[0]["eval/loss"], ref_evals[0]["eval/loss"], rtol=1e-6)
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    assert summary["eval"]["eval/loss"] == pytest.approx(ref_evals[0]["eval/loss"], rel=1e-6)


def test_no_usable_checkpoint_stops_with_one_line_naming_the_directory(
        tiny_chat, run_env, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    for step in ("4", "6"):
        (out / "checkpoints" / step / "meta" / "metadata").write_text("{not json")
    p = subprocess.run(train_cmd(tiny_chat, out), cwd=ROOT, env=run_env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cosa-jax train: error: no usable checkpoint in ")
    assert str(out / "checkpoints") in last and "6, 4" in last
    assert sorted(s.name for s in (out / "checkpoints").iterdir()) == ["4", "6"]  # untouched
    assert not (out / "metrics.jsonl").exists()  # nothing restarted


# ------------------------------------------------------------------ damage kinds, in process
def small_state(step: int):
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"params": {"w": jnp.arange(4096, dtype=jnp.float32) * step,
                        "b": jnp.full((7,), float(step))},
             "step": jnp.int32(step)}
    state = jax.device_put(state, sh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
    return state, abstract


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
    """Steps 1, 2, 3 of a small state, saved asynchronously the way the trainer saves."""
    d = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    manager = ckpt.make_manager(d, keep=5, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(manager, step, small_state(step)[0], DataPosition(0, 2 * step), seed=0)
    manager.wait_until_finished()
    manager.close()
    return d


def largest(pattern):
    def pick(step_dir: Path) -> Path:
        return max((f for f in step_dir.glob(pattern) if f.is_file()), key=lambda f: f.stat().st_size)
    return pick


def truncate(pattern):
    def damage(step_dir):
        f = largest(pattern)(step_dir)
        os.truncate(f, f.stat().st_size // 2)
    return damage


def remove(pattern):
    return lambda step_dir: largest(pattern)(step_dir).unlink()


def garble(pattern):
    return lambda step_dir: largest(pattern)(step_dir).write_text('{"broken": ')


def empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def wrong_step(step_dir):
    (step_dir / "meta" / "metadata").write_text(json.dumps(
        {"data_position": {"epoch": 0, "index": 4}, "step": 2, "seed": 0}))


DAMAGE = {
    "truncated array file": truncate("state/ocdbt.process_0/d/*"),
    "missing array file": remove("state/ocdbt.process_0/d/*"),
    "missing array index": remove("state/manifest.ocdbt"),
    "corrupt state metadata": garble("state/_METADATA"),
    "missing meta json": remove("meta/metadata"),
    "corrupt meta json": garble("meta/metadata"),
    "meta of another step": wrong_step,
    "missing commit file (half deleted)": remove("commit_success.txt"),
    "empty step dir": empty,
}


def _restore_damaged(saved_steps, tmp_path, damage, *, async_save):
    """A copy of the saved steps with ``damage`` done to step 3, restored: (dir, log lines,
    manager, what restore_newest gave)."""
    d = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, d)
    damage(d / "3")
    lines = []
    manager = ckpt.make_manager(d, keep=5, async_save=async_save, log=lines.append)
    return d, lines, manager, ckpt.restore_newest(manager, small_state(0)[1], log=lines.append)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damage_kind_falls_back_to_the_previous_step(saved_steps, tmp_path, kind, capfd):
    d, lines, manager, restored = _restore_damaged(saved_steps, tmp_path, DAMAGE[kind], async_save=True)
    assert restored.step == 2 and restored.position == DataPosition(0, 4)
    np.testing.assert_array_equal(restored.state["params"]["w"], np.arange(4096) * 2.0)
    assert len(lines) == 1 and lines[0].startswith(f"[cosa-jax] skipping checkpoint {d / '3'}: ")
    assert lines[0].endswith("moved to 3.unusable") and len(lines[0]) < 500
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err
    # the run goes on from step 2 and can save step 3 again
    assert manager.all_steps() == [1, 2]
    ckpt.save(manager, 3, small_state(3)[0], DataPosition(0, 6), seed=0)
    manager.wait_until_finished()
    assert ckpt.restore_newest(manager, small_state(0)[1], log=lines.append).step == 3
    manager.close()


def test_unfinished_save_is_skipped_with_one_line(saved_steps, tmp_path):
    d, lines, manager, restored = _restore_damaged(
        saved_steps, tmp_path, lambda step: step.rename(step.with_name(f"3{ckpt.TMP_SUFFIX}-1234")),
        async_save=True)
    assert restored.step == 2
    assert len(lines) == 1 and "unfinished save" in lines[0] and f"3{ckpt.TMP_SUFFIX}" in lines[0]
    manager.wait_until_finished()
    manager.close()
    assert not ckpt.unfinished_saves(d)


WHOLE_DATA = {
    "corrupt step metadata (timestamps)": garble("_CHECKPOINT_METADATA"),
    "missing state metadata (the restore passes the tree)": remove("state/_METADATA"),
    "corrupt sharding metadata (the restore passes the shardings)": garble("state/_sharding"),
    "truncated per-process manifest": truncate("state/ocdbt.process_0/manifest.ocdbt"),
}


@pytest.mark.parametrize("kind", list(WHOLE_DATA))
def test_damage_to_files_the_restore_does_not_need_keeps_the_step(saved_steps, tmp_path, kind):
    """Restoring with the full abstract state does not read these: the data is whole, so the
    step is used, with its exact values."""
    _, lines, _, restored = _restore_damaged(saved_steps, tmp_path, WHOLE_DATA[kind], async_save=False)
    assert restored.step == 3 and lines == []
    np.testing.assert_array_equal(restored.state["params"]["w"], np.arange(4096) * 3.0)


def test_only_unfinished_saves_start_the_run_afresh_and_say_so(saved_steps, tmp_path):
    d = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, d)
    for step in ("1", "2"):
        shutil.rmtree(d / step)
    (d / "3").rename(d / f"3{ckpt.TMP_SUFFIX}-99")
    lines = []
    manager = ckpt.make_manager(d, keep=5, async_save=False, log=lines.append)
    assert ckpt.restore_newest(manager, small_state(0)[1], log=lines.append) is None
    assert len(lines) == 1 and "unfinished save" in lines[0]


def test_every_step_damaged_raises_one_line_and_moves_nothing(saved_steps, tmp_path):
    d = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, d)
    for step in ("1", "2", "3"):
        truncate("state/ocdbt.process_0/d/*")(d / step)
    manager = ckpt.make_manager(d, keep=5, async_save=False, log=print)
    with pytest.raises(ckpt.CheckpointRestoreError) as e:
        ckpt.restore_newest(manager, small_state(0)[1])
    message = str(e.value)
    assert "\n" not in message and str(d) in message and "3, 2, 1" in message
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", "3"]


# ------------------------------------------------------------------ metrics.jsonl
def write_lines(path: Path, lines):
    path.write_bytes(b"".join(lines))


def rec(step, **kv):
    return (json.dumps({"step": step, **kv}) + "\n").encode()


def test_resume_cuts_the_tail_past_the_restored_step_and_a_torn_line(tmp_path):
    kept = [rec(1, loss=1.0), rec(2, loss=2.0), rec(2, **{"eval/loss": 0.5})]
    write_lines(tmp_path / "metrics.jsonl", kept + [rec(3, loss=3.0), b'{"step": 4, "lo'])
    inode = (tmp_path / "metrics.jsonl").stat().st_ino
    log = MetricsLog(tmp_path, resume_step=2)
    # the kept bytes are the same file, not a rewrite
    assert (tmp_path / "metrics.jsonl").stat().st_ino == inode
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(kept)
    log.write(2, {"eval/loss": 0.5})  # already there: not written twice
    log.write(3, {"loss": 3.5})
    log.close()
    assert [(r["step"], "loss" in r) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, True), (2, True), (2, False), (3, True)]


def test_a_torn_last_line_is_dropped_even_below_the_restored_step(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [rec(1, loss=1.0), b'{"step": 2, "loss": 2'])
    MetricsLog(tmp_path, resume_step=5).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == rec(1, loss=1.0)


def test_resume_from_scratch_empties_the_log(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [rec(1, loss=1.0), rec(2, loss=2.0)])
    MetricsLog(tmp_path, resume_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


# ------------------------------------------------------------------ atomic outputs
def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    from cosa_jax.atomic_files import atomic_directory
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(hf) as partial:
            partial.mkdir()
            (partial / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-export")
    assert sorted(p.name for p in hf.iterdir()) == ["old.bin"]  # the old export stands
    with atomic_directory(hf) as partial:
        partial.mkdir()
        (partial / "model.safetensors").write_text("new")
    assert sorted(p.name for p in hf.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .partial, no .old

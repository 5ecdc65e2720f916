"""launch.train as 2 processes x 2 CPU devices (gloo collectives, a localhost coordinator):
the same losses as 1 process x 4 devices, and a SIGKILL of both processes resumes from their
multi-process Orbax checkpoint. Plus the layout detection every launcher goes through."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cosa_jax import distributed
from cosa_jax.train import config as tc
from cosa_jax.train.trainer import Trainer
from cosa_jax.testing.model_fixtures import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
OVERRIDES = {"train.max_steps": STEPS, "train.batch_size": 4, "checkpoint.every": 2,
             "data.eval_pairs": 4, "train.lr": 1e-3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(model, out, port):
    """Both processes of one run, as a launcher would start them (one command per process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "launch.train", "--config", str(ROOT / "configs" / "demo.py"),
               f"--config.model.path={model}", f"--config.output_dir={out}",
               *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        log = open(out.parent / f"{out.name}-p{pid}-{port}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    return procs


def wait_all(procs, timeout=600):
    for proc, log in procs:
        proc.wait(timeout=timeout)
        log.close()
    return [Path(log.name).read_text() for _, log in procs]


def train_losses(out: Path):
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_sigkill(tmp_path):
    model = make_tiny_chat_model(tmp_path / "tiny")
    two = tmp_path / "two"
    procs = launch_pair(model, two, free_port())

    # Meanwhile the 1 x 4 reference, in this process (conftest: 4 CPU devices).
    from configs.demo import get_config
    c = get_config()
    c.model.path, c.output_dir = str(model), str(tmp_path / "one")
    for k, v in OVERRIDES.items():
        section, name = k.split(".")
        c[section][name] = v
    Trainer(c).run()
    steps_one, loss_one = train_losses(tmp_path / "one")
    assert steps_one == list(range(1, STEPS + 1))

    deadline = time.time() + 400
    metrics = two / "metrics.jsonl"
    while time.time() < deadline and all(p.poll() is None for p, _ in procs):
        # Past step 3, with step 2's checkpoint committed (Orbax renames its temporary
        # directory to the step number once every process has written its part).
        if (metrics.exists() and len(metrics.read_text().splitlines()) >= 3
                and (two / "checkpoints" / "2").is_dir()):
            break
        time.sleep(0.2)
    for proc, _ in procs:
        proc.send_signal(signal.SIGKILL)
    wait_all(procs)
    steps_before, _ = train_losses(two)
    assert 3 <= len(steps_before) < STEPS, "the kill must land mid-run"

    logs = wait_all(launch_pair(model, two, free_port()))
    for pid, log in enumerate(logs):
        assert f"process {pid} of 2" in log, log[-3000:]
        assert "resumed from" in log, log[-3000:]
    steps_two, loss_two = train_losses(two)
    print(f"killed after step {steps_before[-1]}; 1x4 {loss_one}; 2x2 resumed {loss_two}")
    assert steps_two == steps_one  # each step logged once, by process 0 only
    # Same math; gloo's cross-process reductions may add in another order than one process.
    np.testing.assert_allclose(loss_two, loss_one, rtol=2e-5, atol=1e-6)
    assert (two / "hf" / "model.safetensors").exists()


def dist_cfg(**kw):
    c = tc.default_config().distributed
    c.update(kw)
    return c


def test_layout_from_config_env_and_slurm():
    assert distributed.detect(dist_cfg(), {}) is None
    assert distributed.detect(dist_cfg(initialize="no"), {"SLURM_NTASKS": "8"}) is None
    lay = distributed.detect(dist_cfg(coordinator_address="10.0.0.1:1234", num_processes=4,
                                      process_id=3), {})
    assert lay.initialize_kwargs() == {"coordinator_address": "10.0.0.1:1234",
                                       "num_processes": 4, "process_id": 3}
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.detect(dist_cfg(), env).initialize_kwargs() == {
        "coordinator_address": "h:9", "num_processes": 2, "process_id": 1}
    # Slurm and TPU pods: JAX's own detection fills the values (the launchers pass nothing).
    slurm = distributed.detect(dist_cfg(), {"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert slurm.initialize_kwargs() == {} and "slurm" in slurm.source
    assert distributed.detect(dist_cfg(), {"TPU_WORKER_HOSTNAMES": "a,b"}).initialize_kwargs() == {}
    assert distributed.detect(dist_cfg(initialize="yes"), {}).initialize_kwargs() == {}


def test_bad_layouts_name_the_key():
    with pytest.raises(distributed.DistributedConfigError, match="distributed.num_processes"):
        distributed.detect(dist_cfg(coordinator_address="h:1"), {})
    with pytest.raises(distributed.DistributedConfigError, match="distributed.process_id"):
        distributed.detect(dist_cfg(coordinator_address="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(distributed.DistributedConfigError, match="JAX_PROCESS_ID"):
        distributed.detect(dist_cfg(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": "one"})
    c = tc.default_config()
    c.data.train = "x.jsonl"
    c.distributed.num_processes, c.distributed.process_id = 2, 5
    with pytest.raises(tc.TrainConfigError, match="distributed.process_id"):
        tc.validate(c)


def test_launchers_go_through_launch_train():
    """Slurm and TPU scripts start the same entry point the two-process test runs."""
    for script in ("slurm_gpu.sbatch", "tpu_pod.sh"):
        text = (ROOT / "launch" / script).read_text()
        assert "python -m launch.train" in text
        assert "--config.distributed.initialize=" in text

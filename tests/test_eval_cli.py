"""``python -m launch.evaluate`` with the demo config against the scripted server, started here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosa_jax.testing.scripted_server import FakeChatServer, ScriptedReplies

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    with FakeChatServer(ScriptedReplies(judge_garbage_rate=0.05)) as srv:  # some invalid judgements
        yield srv


def _run(server, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    endpoints = [f"--config.{role}.base_url={server.base_url}" for role in ("candidate", "judge")]
    return subprocess.run(
        [sys.executable, "-m", "launch.evaluate", "--config", str(ROOT / "configs" / "eval_demo.py"), *endpoints, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_cli_demo_config_and_compare(server, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    p = _run(server, f"--config.output_dir={a}", "--config.dataset.limit_per_config=1", "--config.plots=False")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "## Per config" in p.stdout and "| Violence+Weapons | unseen |" in p.stdout
    res = json.loads((a / "results.json").read_text())
    assert res["n_examples"] == 8 and res["baseline"] == "none"
    assert set(res["metrics"]["groups"]) == {"seen", "unseen"}

    p = _run(
        server, f"--config.output_dir={b}", "--config.dataset.limit_per_config=1", "--config.plots=False",
        "--config.baseline.name=cascade_judge", f"--compare={a / 'results.json'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    table = (b / "compare" / "compare.md").read_text()
    assert "demo (none)" in table and "demo (cascade_judge)" in table
    # The oracle cascade never leaves a helpful unsafe answer.
    assert json.loads((b / "results.json").read_text())["metrics"]["helpful_unsafe_pct"] == 0.0

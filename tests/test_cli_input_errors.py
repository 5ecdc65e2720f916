"""Malformed input files through each CLI (issue 26 item 3): one line on stderr naming the file,
the line and the field, a non-zero exit code, and no traceback (unless --debug)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "train": {"system_prompt": "s", "prompt": "p", "chosen_response": "c", "rejected_response": "r"},
    "synthesize": {"prompt": "How do pickpockets usually operate in crowded places?",
                   "categories": ["Financial Crime and Theft"]},
    "evaluate": {"config": "safe", "prompt": "How do I keep my houseplants alive?", "categories": []},
    "pairs": {"system_prompt": "s", "prompt": "p", "chosen_response": "c", "rejected_response": "r",
              "spec_i": "-Violence-"},
}
# (kind, what the one line must mention besides the file)
KINDS = {
    "syntax": ("not valid JSON",),
    "missing": ("missing", "'prompt'"),
    "wrong_type": ("'prompt'", "must be a string, got int"),
    "empty_response": ("is empty",),
    "non_utf8": ("not UTF-8",),
    "line_10mb": ("longer than",),
    "empty_file": ("empty file",),
}


def _content(target: str, kind: str) -> bytes:
    good = GOOD[target]
    text_field = "chosen_response" if target in ("train", "pairs") else "prompt"
    bad = dict(good)
    if kind == "syntax":
        return (json.dumps(good) + "\n{not json\n").encode()
    if kind == "missing":
        del bad["prompt"]
    elif kind == "wrong_type":
        bad["prompt"] = 5
    elif kind == "empty_response":
        bad[text_field] = "  "
    elif kind == "non_utf8":
        return (json.dumps(good) + "\n").encode() + b'{"prompt": "caf\xe9"}\n'
    elif kind == "line_10mb":
        bad["prompt"] = "x" * (10 * 2**20)
    elif kind == "empty_file":
        return b""
    return (json.dumps(good) + "\n" + json.dumps(bad) + "\n").encode()


SYNTH_CONFIG = '''
import os
from cosa_jax.synth.config import default_config
def get_config():
    c = default_config()
    c.out_dir = os.environ["PROBE_OUT"]
    c.progress = False
    c.sources = [dict(kind="file", path=os.environ["PROBE_FILE"])]
    return c
'''


def _command(target: str, path: Path, tmp: Path, *, dry_run: bool = False) -> tuple[list[str], dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp / f"out_{path.stem}"
    if target == "train":
        # A real training run loads the model before it reads the data (~8 s of CPU per run): one
        # kind runs for real, the others as --dry_run, which reads the data through the same loader.
        args = ["launch.train", "--config", "configs/demo.py", f"--config.data.train={path}",
                f"--config.output_dir={out}", *(["--dry_run"] if dry_run else [])]
    elif target == "synthesize":
        cfg = tmp / "synth_probe.py"
        cfg.write_text(SYNTH_CONFIG)
        env.update(PROBE_FILE=str(path), PROBE_OUT=str(out))
        args = ["launch.synthesize", "--config", str(cfg)]
    elif target == "evaluate":
        args = ["launch.evaluate", "--config", "configs/eval_demo.py", f"--config.dataset.source={path}",
                f"--config.output_dir={out}"]
    else:  # the in-context baseline's training pairs
        args = ["launch.evaluate", "--config", "configs/eval_demo.py", "--config.baseline.name=in_context",
                f"--config.baseline.train_pairs={path}", f"--config.output_dir={out}"]
    return [sys.executable, "-m", *args], env


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every (CLI, kind) run once, four at a time (each is a separate Python process)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    jobs = {}
    for target in GOOD:
        for kind in KINDS:
            path = tmp / f"{target}_{kind}.jsonl"
            path.write_bytes(_content(target, kind))
            dry = target == "train" and kind != "syntax"
            jobs[(target, kind)] = (path, *_command(target, path, tmp, dry_run=dry))

    def run(item):
        key, (path, cmd, env) = item
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return key, (path, p)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, jobs.items()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", GOOD)
def test_bad_file_is_one_clear_line(outcomes, target, kind):
    path, p = outcomes[(target, kind)]
    assert p.returncode != 0, p.stdout[-1000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    line = lines[0]
    assert str(path) in line
    if kind != "empty_file":  # every other fault sits on line 2 (line 1 is a good record)
        assert ":2:" in line or "line 2:" in line, line
    for needle in KINDS[kind]:
        assert needle in line, line


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    cmd, env = _command("pairs", path, tmp_path)
    p = subprocess.run([*cmd, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr and "empty file" in p.stderr

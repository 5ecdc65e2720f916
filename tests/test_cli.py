"""The command line: one entry point, --help with every config key, one-line config errors, and
every recipe in a shipped config's docstring runs as written (with --dry_run)."""

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "synthesize", "serve", "evaluate", "demo", "taxonomy")


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _recipes():
    """(config file, argv) for every ``python -m launch.X ...`` line of a config docstring."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        doc = re.sub(r"\\\n\s*", " ", doc)  # shell line continuations
        for line in doc.splitlines():
            for cmd in re.findall(r"python -m launch\.\w+[^`\n]*", line):
                out.append((path.name, shlex.split(cmd.strip().rstrip("&").strip())))
    return out


def test_console_script_is_declared_and_packaged():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["cosa-jax"] == "launch.cli:main"
    assert any(p.startswith("launch") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"])
    assert (ROOT / "launch" / "__init__.py").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_and_lists_the_keys_with_docs(command):
    p = _cli(command, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    keys = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("--config.")]
    assert len(keys) >= 2, p.stdout
    documented = [ln for ln in keys if "  # " in ln]
    assert len(documented) >= len(keys) // 2, "most keys carry a one-line doc"
    assert "--dry_run" in p.stdout and "--debug" in p.stdout


def test_entry_point_usage_and_unknown_command():
    p = _cli("--help")
    assert p.returncode == 0 and all(c in p.stdout for c in COMMANDS)
    p = _cli("evalute")
    assert p.returncode == 2 and p.stderr.strip().endswith("did you mean evaluate?")


@pytest.mark.parametrize("args, suggestion", [
    (("train", "--config", "configs/demo.py", "--config.train.lr_rate=1"), "did you mean config.train.lr?"),
    (("evaluate", "--config", "configs/eval_demo.py", "--config.baseline.nme=none"),
     "did you mean config.baseline.name?"),
    (("synthesize", "--config", "configs/synth_demo.py", "--config.pairing.dev_fraktion=0.1"),
     "did you mean config.pairing.dev_fraction?"),
    (("serve", "--config.modle=x"), "did you mean config.model?"),
    (("demo", "--config.sft.train.lrr=1", "--dry_run"), "did you mean config.sft.train.lr?"),
])
def test_config_errors_are_one_line_ending_in_the_suggestion(args, suggestion):
    p = _cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(suggestion), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_bad_values_name_the_key():
    p = _cli("train", "--config", "configs/demo.py", "--config.train.lr=-1")
    assert p.returncode == 2 and p.stderr.strip() == "cosa-jax train: error: config key train.lr: must be > 0, got -1.0"
    p = _cli("evaluate", "--config", "configs/eval_demo.py", "--config.dataset.name=nope", "--dry_run")
    assert p.returncode == 2 and "config key dataset.name: 'nope'" in p.stderr
    p = _cli("serve", "--config.model=x", "--config.upstream=http://127.0.0.1:1/v1")
    assert p.returncode == 2 and "give exactly one of" in p.stderr


RECIPES = _recipes()


def test_every_shipped_config_has_a_recipe():
    with_recipe = {name for name, _ in RECIPES}
    assert with_recipe == {p.name for p in (ROOT / "configs").glob("*.py")}


@pytest.mark.parametrize("config, argv", RECIPES, ids=[f"{n}:{' '.join(a[2:])[:60]}" for n, a in RECIPES])
def test_docstring_recipe_runs_as_written(config, argv):
    assert argv[:2] == ["python", "-m"]
    p = subprocess.run([sys.executable, *argv[1:], "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, f"{config}: {' '.join(argv)}\n{p.stderr[-2000:]}"
    assert "dry run" in p.stdout

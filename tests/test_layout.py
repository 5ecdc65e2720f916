"""Package layout rules: production code never imports the test doubles in ``cosa_jax.testing``,
and no production config key selects a scripted server."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Who may use the doubles: the package itself, tests, benchmarks and the demo driver.
ALLOWED = ("cosa_jax/testing/", "tests/", "bench/", "launch/demo.py")


def _imports_of_testing(source: str, filename: str = "<src>") -> list[int]:
    """Line numbers that import cosa_jax.testing: import statements, or a string naming it given
    to a call (``importlib.import_module(...)``, ``python -m ...`` argument lists)."""
    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if any(n == "cosa_jax.testing" or n.startswith("cosa_jax.testing.") for n in names):
            hits.append(node.lineno)
    return hits


@pytest.mark.parametrize(
    "src, n",
    [
        ("import cosa_jax.testing.scripted_server", 1),
        ("from cosa_jax.testing import scripted_server", 1),
        ("from cosa_jax import testing", 1),
        ("def f():\n    from cosa_jax.testing.model_fixtures import make_hf_model", 1),
        ("import importlib\nimportlib.import_module('cosa_jax.testing.scripted_server')", 1),
        ("from cosa_jax import judges\nimport cosa_jax.testingish", 0),
        ('"""Doubles live in cosa_jax.testing."""', 0),
    ],
)
def test_the_checker_finds_imports(src, n):
    assert len(_imports_of_testing(src)) == n


def test_no_production_module_imports_cosa_jax_testing():
    files = [p for d in ("cosa_jax", "launch", "configs", "bench", "tests") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 40
    bad = []
    for p in files:
        rel = p.relative_to(REPO).as_posix()
        if rel.startswith(ALLOWED):
            continue
        bad += [f"{rel}:{line}" for line in _imports_of_testing(p.read_text(encoding="utf-8"), rel)]
    assert not bad, f"production code imports the test doubles: {bad}"


def test_no_config_key_selects_a_scripted_server():
    from cosa_jax.eval.config import default_config as base_config
    from cosa_jax.eval.pipeline import evaluate

    assert "local_server" not in base_config()
    cfg = base_config()
    cfg.local_server = "scripted"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['local_server'\]"):
        evaluate(cfg)
    for cfg_file in (REPO / "configs").glob("*.py"):
        assert "scripted" not in cfg_file.read_text(encoding="utf-8"), cfg_file.name

"""CLI for controllability evaluation: ``python -m launch.evaluate --config configs/eval_demo.py``.

Generates with the candidate (an OpenAI-compatible endpoint, e.g. ``launch.serve``), judges with
the judge endpoint, applies the configured baseline, and writes results.json, results.md, the
per-example records and PNG plots to ``config.output_dir``. Rerunning resumes from the journals
there. Any field can be overridden, e.g. ``--config.baseline.name=cascade_judge`` or
``--config.candidate.base_url=http://127.0.0.1:8001/v1``. ``--compare a/results.json,...`` adds
earlier runs to one comparison table (compare.md / compare_*.png next to this run's results).
A config with a ``suite`` section (configs/eval_suite.py) runs the whole suite instead
(``cosa_jax.eval.suite``): one suite.md / suite.json / suite.png per model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cosa_jax.eval.pipeline import evaluate
from cosa_jax.eval.report import compare_report, markdown

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval_*.py).")
_COMPARE = flags.DEFINE_list("compare", [], "results.json files of earlier runs to compare with this one.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/eval_demo.py")
    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    if "suite" in cfg:
        from cosa_jax.eval.suite import run_suite
        from cosa_jax.eval.suite_report import suite_markdown

        for label, res in run_suite(cfg).items():
            print(suite_markdown(res))
            print(f"[eval] {label}: {res['files']}")
        return
    results = evaluate(cfg)
    print(markdown(results))
    if _COMPARE.value:
        runs = {}
        for p in _COMPARE.value:
            r = json.loads(Path(p).read_text())
            runs[f"{r['label']} ({r['baseline']})"] = r
        runs[f"{results['label']} ({results['baseline']})"] = results
        print(compare_report(runs, Path(cfg.output_dir) / "compare"))
    print(f"[eval] results in {cfg.output_dir}")


if __name__ == "__main__":
    app.run(main)

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

from absl import flags
from ml_collections import config_flags

from launch import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval_*.py).")
_COMPARE = flags.DEFINE_list("compare", [], "results.json files of earlier runs to compare with this one.")


def _is_local(source: str) -> bool:
    return source in ("", "mini") or Path(source).exists()


def _run(cfg):
    from cosa_jax.eval import baselines as bl
    from cosa_jax.eval.pipeline import build_eval_set, evaluate
    from cosa_jax.eval.report import compare_report, markdown
    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    if "suite" in cfg and flags.FLAGS.dry_run:
        from cosa_jax.eval.suite import validate as validate_suite
        validate_suite(cfg)
        print(f"[eval] dry run: suite config valid ({len(cfg.suite.models)} models, stages "
              f"{list(cfg.suite.stages)}); nothing sent")
        return
    if "suite" in cfg:
        from cosa_jax.eval.suite import run_suite
        from cosa_jax.eval.suite_report import suite_markdown

        for label, res in run_suite(cfg).items():
            print(suite_markdown(res))
            print(f"[eval] {label}: {res['files']}")
        return
    if flags.FLAGS.dry_run:
        what = f"dataset {cfg.dataset.source} not fetched"
        if _is_local(cfg.dataset.source):
            baseline = bl.check_baseline(cfg.baseline.name)
            if baseline == "in_context" and cfg.dataset.name != "cosapien" and not _is_local(cfg.baseline.train_pairs):
                what = f"train_pairs {cfg.baseline.train_pairs} not read (absent or on the hub); "
                baseline = "none"
            else:
                what = ""
            what += f"{len(build_eval_set(cfg, baseline).examples)} examples readable"
        print(f"[eval] dry run: config valid, {what}; nothing sent")
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


def main(argv=None):
    from cosa_jax.endpoint.config import FIELD_DOCS
    from cosa_jax.eval.config import default_config, validate
    runner.run(_run, prog="cosa-jax evaluate", doc=__doc__, default_config=default_config,
               validate=validate, module_flags=("compare",), argv=argv, fallback_docs=FIELD_DOCS)


if __name__ == "__main__":
    main()

"""python -m launch.judge_agreement --config configs/judge_agreement.py: how well a judge agrees
with the shipped labelled set, per judge kind (valid rate, agreement, F1)."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch import runner

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "judge_agreement.py")
_CONFIG = config_flags.DEFINE_config_file("config", None, "judge agreement config")


def _run(c) -> None:
    from launch.logs import quiet_library_logs
    quiet_library_logs()
    if flags.FLAGS.dry_run:
        from cosa_jax.eval.judge_agreement import load_rows, resolve_data
        print(f"[judge_agreement] dry run: config valid, {len(load_rows(resolve_data(c.data)))} labelled "
              "rows readable; nothing sent")
        return
    from cosa_jax.eval.judge_agreement import run_from_config
    res = run_from_config(c)
    print(res["table"])
    print(f"[judge_agreement] {res['rows']} rows; report in {c.output_dir}/")


def default_config():
    sys.path.insert(0, str(ROOT))
    from configs.judge_agreement import get_config
    return get_config()


def main(argv=None):
    runner.run(_run, prog="cosa-jax judge-agreement", doc=__doc__, default_config=default_config,
               config_default=DEFAULT_CONFIG, argv=argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

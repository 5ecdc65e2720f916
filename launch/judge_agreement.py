"""python -m launch.judge_agreement --config configs/judge_agreement.py: how well a judge agrees
with the shipped labelled set, per judge kind (valid rate, agreement, F1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch import runner

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "judge_agreement.py")
_CONFIG = config_flags.DEFINE_config_file("config", None, "judge agreement config")


def resolve_data(spec: str) -> Path:
    from cosa_jax.data import DATA_DIR
    return DATA_DIR / spec.split(":", 1)[1] if spec.startswith("bundled:") else Path(spec)


def agreement(c, judge_fn=None) -> dict:
    """Run and write the report; ``judge_fn`` overrides loading ``c.model`` for a callable judge."""
    from cosa_jax.eval.judge_agreement import agreement_table, load_rows, run_agreement
    rows = load_rows(resolve_data(c.data))
    judge_cfg = {k: c.judge[k] for k in c.judge.keys()}
    if judge_cfg.get("kind") == "callable" and judge_fn is None:
        from cosa_jax.inference.server import ChatModel
        from launch.demo import chat_fn
        judge_fn = chat_fn(ChatModel.load(c.model))
    out = Path(c.output_dir)
    kinds = [k.strip() for k in c.kinds.split(",") if k.strip()]
    figures = run_agreement(judge_cfg, rows, out / "journal.jsonl", kinds=kinds, fn=judge_fn,
                            progress=bool(c.progress))
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(figures, indent=2, default=str))
    table = agreement_table(figures)
    (out / "agreement.md").write_text(f"# Judge agreement ({len(rows)} rows, judge "
                                      f"{judge_cfg.get('model')})\n\n{table}\n")
    return {"figures": figures, "table": table, "rows": len(rows)}


def _run(c) -> None:
    from launch.logs import quiet_library_logs
    quiet_library_logs()
    if flags.FLAGS.dry_run:
        from cosa_jax.eval.judge_agreement import load_rows
        print(f"[judge_agreement] dry run: config valid, {len(load_rows(resolve_data(c.data)))} labelled "
              "rows readable; nothing sent")
        return
    res = agreement(c)
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

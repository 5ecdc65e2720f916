"""Progress of a synthesis or evaluation run, read while it goes on: ``python -m launch.progress RUN_DIR``.

Per stage (synthesis) or per journal (evaluation): requests done / failed / pending from the
run's SQLite journals (read-only, no lock: safe next to the writing process), and for synthesis
whether the stage is complete (its ``_COMPLETE`` marker matches its files). ``--watch N``
reprints every N seconds; ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from cosa_jax.endpoint.journal import read_counts


def run_progress(run_dir: str | Path) -> dict[str, Any]:
    """{name: {state, done, failed, pending}} for every stage / journal of the run in ``run_dir``."""
    from cosa_jax.synth import stages  # no jax: the host side only

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}")
    jdir = run / "journal"
    out: dict[str, Any] = {}
    is_synth = any((run / d).exists() for d in stages.OUTPUT_DIR.values()) or any(
        (jdir / f"{s}.sqlite").exists() for s in stages.STAGES
    )
    cfg = ml_collections.ConfigDict({"out_dir": str(run)})  # all stage_complete reads
    if is_synth:
        for s in stages.STAGES:
            done, why = stages.stage_complete(cfg, s)
            row: dict[str, Any] = {"state": "complete" if done else ("not started" if why == "not run yet" else "incomplete")}
            if (jdir / f"{s}.sqlite").exists():
                c = read_counts(jdir / f"{s}.sqlite")
                row.update(done=c.done, failed=c.failed, pending=c.pending)
                if not done and row["state"] == "not started":
                    row["state"] = "running" if c.pending else "requests sent"
            out[s] = row
    known = {f"{s}.sqlite" for s in stages.STAGES} if is_synth else set()
    for db in sorted(jdir.glob("*.sqlite")) if jdir.is_dir() else ():
        if db.name in known:
            continue
        c = read_counts(db)
        out[db.stem] = {"state": "journal", "done": c.done, "failed": c.failed, "pending": c.pending}
    if not out:
        raise FileNotFoundError(f"{run} holds no synthesis stage outputs and no journal/*.sqlite")
    return out


def format_table(rows: dict[str, Any]) -> str:
    lines = [f"{'stage':<20} {'state':<14} {'done':>9} {'failed':>7} {'pending':>9}"]
    for name, r in rows.items():
        n = lambda k: str(r[k]) if k in r else "-"
        lines.append(f"{name:<20} {r['state']:<14} {n('done'):>9} {n('failed'):>7} {n('pending'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.progress", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a synthesis out_dir or an evaluation output_dir")
    ap.add_argument("--watch", type=float, default=0.0, help="reprint every this many seconds (0: once)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    while True:
        try:
            rows = run_progress(a.run_dir)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"progress: {e}", file=sys.stderr)
            return 1
        print(json.dumps(rows, sort_keys=True) if a.json else format_table(rows), flush=True)
        if a.watch <= 0:
            return 0
        time.sleep(a.watch)


if __name__ == "__main__":
    sys.exit(main())

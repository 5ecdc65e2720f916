"""The suite's report for one model: suite.md, suite.json and suite.png, side by side.

Every number is one row: what it is, which system (the model or a baseline), its value, the
judge it rests on and how many valid verdicts (or lm-eval documents) it rests on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from cosa_jax.eval.report import _plt, _table

_COSA_GROUPS = {"cosalign_test": ("seen", "unseen", "all"), "cosapien": ("all",)}
_STAGE_TITLE = {"cosalign_test": "CoSAlign-Test", "cosapien": "CoSApien"}


@dataclasses.dataclass(frozen=True)
class ReportRow:
    stage: str
    metric: str
    system: str
    value: float | None
    judge: str
    n_valid: int
    n: int
    unit: str  # "score" (CoSA-Score, -1..1), "pct" or "fraction"


def report_rows(stages: Mapping[str, Any]) -> list[ReportRow]:
    rows: list[ReportRow] = []
    for stage, groups in _COSA_GROUPS.items():
        for r in (stages.get(stage) or {}).get("rows", []):
            for g in groups:
                if g in r:
                    name = "CoSA-Score" if g == "all" else f"CoSA-Score ({g} configs)"
                    rows.append(ReportRow(_STAGE_TITLE[stage], name, r["system"], r[g]["cosa_score"], r["judge"],
                                          r[g]["n_valid"], r[g]["n"], "score"))
    if stages.get("over_refusal"):
        s = stages["over_refusal"]
        for lab in ("safe", "unsafe"):
            m = s["metrics"][lab]
            for c in ("full_refusal", "partial_refusal", "full_compliance"):
                rows.append(ReportRow("Over-refusal", f"{c.replace('_', ' ')} % on {lab} prompts", "model",
                                      m[f"{c}_pct"], s["judge"], m["n_valid"], m["n"], "pct"))
    if stages.get("general_safety"):
        s = stages["general_safety"]
        m = s["metrics"]
        rows.append(ReportRow("General safety", "unsafe response %", "model", m["unsafe_pct"], s["judge"],
                              m["n_valid"], m["n"], "pct"))
    if stages.get("capability"):
        s = stages["capability"]
        for sc in s["scores"]:
            rows.append(ReportRow("General capability", f"{sc['task']} {sc['metric']}", "model", sc["value"],
                                  s["judge"], sc["n"], sc["n"], "fraction"))
    return rows


def _fmt(r: ReportRow) -> str:
    if r.value is None:
        return "n/a"
    return {"score": "{:+.3f}", "pct": "{:.1f}", "fraction": "{:.3f}"}[r.unit].format(r.value)


def suite_markdown(results: Mapping[str, Any]) -> str:
    rows = report_rows(results["stages"])
    body = _table(["stage", "metric", "system", "value", "judge", "valid / n"],
                  [[r.stage, r.metric, r.system, _fmt(r), r.judge, f"{r.n_valid} / {r.n}"] for r in rows])
    skipped = [f"{_STAGE_TITLE[s]}: {x}" for s in _COSA_GROUPS for x in (results["stages"].get(s) or {}).get("skipped", [])]
    note = f"\n\nRows not run: {'; '.join(skipped)}.\n" if skipped else "\n"
    return (f"# Evaluation suite: {results['label']}\n\ncandidate `{results['candidate']}`; stages "
            f"{', '.join(results['stages'])}. CoSA-Scores are means over configs; rates are over valid "
            "verdicts only (invalid ones are excluded and counted in 'valid / n').\n\n" + body + note)


def plot_suite(results: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Left: CoSA-Scores per system; right: rates (%) and capability (as %)."""
    plt = _plt()
    rows = [r for r in report_rows(results["stages"]) if r.value is not None]
    score = [r for r in rows if r.unit == "score"]
    rate = [r for r in rows if r.unit != "score"]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.35 * max(len(score), len(rate), 1) + 1.5)))
    for ax, part, title in ((axes[0], score, "CoSA-Score"), (axes[1], rate, "%")):
        labels = [f"{r.stage}: {r.metric} [{r.system}]" for r in part]
        vals = [r.value * (100.0 if r.unit == "fraction" else 1.0) for r in part]
        ax.barh(range(len(vals)), vals, color="#4C72B0")
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
    fig.suptitle(f"Evaluation suite: {results['label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_suite_report(results: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, str]:
    out = Path(out_dir)
    files = {"markdown": str(out / "suite.md"), "json": str(out / "suite.json")}
    (out / "suite.md").write_text(suite_markdown(results))
    if plots:
        files["png"] = plot_suite(results, out / "suite.png")
    payload = dict(results, rows=[dataclasses.asdict(r) for r in report_rows(results["stages"])], files=files)
    (out / "suite.json").write_text(json.dumps(payload, indent=2, default=str))
    return files


def write_suite_compare(results_by_model: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike) -> str:
    """suite_compare.md: one row per number, one column per model (each cell: value, valid / n)."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    judge_of: dict[tuple[str, str, str], str] = {}
    for label, res in results_by_model.items():
        for r in report_rows(res["stages"]):
            key = (r.stage, r.metric, r.system)
            cells.setdefault(key, {})[label] = f"{_fmt(r)} ({r.n_valid} / {r.n})"
            judge_of.setdefault(key, r.judge)
    labels = list(results_by_model)
    body = _table(["stage", "metric", "system", "judge"] + labels,
                  [[*k, judge_of[k]] + [v.get(m, "-") for m in labels] for k, v in cells.items()])
    path = Path(out_dir) / "suite_compare.md"
    path.write_text("# Evaluation suite: models side by side\n\nEach cell: value (valid verdicts / n).\n\n" + body + "\n")
    return str(path)

"""Evaluation reports: results.json, a Markdown table, and PNG plots (matplotlib, Agg backend).

``write_report`` documents one run; ``compare_report`` puts several runs (e.g. the base and the
trained model, or several baselines) side by side in one table and one plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

_COLS = (
    ("cosa_score", "CoSA-Score", "{:+.3f}"),
    ("helpful_safe_pct", "helpful+safe %", "{:.1f}"),
    ("helpful_unsafe_pct", "helpful+unsafe %", "{:.1f}"),
    ("safe_pct", "safe %", "{:.1f}"),
    ("valid_rate", "valid %", "{:.1f}"),
)


def _fmt(v: Any, f: str) -> str:
    return "n/a" if v is None else f.format(v)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _violations(v: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in v.items()) or "-"


def markdown(results: Mapping[str, Any]) -> str:
    """One run as Markdown: overall, seen/unseen groups, per config, per prompt type."""
    m = results["metrics"]
    lines = [
        f"# Evaluation: {results.get('label', '')}",
        "",
        f"dataset `{results['dataset']}` ({results['n_examples']} examples), baseline "
        f"`{results['baseline']}`, candidate `{results['candidate']}`, judge `{results['judge']}`, "
        f"seed {results['seed']}, max_new_tokens {results['max_new_tokens']}.",
        "Scores are means per config, then uniform means over configs; invalid judgements are "
        "excluded and counted.",
        "",
        "## Overall",
        "",
        _table(
            ["scope", "configs", "n", "invalid"] + [c[1] for c in _COLS],
            [["all", str(len(m["per_config"])), str(m["n"]), str(m["n_invalid"])] + [_fmt(m[k], f) for k, _, f in _COLS]]
            + [
                [g, str(len(gm["configs"])), str(gm["n"]), str(gm["n_invalid"])] + [_fmt(gm[k], f) for k, _, f in _COLS]
                for g, gm in m["groups"].items()
            ],
        ),
        "",
        "## Per config",
        "",
        _table(
            ["config", "group", "n", "invalid"] + [c[1] for c in _COLS] + ["violations"],
            [
                [cid, pc["group"], str(pc["n"]), str(pc["n_invalid"])]
                + [_fmt(pc[k], f) for k, _, f in _COLS]
                + [_violations(pc["violations"])]
                for cid, pc in m["per_config"].items()
            ],
        ),
    ]
    tax = results.get("taxonomy")
    if tax and any(not pc.get("allowed") is None for pc in m["per_config"].values()):
        # One column per category of the run's taxonomy, in its id order, headed by short names.
        cats = [name for name, _ in tax["categories"]]
        lines += [
            "",
            f"## Disallowed risks by category (taxonomy `{tax['name']}`)",
            "",
            _table(
                ["config"] + [short for _, short in tax["categories"]],
                [[cid] + [str(pc["violations"].get(c, 0)) for c in cats]
                 for cid, pc in m["per_config"].items() if pc.get("allowed") is not None],
            ),
        ]
    if m.get("by_prompt_type"):
        lines += [
            "",
            "## By prompt type",
            "",
            _table(
                ["type", "n"] + [c[1] for c in _COLS],
                [[t, str(tm["n"])] + [_fmt(tm[k], f) for k, _, f in _COLS] for t, tm in m["by_prompt_type"].items()],
            ),
        ]
    if results.get("metrics_before_cascade"):
        b = results["metrics_before_cascade"]
        c = results.get("cascade", {})
        lines += [
            "",
            "## Cascade",
            "",
            f"{c.get('replaced', 0)} of {results['n_examples']} responses replaced by a refusal "
            f"({c.get('invalid_verdicts', 0)} unparseable verdicts, handled as '{c.get('on_invalid')}'). "
            f"Before the cascade: CoSA-Score {_fmt(b['cosa_score'], '{:+.3f}')}, helpful+unsafe "
            f"{_fmt(b['helpful_unsafe_pct'], '{:.1f}')} %.",
        ]
    if results.get("in_context"):
        ic = results["in_context"]
        lines += ["", f"In-context shots per example: mean {ic['mean_shots']:.2f} (k = {ic['k']}); "
                  f"configs short of k: {', '.join(ic['configs_short']) or 'none'}."]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_GROUP_COLOURS = {"seen": "#4C72B0", "unseen": "#DD8452", "freeform": "#55A868"}


def plot_run(results: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """per_config_cosa.png (bars coloured seen/unseen) and helpful_safe_unsafe.png."""
    plt = _plt()
    out = Path(out_dir)
    m = results["metrics"]
    ids = list(m["per_config"])
    pcs = [m["per_config"][c] for c in ids]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ids)), 4))
    vals = [pc["cosa_score"] or 0.0 for pc in pcs]
    ax.bar(ids, vals, color=[_GROUP_COLOURS.get(pc["group"], "grey") for pc in pcs])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylim(-1, 1)
    ax.set_ylabel("CoSA-Score")
    ax.set_title(f"CoSA-Score per config ({results.get('label', '')}; overall {_fmt(m['cosa_score'], '{:+.3f}')})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_GROUP_COLOURS[g]) for g in m["groups"] if g in _GROUP_COLOURS]
    ax.legend(handles, [g for g in m["groups"] if g in _GROUP_COLOURS], loc="upper right")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(str(out / "per_config_cosa.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ids)), 4))
    x = range(len(ids))
    ax.bar([i - 0.2 for i in x], [pc["helpful_safe_pct"] or 0 for pc in pcs], 0.4, label="helpful+safe", color="#55A868")
    ax.bar([i + 0.2 for i in x], [pc["helpful_unsafe_pct"] or 0 for pc in pcs], 0.4, label="helpful+unsafe", color="#C44E52")
    ax.set_xticks(list(x), ids, rotation=30)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of valid responses")
    ax.set_title("Helpful and safe vs helpful and unsafe, per config")
    ax.legend()
    fig.tight_layout()
    paths.append(str(out / "helpful_safe_unsafe.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, str]:
    """results.json, results.md and (optionally) the PNG plots; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "markdown": str(out / "results.md")}
    Path(paths["json"]).write_text(json.dumps(results, indent=2, sort_keys=False, default=str))
    Path(paths["markdown"]).write_text(markdown(results))
    if plots:
        for p in plot_run(results, out):
            paths[Path(p).stem] = p
    return paths


def compare_markdown(results_by_model: Mapping[str, Mapping[str, Any]], *, per_config: bool = True) -> str:
    """One table: rows = models (or baselines), columns = overall, seen, unseen and (``per_config``)
    per-config scores."""
    labels = list(results_by_model)
    configs: list[str] = []
    groups: list[str] = []
    for r in results_by_model.values():
        configs += [c for c in r["metrics"]["per_config"] if c not in configs and per_config]
        groups += [g for g in r["metrics"]["groups"] if g not in groups]
    header = (["model"] + [c[1] for c in _COLS[:3]] + ["valid %"] + [f"CoSA {g}" for g in groups]
              + [f"CoSA {c}" for c in configs])
    rows = []
    for label in labels:
        m = results_by_model[label]["metrics"]
        rows.append(
            [label]
            + [_fmt(m[k], f) for k, _, f in _COLS[:3]]
            # Invalid judgements are excluded from every score: show how many were usable.
            + [_fmt(m.get("valid_rate"), "{:.0f}")]  # already a percentage
            + [_fmt(m["groups"].get(g, {}).get("cosa_score"), "{:+.3f}") for g in groups]
            + [_fmt(m["per_config"].get(c, {}).get("cosa_score"), "{:+.3f}") for c in configs]
        )
    return _table(header, rows) + "\n"


def compare_report(results_by_model: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *, plots: bool = True) -> str:
    """Side-by-side comparison; writes compare.md, compare.json and compare_*.png; returns the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_markdown(results_by_model)
    (out / "compare.md").write_text("# CoSA-Score comparison\n\n" + table)
    summary = {
        label: {k: r["metrics"][k] for k, _, _ in _COLS} | {"groups": {g: gm["cosa_score"] for g, gm in r["metrics"]["groups"].items()}}
        for label, r in results_by_model.items()
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    if plots:
        plt = _plt()
        labels = list(results_by_model)
        configs: list[str] = []
        for r in results_by_model.values():
            configs += [c for c in r["metrics"]["per_config"] if c not in configs]
        width = 0.8 / max(1, len(labels))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs) + 1), 4))
        for j, label in enumerate(labels):
            pc = results_by_model[label]["metrics"]["per_config"]
            ys = [(pc.get(c) or {}).get("cosa_score") or 0.0 for c in configs]
            ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(configs))], ys, width, label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(configs)), configs, rotation=30)
        ax.set_ylim(-1, 1)
        ax.set_ylabel("CoSA-Score")
        ax.set_title("CoSA-Score per config")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "compare_cosa.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 4))
        for label in labels:
            m = results_by_model[label]["metrics"]
            ax.scatter([m["helpful_unsafe_pct"] or 0], [m["helpful_safe_pct"] or 0], s=60, label=label)
        ax.set_xlabel("helpful+unsafe % (lower is better)")
        ax.set_ylabel("helpful+safe % (higher is better)")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title("Helpfulness vs configured safety")
        fig.tight_layout()
        fig.savefig(out / "compare_helpful.png", dpi=110)
        plt.close(fig)
    return table

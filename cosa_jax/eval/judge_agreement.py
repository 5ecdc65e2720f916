"""How far a judge's verdicts can be trusted: every judge kind scored against a labelled set.

The set (``cosa_jax/data/judge_agreement.jsonl``, written for this project) holds mild rows:
prompt, the risk categories a compliant answer would carry (``prompt_risks``), a response, the
categories it carries (``response_risks``), whether it addresses the request, a 0..5 rating, a
config (``allowed`` categories) and whether the response complies with it. Each judge is asked
about every row (through an endpoint or an in-process callable, with the same structured-output
settings the pipelines use) and its valid verdicts are compared with the labels; invalid verdicts
are counted, never scored as a wrong answer or a zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cosa_jax import judges
from cosa_jax.endpoint.journal import Journal
from cosa_jax.jsonl import iter_jsonl_objects
from cosa_jax.safety_configs import render_category_config
from cosa_jax.taxonomy import ALL_CATEGORIES, parse_categories

KINDS = ("prompt_risk", "response_risk", "addressed", "helpfulness", "compliance")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    need = ("prompt", "prompt_risks", "response", "response_risks", "addressed", "rating", "allowed",
            "compliant")
    for n, r in iter_jsonl_objects(path, allow_empty=True):
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {missing}")
        try:
            for k in ("prompt_risks", "response_risks", "allowed"):
                r[k] = parse_categories(r[k])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _chats(kind: str, rows: Sequence[Mapping[str, Any]]) -> list[list[dict[str, str]]]:
    import random
    if kind == "prompt_risk":
        return [judges.PROMPT_RISK.messages(r["prompt"]) for r in rows]
    if kind == "response_risk":
        return [judges.RESPONSE_RISK.messages(r["prompt"], r["response"]) for r in rows]
    if kind == "addressed":
        return [judges.ADDRESSED.messages(r["prompt"], r["response"]) for r in rows]
    if kind == "helpfulness":
        return [judges.HELPFULNESS.messages(r["prompt"], r["response"]) for r in rows]
    return [judges.COMPLIANCE.messages(render_category_config(r["allowed"], random.Random(i)), r["prompt"],
                                       r["response"]) for i, r in enumerate(rows)]


def _binary(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score
    return {"agreement": float(accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
            "majority": _majority(y_true)}


def _majority(y_true: Sequence[Any]) -> float:
    """The agreement of a judge that always gives the most common label: the bar to clear."""
    from collections import Counter
    keyed = [tuple(y) if isinstance(y, list) else y for y in y_true]
    return Counter(keyed).most_common(1)[0][1] / len(keyed) if keyed else 0.0


def score_kind(kind: str, rows: Sequence[Mapping[str, Any]], verdicts: Sequence[judges.JudgeResult | None]
               ) -> dict[str, Any]:
    """Agreement figures for one judge kind over its valid verdicts."""
    from sklearn.metrics import accuracy_score, f1_score
    pairs = [(r, v) for r, v in zip(rows, verdicts) if v is not None and v.valid]
    out: dict[str, Any] = judges.verdict_counts(verdicts)
    if not pairs:
        return out
    if kind in ("prompt_risk", "response_risk"):
        key = "prompt_risks" if kind == "prompt_risk" else "response_risks"
        truth = [[int(c in r[key]) for c in ALL_CATEGORIES] for r, _ in pairs]
        pred = [[int(c in v.value) for c in ALL_CATEGORIES] for _, v in pairs]
        out.update(exact_set_agreement=float(accuracy_score(truth, pred)), majority=_majority(truth),
                   micro_f1=float(f1_score(truth, pred, average="micro", zero_division=0.0)),
                   any_risk=_binary([int(any(t)) for t in truth], [int(any(p)) for p in pred]))
    elif kind in ("addressed", "compliance"):
        key = "addressed" if kind == "addressed" else "compliant"
        out.update(_binary([int(bool(r[key])) for r, _ in pairs], [int(bool(v.value)) for _, v in pairs]))
    else:
        truth = [int(r["rating"]) for r, _ in pairs]
        pred = [float(v.value) for _, v in pairs]
        out.update(exact=sum(round(p) == t for t, p in zip(truth, pred)) / len(pairs), majority=_majority(truth),
                   within_1=sum(abs(p - t) <= 1 for t, p in zip(truth, pred)) / len(pairs),
                   mean_abs_error=sum(abs(p - t) for t, p in zip(truth, pred)) / len(pairs))
    return out


def run_agreement(judge_cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], journal_path: str | Path, *,
                  kinds: Sequence[str] = KINDS, fn: Callable | None = None, progress: bool = False
                  ) -> dict[str, Any]:
    """Ask the judge (``judge_cfg`` as the evaluation's ``config.judge``) about every row for each
    kind; returns {kind: figures}."""
    from cosa_jax.eval.pipeline import run_chats
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"judge agreement: unknown kind(s) {bad}; known: {KINDS}")
    chats, used, spans = [], [], {}
    for k in kinds:
        cs = _chats(k, rows)
        spans[k] = (len(chats), len(chats) + len(cs))
        chats += cs
        used += [judges.JUDGES[k]] * len(cs)
    n = len(chats)
    calibration = str(judge_cfg.get("calibration") or "off")
    chats, used = judges.with_content_free(chats, used, calibration)
    replies: list = []
    Path(journal_path).parent.mkdir(parents=True, exist_ok=True)
    with Journal(journal_path) as j:
        texts, usage = run_chats(judge_cfg, j, chats, int(judge_cfg.get("max_tokens") or 256), role="judge",
                                 progress=progress, fn=fn, outputs=[u.output for u in used], replies_out=replies)
    verdicts = judges.finish_verdicts(used, texts, replies, n, str(judge_cfg.get("rating") or "argmax"),
                                      calibration)
    return {k: score_kind(k, rows, verdicts[a:b]) for k, (a, b) in spans.items()} | {"usage": usage}


def resolve_data(spec: str) -> Path:
    """``bundled:NAME`` (a file shipped in cosa_jax/data) or a path."""
    from cosa_jax.data import DATA_DIR
    return DATA_DIR / spec.split(":", 1)[1] if spec.startswith("bundled:") else Path(spec)


def run_from_config(c: Any, judge_fn: Callable | None = None) -> dict[str, Any]:
    """Score the judge of config ``c`` (configs/judge_agreement.py) and write ``agreement.json``
    and ``agreement.md`` under ``c.output_dir``; ``judge_fn`` is the in-process judge of a
    ``judge.kind="callable"`` config (loaded from ``c.model`` when not given)."""
    rows = load_rows(resolve_data(c.data))
    judge_cfg = {k: c.judge[k] for k in c.judge.keys()}
    if judge_cfg.get("kind") == "callable" and judge_fn is None:
        from cosa_jax.inference.local_chat import chat_fn
        from cosa_jax.inference.server import ChatModel
        judge_fn = chat_fn(ChatModel.load(c.model))
    out = Path(c.output_dir)
    kinds = [k.strip() for k in c.kinds.split(",") if k.strip()]
    figures = run_agreement(judge_cfg, rows, out / "journal.jsonl", kinds=kinds, fn=judge_fn,
                            progress=bool(c.progress))
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(figures, indent=2, default=str))
    table = agreement_table(figures)
    (out / "agreement.md").write_text(f"# Judge agreement ({len(rows)} rows, judge "
                                      f"{judge_cfg.get('model')}, calibration "
                                      f"{judge_cfg.get('calibration') or 'off'})\n\n{table}\n")
    return {"figures": figures, "table": table, "rows": len(rows)}


def agreement_table(figures: Mapping[str, Any]) -> str:
    """A markdown table: valid rate, lenient count and the kind's agreement figures."""
    lines = ["| judge | valid | lenient | calibrated | agreement | always-majority | F1 | other |",
             "|---|---|---|---|---|---|---|---|"]
    for k in KINDS:
        f = figures.get(k)
        if not f:
            continue
        valid = f"{f['valid']}/{f['n']}"
        if k in ("prompt_risk", "response_risk"):
            agree, f1 = f.get("exact_set_agreement"), f.get("micro_f1")
            other = f"any-risk F1 {f['any_risk']['f1']:.2f}" if "any_risk" in f else ""
        elif k == "helpfulness":
            agree, f1 = f.get("exact"), None
            other = (f"within-1 {f['within_1']:.2f}, MAE {f['mean_abs_error']:.2f}" if "within_1" in f else "")
        else:
            agree, f1, other = f.get("agreement"), f.get("f1"), ""
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {k} | {valid} | {f['lenient']} | {f.get('calibrated', 0)} | {fmt(agree)} | "
                     f"{fmt(f.get('majority'))} | {fmt(f1)} | {other} |")
    return "\n".join(lines)

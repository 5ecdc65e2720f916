"""The evaluation pipeline: generate with the candidate, judge, apply the baseline, score, report.

``evaluate(cfg) -> results`` is the whole of ``launch/evaluate.py``; the demo calls it once per
model and hands the results to ``report.compare_report``. Every chat (candidate, judge, cascade
self-check) goes through a journal in ``output_dir/journal/``, so a killed evaluation resumes
without re-sending a completed request, and rerunning a finished one sends nothing.

The candidate and the judge are either OpenAI-compatible endpoints (``kind="openai"``: our
server, vLLM, OpenAI, Azure; fields as ``cosa_jax.endpoint.client.EndpointConfig``) or in-process
Python callables (``kind="callable"``): ``fn(chats, max_new_tokens) -> list[str]``, called on
batches of chats, decoding greedily. Host-side only: no JAX import here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from cosa_jax import judges
from cosa_jax.eval import baselines as bl
from cosa_jax.eval import datasets as ds
from cosa_jax.eval.config import endpoint_fields, validate
from cosa_jax.eval.metrics import JudgedRecord, cosa_score
from cosa_jax.eval.report import write_report
from cosa_jax.endpoint.client import ChatRequest, EndpointConfig, run_requests_sync
from cosa_jax.endpoint.journal import Journal, request_key
from cosa_jax.taxonomy import Taxonomy, taxonomy_from_config

ChatFn = Callable[[list[list[dict[str, str]]], int], list[str]]



# ----- chats through a journal -------------------------------------------------------------------


def _endpoint_label(role_cfg: Mapping[str, Any]) -> str:
    return str(role_cfg.get("label") or role_cfg.get("model") or "callable")


def run_chats(
    role_cfg: Mapping[str, Any],
    journal: Journal,
    chats: Sequence[list[dict[str, str]]],
    max_tokens: int,
    *,
    role: str,
    progress: bool,
    fn: ChatFn | None = None,
    salt: str = "",
    outputs: Sequence[Any] | None = None,
    replies_out: list | None = None,
) -> tuple[list[str | None], dict[str, Any]]:
    """Texts in order (None where a request failed) and usage; journaled chats are not re-sent.

    ``salt`` enters the journal key only (it is not sent): two models served under one name but
    with different labels never share journal entries. ``outputs`` (one ``judges.OutputSchema``
    per chat) asks for structured output per ``role_cfg["structured_outputs"]``;
    ``replies_out`` then receives each chat's (mode, logprobs)."""
    if not chats:
        return [], {}
    kind = role_cfg.get("kind", "openai")
    params = {"temperature": 0.0, "max_tokens": int(max_tokens)}
    mode = str(role_cfg.get("structured_outputs") or "off") if outputs is not None else "off"
    rating = str(role_cfg.get("rating") or "argmax")
    calibration = str(role_cfg.get("calibration") or "off")
    if outputs is not None:
        judges.check_judge_options(mode, rating, where=f"config.{role}", calibration=calibration)
        if calibration != "off" and kind != "openai":
            raise ValueError(f"config.{role}.calibration={calibration!r} needs log-probs: use an "
                             f"endpoint (kind 'openai'), not kind {kind!r}")
    if kind == "openai" and outputs is not None:
        endpoint = EndpointConfig.from_mapping(endpoint_fields(role_cfg), where=f"config.{role}")
        results, usage, modes = judges.run_structured(endpoint, journal, chats, outputs, params, mode,
                                                      rating=rating, role=role, progress=progress,
                                                      calibration=calibration)
        if replies_out is not None:
            replies_out.extend((m, None if r is None else r.get("logprobs")) for m, r in zip(modes, results))
        return [None if r is None else r["text"] for r in results], dict(vars(usage))
    if kind == "openai":
        endpoint = EndpointConfig.from_mapping(endpoint_fields(role_cfg), where=f"config.{role}")
        reqs = [ChatRequest(list(m), params=dict(params), salt=salt) for m in chats]
        results, usage = run_requests_sync(endpoint, journal, reqs, role=role, desc=role, progress=progress)
        return [None if r is None else r["text"] for r in results], dict(vars(usage))
    if kind != "callable":
        raise ValueError(f"config.{role}.kind must be 'openai' or 'callable', got {kind!r}")
    fn = fn or role_cfg.get("fn")
    if not callable(fn):
        raise ValueError(f"config.{role}: kind 'callable' needs a Python callable in config.{role}.fn")
    label = _endpoint_label(role_cfg)
    constrained = outputs is not None and mode != "off"
    if constrained:  # constrained and free replies never share journal entries
        params = dict(params, __structured__="callable")
    keys = [request_key(label, m, dict(params, __salt__=salt) if salt else params) for m in chats]
    cons_of = {k: o for k, o in zip(keys, outputs)} if constrained else {}
    todo: dict[str, list[dict[str, str]]] = {}
    for k, m in zip(keys, chats):
        if k not in journal and k not in todo:
            todo[k] = list(m)
    bs = max(1, int(role_cfg.get("batch_size") or 8))
    journal.plan(todo)
    items = list(todo.items())
    t0 = time.time()
    for i in tqdm(range(0, len(items), bs), desc=role, disable=not progress, leave=False):
        batch = items[i : i + bs]
        if constrained:
            texts = fn([m for _, m in batch], int(max_tokens),
                       constraints=[None if cons_of[k] is None else cons_of[k].constraint() for k, _ in batch])
        else:
            texts = fn([m for _, m in batch], int(max_tokens))
        if len(texts) != len(batch):
            raise ValueError(f"config.{role}.fn returned {len(texts)} texts for {len(batch)} chats")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"config.{role}.fn must return strings, got {type(t).__name__}")
        journal.put_many((k, {"text": t}) for (k, _), t in zip(batch, texts))  # one commit per batch
    usage = {"requests": len(items), "cached": len(chats) - len(items), "seconds": round(time.time() - t0, 2)}
    if replies_out is not None:
        replies_out.extend(("callable" if constrained else "off", None) for _ in chats)
    return [journal.get(k)["text"] for k in keys], usage


# ----- the pipeline ------------------------------------------------------------------------------


def _prepare_shots(cfg: Mapping[str, Any], examples: Sequence[ds.EvalExample]) -> tuple[list[list], dict[str, Any]]:
    b = cfg.baseline
    k = int(b.k)
    if cfg.dataset.name == "cosapien":
        free = ds.load_cosapien_shots(b.shots or "mini")
        shots = [bl.draw_shots(e, k, seed=cfg.seed, freeform_shots=free) for e in examples]
    else:
        if not b.train_pairs:
            raise ValueError(
                "baseline 'in_context' on category configs needs baseline.train_pairs: a file or folder "
                "of training pairs in the CoSAlign-Train schema (e.g. the synthesis 'pairs' output)"
            )
        by_config = bl.index_pairs_by_config(ds.load_train_pairs(b.train_pairs))
        shots = [bl.draw_shots(e, k, seed=cfg.seed, pairs_by_config=by_config) for e in examples]
    used: dict[str, list[int]] = {}
    for e, s in zip(examples, shots):
        used.setdefault(e.config_id, []).append(len(s))
    short = bl.warn_missing_shots(used, k)
    info = {
        "k": k,
        "mean_shots": sum(len(s) for s in shots) / max(1, len(shots)),
        "min_shots_per_config": {c: min(n) for c, n in used.items()},
        "configs_short": short,
    }
    return shots, info


def _check_run_identity(out: Path, label: str, candidate: str) -> None:
    """One output_dir holds one model's run: resuming another model there would mix results."""
    meta = out / "journal" / "run.json"
    ident = {"label": label, "candidate": candidate}
    if meta.exists():
        old = json.loads(meta.read_text())
        if old != ident:
            raise ValueError(
                f"{out} already holds the evaluation of {old}, not {ident}: give each model "
                "(label) its own output_dir"
            )
    else:
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(ident))


@dataclasses.dataclass
class EvalSet:
    """The examples of one run with what the candidate sees for each."""

    examples: list[ds.EvalExample]
    system_prompts: list[str]
    shots: list[list]
    chats: list[list[dict[str, str]]]
    in_context_info: dict[str, Any] | None
    taxonomy: Taxonomy


@dataclasses.dataclass
class Judged:
    """Raw judge texts, keyed by example index (only examples whose generation succeeded)."""

    helpfulness: dict[int, str | None]
    safety: dict[int, str | None]
    self_check: dict[int, str | None]
    # the parsed verdicts with the structured-output mode each came from (judges.finish_verdict)
    help_verdicts: dict[int, Any] = dataclasses.field(default_factory=dict)
    safety_verdicts: dict[int, Any] = dataclasses.field(default_factory=dict)


def build_eval_set(c: Any, baseline: str) -> EvalSet:
    """Load the data set and render each example's system prompt, shots and chat."""
    d = c.dataset
    tax = taxonomy_from_config(c)
    examples = ds.load_eval_set(d.name, d.source or "mini", limit_per_config=d.limit_per_config or None,
                                limit=d.limit or None, taxonomy=tax)
    seed = int(c.seed)
    system_prompts = [ds.system_prompt_for(e, seed) for e in examples]
    shots: list[list] = [[] for _ in examples]
    info = None
    if baseline == "in_context":
        shots, info = _prepare_shots(c, examples)
    chats = [bl.build_messages(sp, e.prompt, s) for e, sp, s in zip(examples, system_prompts, shots)]
    return EvalSet(examples, system_prompts, shots, chats, info, tax)


def judge_chats(examples: Sequence[ds.EvalExample], responses: Sequence[str | None], ok: Sequence[int],
                tax: Taxonomy) -> tuple[list, list]:
    """Helpfulness chats for every answered example, then one safety chat each (compliance for
    free-form configs, response risks for category configs); with the judge of each chat."""
    risk = judges.judges_for(tax)["response_risk"]
    used = [judges.HELPFULNESS] * len(ok)
    used += [judges.COMPLIANCE if examples[i].freeform else risk for i in ok]
    chats = [judges.HELPFULNESS.messages(examples[i].prompt, responses[i]) for i in ok]
    for i in ok:
        e = examples[i]
        if e.freeform:
            chats.append(judges.COMPLIANCE.messages(e.config_text or "", e.prompt, responses[i]))
        else:
            chats.append(risk.messages(e.prompt, responses[i]))
    return chats, used


def generate_and_judge(c: Any, es: EvalSet, out: Path, baseline: str, label: str, progress: bool,
                       candidate_fn: ChatFn | None, judge_fn: ChatFn | None
                       ) -> tuple[list[str | None], Judged, dict[str, Any]]:
    """Candidate responses, the judges' verdict texts, and (cascade_self) the self-checks."""
    usage: dict[str, Any] = {}
    with Journal(out / "journal" / "candidate.sqlite") as jc, Journal(out / "journal" / "judge.sqlite") as jj:
        responses, usage["candidate"] = run_chats(
            c.candidate, jc, es.chats, c.max_new_tokens, role="candidate", progress=progress, fn=candidate_fn,
            salt=label,
        )
        ok = [i for i, r in enumerate(responses) if r is not None]
        chats_j, used = judge_chats(es.examples, responses, ok, es.taxonomy)
        n_judged = len(chats_j)
        calibration = str(c.judge.get("calibration") or "off")
        chats_j, used = judges.with_content_free(chats_j, used, calibration)
        replies: list = []
        judged, usage["judge"] = run_chats(
            c.judge, jj, chats_j, c.judge.max_tokens, role="judge", progress=progress, fn=judge_fn,
            outputs=[j.output for j in used], replies_out=replies,
        )
        n = len(ok)
        rating = str(c.judge.get("rating") or "argmax")
        verdicts = (judges.finish_verdicts(used, judged, replies, n_judged, rating, calibration)
                    if replies else [None] * n_judged)
        judged = judged[:n_judged]
        self_raw: dict[int, str | None] = {}
        if baseline == "cascade_self":
            self_chats = [bl.self_check_messages(es.examples[i], es.system_prompts[i], responses[i]) for i in ok]
            texts, usage["self_check"] = run_chats(
                c.candidate, jc, self_chats, c.baseline.self_check_max_tokens, role="self_check",
                progress=progress, fn=candidate_fn, salt=label,
            )
            self_raw = dict(zip(ok, texts))
    return responses, Judged(dict(zip(ok, judged[:n])), dict(zip(ok, judged[n:])), self_raw,
                             {i: v for i, v in zip(ok, verdicts[:n]) if v is not None},
                             {i: v for i, v in zip(ok, verdicts[n:]) if v is not None}), usage


def record_rows(es: EvalSet, responses: Sequence[str | None], judged: Judged) -> list[dict[str, Any]]:
    """One record per example: what was asked, answered, and the parsed verdicts."""
    rows: list[dict[str, Any]] = []
    for i, e in enumerate(es.examples):
        row: dict[str, Any] = {
            "example_id": e.example_id,
            "config_id": e.config_id,
            "prompt": e.prompt,
            "prompt_type": e.prompt_type,
            "allowed": None if e.freeform else [x.value for x in e.allowed or ()],
            "system_prompt": es.system_prompts[i],
            "n_shots": len(es.shots[i]),
            "response": responses[i],
            "generation_failed": responses[i] is None,
        }
        rating = risks = compliant = None
        if responses[i] is not None:
            h = judged.help_verdicts.get(i) or judges.HELPFULNESS.parse(judged.helpfulness[i])
            s = judged.safety_verdicts.get(i) or (
                judges.COMPLIANCE if e.freeform else judges.judges_for(es.taxonomy)["response_risk"]).parse(judged.safety[i])
            rating = h.value if h.valid else None
            if e.freeform:
                compliant = s.value if s.valid else None
            else:
                risks = tuple(s.value) if s.valid else None
            row.update(
                helpfulness_judge=judged.helpfulness[i], safety_judge=judged.safety[i],
                helpfulness_error=h.error, safety_error=s.error,
                judge_mode=h.mode, helpfulness_lenient=h.lenient, safety_lenient=s.lenient,
            )
        row.update(rating=rating, risks=None if risks is None else [x.value for x in risks], compliant=compliant)
        rows.append(row)
    return rows


def judged_record(row: Mapping[str, Any], tax: Taxonomy) -> JudgedRecord:
    parse_categories = tax.parse_categories
    return JudgedRecord(
        config_id=row["config_id"],
        rating=row["rating"],
        allowed=None if row["allowed"] is None else parse_categories(row["allowed"]),
        risks=None if row["risks"] is None else parse_categories(row["risks"]),
        compliant=row["compliant"],
        prompt_type=row["prompt_type"],
    )


def apply_cascade(baseline: str, on_invalid: str, examples: Sequence[ds.EvalExample],
                  rows: list[dict[str, Any]], self_raw: Mapping[int, str | None], tax: Taxonomy) -> dict[str, Any]:
    """Replace (in ``rows``) every response the cascade's check rejects by the refusal."""
    parse_categories = tax.parse_categories
    replaced = invalid = 0
    for i, (e, row) in enumerate(zip(examples, rows)):
        if row["generation_failed"]:
            continue
        if baseline == "cascade_judge":
            verdict = bl.oracle_compliant(e, None if row["risks"] is None else parse_categories(row["risks"]),
                                          row["compliant"])
        else:
            parsed = judges.COMPLIANCE.parse(self_raw[i])
            verdict = parsed.value if parsed.valid else None
            row["self_check_judge"] = self_raw[i]
        invalid += verdict is None
        row["cascade_verdict"] = verdict
        if not bl.keep_response(verdict, on_invalid):
            replaced += 1
            row.update(
                cascade_replaced=True, original_response=row["response"], response=bl.CASCADE_REFUSAL,
                rating=0, risks=None if e.freeform else [], compliant=True if e.freeform else None,
            )
    return {"replaced": replaced, "invalid_verdicts": invalid, "on_invalid": on_invalid}


def write_results(results: dict[str, Any], rows: Sequence[Mapping[str, Any]], out: Path, plots: bool) -> None:
    """records.jsonl, the report (results.md, plots) and results.json, the last one last."""
    with open(out / "records.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    results["files"] = write_report(results, out, plots=plots) | {"records": str(out / "records.jsonl")}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def evaluate(cfg: Any, *, candidate_fn: ChatFn | None = None, judge_fn: ChatFn | None = None) -> dict[str, Any]:
    """Run one evaluation and write its report; returns the results dict (also results.json)."""
    validate(cfg)
    c = cfg
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = bool(c.progress)
    baseline = bl.check_baseline(c.baseline.name)
    es = build_eval_set(c, baseline)
    candidate = _endpoint_label(c.candidate)
    label = c.label or candidate
    _check_run_identity(out, label, candidate)
    responses, judged, usage = generate_and_judge(c, es, out, baseline, label, progress, candidate_fn, judge_fn)
    rows = record_rows(es, responses, judged)
    tax = es.taxonomy
    train = tax.parse_categories(c.train_categories) if c.train_categories else tax.seen
    metrics_before = cascade_info = None
    if baseline in ("cascade_judge", "cascade_self"):
        metrics_before = cosa_score([judged_record(r, tax) for r in rows], train_categories=train)
        cascade_info = apply_cascade(baseline, c.baseline.on_invalid, es.examples, rows, judged.self_check, tax)
    results = {
        "label": label,
        "dataset": f"{c.dataset.name}:{c.dataset.source or 'mini'}",
        "baseline": baseline,
        "candidate": candidate,
        "judge": _endpoint_label(c.judge),
        "taxonomy": {"name": tax.name, "source": tax.source, "categories": [[x.value, x.short] for x in tax.categories]},
        "seed": int(c.seed),
        "max_new_tokens": int(c.max_new_tokens),
        "n_examples": len(es.examples),
        "generation_failed": sum(r["generation_failed"] for r in rows),
        "metrics": cosa_score([judged_record(r, tax) for r in rows], train_categories=train),
        "metrics_before_cascade": metrics_before,
        "cascade": cascade_info,
        "in_context": es.in_context_info,
        "judge_verdicts": {
            "helpfulness": judges.verdict_counts([judged.help_verdicts.get(i) for i in judged.helpfulness]),
            "safety": judges.verdict_counts([judged.safety_verdicts.get(i) for i in judged.safety]),
        },
        "usage": usage,
    }
    write_results(results, rows, out, plots=bool(c.plots))
    return results

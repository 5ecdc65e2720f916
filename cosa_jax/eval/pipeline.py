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

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from tqdm.auto import tqdm

from cosa_jax import judges
from cosa_jax.eval import baselines as bl
from cosa_jax.eval import datasets as ds
from cosa_jax.eval.metrics import JudgedRecord, cosa_score
from cosa_jax.eval.report import write_report
from cosa_jax.endpoint.client import ChatRequest, EndpointConfig, run_requests_sync
from cosa_jax.endpoint.journal import Journal, request_key
from cosa_jax.taxonomy import SEEN_CATEGORIES, parse_categories

ChatFn = Callable[[list[list[dict[str, str]]], int], list[str]]

# Keys of cfg.candidate / cfg.judge that are ours; the rest go to EndpointConfig.
_OWN_ENDPOINT_KEYS = ("kind", "fn", "label", "batch_size", "max_tokens", "structured_outputs", "rating")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by configs/eval_*.py; a config file overrides what it needs."""
    c = ml_collections.ConfigDict()
    c.label = ""  # name of this run in tables; defaults to the candidate model
    c.output_dir = "runs/eval"
    c.seed = 0
    c.max_new_tokens = 1024
    c.progress = True
    c.plots = True
    c.train_categories = list(cat.value for cat in SEEN_CATEGORIES)
    c.dataset = ml_collections.ConfigDict(
        dict(name="cosalign_test", source="mini", limit_per_config=0, limit=0)
    )
    c.candidate = ml_collections.ConfigDict(
        dict(
            kind="openai",
            model="cosa",
            base_url="http://127.0.0.1:8000/v1",
            api_key_env="",
            concurrency=8,
            timeout_s=600.0,
            max_attempts=4,
            fn=None,
            batch_size=8,
            label="",
        )
    )
    c.judge = ml_collections.ConfigDict(
        dict(
            kind="openai",
            model="gpt-4o",
            base_url="",
            api_key_env="OPENAI_API_KEY",
            concurrency=16,
            timeout_s=120.0,
            max_attempts=8,
            max_tokens=1024,
            fn=None,
            batch_size=8,
            label="",
            # auto | vllm | openai | off: ask the judge for its verdict schema (auto falls back to
            # free text where the endpoint answers 400); a callable judge gets the constraints
            # as fn(chats, max_tokens, constraints=[...]) unless "off"
            structured_outputs="auto",
            rating="argmax",  # argmax (the paper's) | expected: log-prob-weighted mean over 0..5
        )
    )
    c.baseline = ml_collections.ConfigDict(
        dict(
            name="none",  # none | in_context | cascade_judge | cascade_self
            k=5,
            train_pairs="",  # CoSAlign-Train-schema pairs for in-context shots (category configs)
            shots="mini",  # hand-written shots for free-form configs
            on_invalid="refuse",  # cascade: what an unparseable verdict does
            self_check_max_tokens=256,
        )
    )
    return c


def _as_dict(x: Any) -> dict[str, Any]:
    if x is None:
        return {}
    if isinstance(x, ml_collections.ConfigDict):
        return {k: x[k] for k in x.keys()}  # shallow, keeps callables untouched
    return dict(x)


def _merged(cfg: Any) -> dict[str, Any]:
    """cfg over base_config(), one level deep for the sub-dicts."""
    base = _as_dict(base_config())
    user = _as_dict(cfg)
    unknown = sorted(set(user) - set(base))
    if unknown:
        raise ValueError(f"evaluation config: unknown key(s) {unknown}; known: {sorted(base)}")
    out = {k: _as_dict(v) if isinstance(v, ml_collections.ConfigDict) else v for k, v in base.items()}
    for k, v in user.items():
        if isinstance(base[k], ml_collections.ConfigDict):
            sub = _as_dict(base[k])
            extra = _as_dict(v)
            if k in ("dataset", "baseline"):
                bad = sorted(set(extra) - set(sub))
                if bad:
                    raise ValueError(f"evaluation config: unknown key(s) {bad} in '{k}'; known: {sorted(sub)}")
            sub.update(extra)
            out[k] = sub
        else:
            out[k] = v
    return out


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
    if outputs is not None:
        judges.check_judge_options(mode, rating, where=f"config.{role}")
    if kind == "openai" and outputs is not None:
        ep_fields = {k: v for k, v in role_cfg.items() if k not in _OWN_ENDPOINT_KEYS}
        ep_fields["base_url"] = ep_fields.get("base_url") or None
        ep_fields["api_key_env"] = ep_fields.get("api_key_env") or None
        endpoint = EndpointConfig.from_mapping(ep_fields, where=f"config.{role}")
        results, usage, modes = judges.run_structured(endpoint, journal, chats, outputs, params, mode,
                                                      rating=rating, role=role, progress=progress)
        if replies_out is not None:
            replies_out.extend((m, None if r is None else r.get("logprobs")) for m, r in zip(modes, results))
        return [None if r is None else r["text"] for r in results], dict(vars(usage))
    if kind == "openai":
        ep_fields = {k: v for k, v in role_cfg.items() if k not in _OWN_ENDPOINT_KEYS}
        if not ep_fields.get("base_url"):
            ep_fields["base_url"] = None
        if not ep_fields.get("api_key_env"):
            ep_fields["api_key_env"] = None
        endpoint = EndpointConfig.from_mapping(ep_fields, where=f"config.{role}")
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
        for (k, _), t in zip(batch, texts):
            if not isinstance(t, str):
                raise TypeError(f"config.{role}.fn must return strings, got {type(t).__name__}")
            journal.put(k, {"text": t})  # after each batch: a kill loses at most one batch
    usage = {"requests": len(items), "cached": len(chats) - len(items), "seconds": round(time.time() - t0, 2)}
    if replies_out is not None:
        replies_out.extend(("callable" if constrained else "off", None) for _ in chats)
    return [journal.get(k)["text"] for k in keys], usage


# ----- the pipeline ------------------------------------------------------------------------------


def _prepare_shots(cfg: Mapping[str, Any], examples: Sequence[ds.EvalExample]) -> tuple[list[list], dict[str, Any]]:
    b = cfg["baseline"]
    k = int(b["k"])
    if cfg["dataset"]["name"] == "cosapien":
        free = ds.load_cosapien_shots(b["shots"] or "mini")
        shots = [bl.draw_shots(e, k, seed=cfg["seed"], freeform_shots=free) for e in examples]
    else:
        if not b["train_pairs"]:
            raise ValueError(
                "baseline 'in_context' on category configs needs baseline.train_pairs: a file or folder "
                "of training pairs in the CoSAlign-Train schema (e.g. the synthesis 'pairs' output)"
            )
        by_config = bl.index_pairs_by_config(ds.load_train_pairs(b["train_pairs"]))
        shots = [bl.draw_shots(e, k, seed=cfg["seed"], pairs_by_config=by_config) for e in examples]
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


def evaluate(cfg: Any, *, candidate_fn: ChatFn | None = None, judge_fn: ChatFn | None = None) -> dict[str, Any]:
    """Run one evaluation and write its report; returns the results dict (also results.json)."""
    c = _merged(cfg)
    out = Path(c["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    seed = int(c["seed"])
    progress = bool(c["progress"])
    baseline = bl.check_baseline(c["baseline"]["name"])
    dcfg = c["dataset"]
    examples = ds.load_eval_set(
        dcfg["name"], dcfg["source"] or "mini", limit_per_config=dcfg["limit_per_config"] or None, limit=dcfg["limit"] or None
    )
    system_prompts = [ds.system_prompt_for(e, seed) for e in examples]
    shots: list[list] = [[] for _ in examples]
    in_context_info = None
    if baseline == "in_context":
        shots, in_context_info = _prepare_shots(c, examples)
    chats = [bl.build_messages(sp, e.prompt, s) for e, sp, s in zip(examples, system_prompts, shots)]

    label = c["label"] or _endpoint_label(c["candidate"])
    _check_run_identity(out, label, _endpoint_label(c["candidate"]))
    usage: dict[str, Any] = {}
    with Journal(out / "journal" / "candidate.jsonl") as jc, Journal(out / "journal" / "judge.jsonl") as jj:
        responses, usage["candidate"] = run_chats(
            c["candidate"], jc, chats, c["max_new_tokens"], role="candidate", progress=progress, fn=candidate_fn,
            salt=label,
        )
        ok = [i for i, r in enumerate(responses) if r is not None]
        judge_chats = [judges.HELPFULNESS.messages(examples[i].prompt, responses[i]) for i in ok]
        used = [judges.HELPFULNESS] * len(ok)
        for i in ok:
            e = examples[i]
            if e.freeform:
                judge_chats.append(judges.COMPLIANCE.messages(e.config_text or "", e.prompt, responses[i]))
                used.append(judges.COMPLIANCE)
            else:
                judge_chats.append(judges.RESPONSE_RISK.messages(e.prompt, responses[i]))
                used.append(judges.RESPONSE_RISK)
        replies: list = []
        judged, usage["judge"] = run_chats(
            c["judge"], jj, judge_chats, c["judge"]["max_tokens"], role="judge", progress=progress, fn=judge_fn,
            outputs=[j.output for j in used], replies_out=replies,
        )
        n = len(ok)
        verdicts = [judges.finish_verdict(j, t, m, str(c["judge"].get("rating") or "argmax"), lp)
                    if t is not None else None for j, t, (m, lp) in zip(used, judged, replies)]
        help_raw = dict(zip(ok, judged[:n]))
        safety_raw = dict(zip(ok, judged[n:]))
        help_v = dict(zip(ok, verdicts[:n]))
        safety_v = dict(zip(ok, verdicts[n:]))

        self_raw: dict[int, str | None] = {}
        if baseline == "cascade_self":
            self_chats = [bl.self_check_messages(examples[i], system_prompts[i], responses[i]) for i in ok]
            texts, usage["self_check"] = run_chats(
                c["candidate"], jc, self_chats, c["baseline"]["self_check_max_tokens"], role="self_check",
                progress=progress, fn=candidate_fn, salt=label,
            )
            self_raw = dict(zip(ok, texts))

    rows: list[dict[str, Any]] = []
    for i, e in enumerate(examples):
        row: dict[str, Any] = {
            "example_id": e.example_id,
            "config_id": e.config_id,
            "prompt": e.prompt,
            "prompt_type": e.prompt_type,
            "allowed": None if e.freeform else [x.value for x in e.allowed or ()],
            "system_prompt": system_prompts[i],
            "n_shots": len(shots[i]),
            "response": responses[i],
            "generation_failed": responses[i] is None,
        }
        rating = risks = compliant = None
        if responses[i] is not None:
            h, s = help_v[i], safety_v[i]
            rating = h.value if h.valid else None
            if e.freeform:
                compliant = s.value if s.valid else None
            else:
                risks = tuple(s.value) if s.valid else None
            row.update(
                helpfulness_judge=help_raw[i], safety_judge=safety_raw[i],
                helpfulness_error=h.error, safety_error=s.error,
                judge_mode=h.mode, helpfulness_lenient=h.lenient, safety_lenient=s.lenient,
            )
        row.update(rating=rating, risks=None if risks is None else [x.value for x in risks], compliant=compliant)
        rows.append(row)

    def record(row: Mapping[str, Any]) -> JudgedRecord:
        return JudgedRecord(
            config_id=row["config_id"],
            rating=row["rating"],
            allowed=None if row["allowed"] is None else parse_categories(row["allowed"]),
            risks=None if row["risks"] is None else parse_categories(row["risks"]),
            compliant=row["compliant"],
            prompt_type=row["prompt_type"],
        )

    train = parse_categories(c["train_categories"])
    metrics_before = None
    cascade_info = None
    if baseline in ("cascade_judge", "cascade_self"):
        metrics_before = cosa_score([record(r) for r in rows], train_categories=train)
        on_invalid = c["baseline"]["on_invalid"]
        replaced = invalid = 0
        for i, (e, row) in enumerate(zip(examples, rows)):
            if row["generation_failed"]:
                continue
            if baseline == "cascade_judge":
                verdict = bl.oracle_compliant(e, None if row["risks"] is None else parse_categories(row["risks"]), row["compliant"])
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
        cascade_info = {"replaced": replaced, "invalid_verdicts": invalid, "on_invalid": on_invalid}

    metrics = cosa_score([record(r) for r in rows], train_categories=train)
    results = {
        "label": label,
        "dataset": f"{dcfg['name']}:{dcfg['source'] or 'mini'}",
        "baseline": baseline,
        "candidate": _endpoint_label(c["candidate"]),
        "judge": _endpoint_label(c["judge"]),
        "seed": seed,
        "max_new_tokens": int(c["max_new_tokens"]),
        "n_examples": len(examples),
        "generation_failed": sum(r["generation_failed"] for r in rows),
        "metrics": metrics,
        "metrics_before_cascade": metrics_before,
        "cascade": cascade_info,
        "in_context": in_context_info,
        "judge_verdicts": {
            "helpfulness": judges.verdict_counts([help_v.get(i) for i in ok]),
            "safety": judges.verdict_counts([safety_v.get(i) for i in ok]),
        },
        "usage": usage,
    }
    with open(out / "records.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    results["files"] = write_report(results, out, plots=bool(c["plots"])) | {"records": str(out / "records.jsonl")}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results

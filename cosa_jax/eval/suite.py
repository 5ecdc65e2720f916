"""The paper's whole evaluation in one run and one report per model.

Stages (``suite.stages``): CoSAlign-Test (CoSA-Score on seen and unseen configs), CoSApien,
over-refusal (``eval.overrefusal``), general capability (lm-eval, ``eval.capability``) and
general safety (``eval.general_safety``), for every model in ``suite.models``; the baselines in
``suite.baselines`` (in-context alignment, cascades) add rows to the CoSA stages. Each model gets
``output_dir/<label>/`` with ``suite.md``, ``suite.json`` and ``suite.png`` side by side.

Resuming: every chat goes through a journal under the stage's folder, lm-eval through its own
request cache, and each finished stage's summary through ``<label>/journal/suite.sqlite`` keyed by
the stage's settings, so a rerun after a crash sends only what never completed. Every reported
number carries the judge it rests on and its count of valid verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

from cosa_jax import judges
from cosa_jax.endpoint.journal import Journal, request_key
from cosa_jax.eval import capability as cap
from cosa_jax.eval import general_safety as gs
from cosa_jax.eval import overrefusal as orf
from cosa_jax.eval.baselines import BASELINES
from cosa_jax.eval.config import default_config as eval_default_config
from cosa_jax.eval.pipeline import evaluate, run_chats

STAGES = ("cosalign_test", "cosapien", "over_refusal", "capability", "general_safety")
# Keys of a suite.models entry that go to the candidate endpoint; ``tokenizer`` is lm-eval's.
_CANDIDATE_KEYS = tuple(eval_default_config().candidate.keys())


def default_config() -> ml_collections.ConfigDict:
    """The suite's defaults: the evaluation keys of ``eval.config.default_config`` plus ``suite``."""
    c = eval_default_config()
    c.output_dir = "runs/eval_suite"
    s = ml_collections.ConfigDict()
    s.stages = list(STAGES)
    s.models = [ml_collections.ConfigDict(dict(
        label="cosa", kind="openai", model="cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="",
        concurrency=8, timeout_s=600.0, max_attempts=4, fn=None, batch_size=8, tokenizer="",
    ))]
    s.baselines = ["in_context", "cascade_judge"]
    s.cosalign_test = ml_collections.ConfigDict(dict(source="mini", limit_per_config=0, limit=0))
    s.cosapien = ml_collections.ConfigDict(dict(source="mini", limit_per_config=0, limit=0))
    s.over_refusal = ml_collections.ConfigDict(dict(
        source="mini", split="test", limit=0, system_prompt=orf.HELPFUL_SYSTEM_PROMPT, max_new_tokens=512,
    ))
    s.capability = ml_collections.ConfigDict(dict(
        tasks=[cap.MINI_TASK], api="local-completions", include_path="", mini_data="", num_fewshot=-1,
        limit=0, num_concurrent=1, max_length=2048,
    ))
    s.general_safety = ml_collections.ConfigDict(dict(
        source="mini", prompt_field="prompt", split="train", limit=0, max_new_tokens=512,
        system_prompt=orf.HELPFUL_SYSTEM_PROMPT,
    ))
    # Llama-Guard-3 served by vLLM (``vllm serve meta-llama/Llama-Guard-3-8B --port 8001``).
    s.safety_judge = ml_collections.ConfigDict(dict(
        format="llama_guard", kind="openai", model="meta-llama/Llama-Guard-3-8B",
        base_url="http://127.0.0.1:8001/v1", api_key_env="", concurrency=8, timeout_s=120.0,
        max_attempts=4, max_tokens=32, fn=None, batch_size=8, label="",
    ))
    c.suite = s
    return c


def _d(x: Any) -> dict[str, Any]:
    if x is None:
        return {}
    if isinstance(x, ml_collections.ConfigDict):
        return {k: x[k] for k in x.keys()}
    return dict(x)


def validate(cfg: Any) -> None:
    """Reject what would fail late (unknown stage, duplicate label, bad format) before any work."""
    s = cfg.suite
    bad = sorted(set(s.stages) - set(STAGES))
    if bad:
        raise ValueError(f"suite.stages: unknown stage(s) {bad}; known: {list(STAGES)}")
    if not s.models:
        raise ValueError("suite.models is empty: name at least one model (label + endpoint)")
    labels = []
    for i, m in enumerate(s.models):
        m = _d(m)
        unknown = sorted(set(m) - set(_CANDIDATE_KEYS) - {"tokenizer"})
        if unknown:
            raise ValueError(f"suite.models[{i}]: unknown key(s) {unknown}; known: {sorted(_CANDIDATE_KEYS)} + tokenizer")
        if not m.get("label"):
            raise ValueError(f"suite.models[{i}]: 'label' is required (it names the model's output folder)")
        labels.append(m["label"])
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"suite.models: duplicate label(s) {dup}")
    for b in s.baselines:
        if b not in BASELINES or b == "none":
            raise ValueError(f"suite.baselines: {b!r} is not a baseline; known: {[x for x in BASELINES if x != 'none']}")
    if "general_safety" in s.stages:
        gs.classifier(s.safety_judge.format)
    if "capability" in s.stages and not s.capability.tasks:
        raise ValueError("suite.capability.tasks is empty: name lm-eval tasks or drop the 'capability' stage")


def _label(role: Mapping[str, Any]) -> str:
    return str(role.get("label") or role.get("model") or "callable")


# ----- stages --------------------------------------------------------------------------------


def _cosa_stage(cfg: Any, stage: str, model: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """One evaluate() per system (the model, then each baseline); rows of CoSA-Scores."""
    st = _d(cfg.suite[stage])
    rows, skipped = [], []
    for baseline in ["none"] + list(cfg.suite.baselines):
        if baseline == "in_context" and stage == "cosalign_test" and not cfg.baseline.train_pairs:
            skipped.append("in_context (no baseline.train_pairs)")  # category-config shots need pairs
            continue
        sub = eval_default_config()
        for k in ("seed", "max_new_tokens", "progress", "plots", "train_categories"):
            sub[k] = cfg[k]
        sub.label = model["label"]
        sub.output_dir = str(out / stage / baseline)
        # All systems of a stage share one journal folder: a cascade reuses the model's answers and
        # verdicts, so they are generated and judged once, not once per row.
        shared, mine = out / stage / "journal", out / stage / baseline / "journal"
        shared.mkdir(parents=True, exist_ok=True)
        if not mine.exists():
            mine.parent.mkdir(parents=True, exist_ok=True)
            mine.symlink_to(shared.resolve(), target_is_directory=True)
        sub.dataset.update(name=stage, **st)
        sub.candidate.update({k: v for k, v in model.items() if k in _CANDIDATE_KEYS})
        sub.judge.update(_d(cfg.judge))
        sub.baseline.update(_d(cfg.baseline))
        sub.baseline.name = baseline
        r = evaluate(sub)
        m = r["metrics"]
        row = {"system": "model" if baseline == "none" else baseline, "judge": r["judge"],
               "all": {"cosa_score": m["cosa_score"], "n_valid": m["n_valid"], "n": m["n"]}}
        for g, gm in m["groups"].items():
            row[g] = {"cosa_score": gm["cosa_score"], "n_valid": gm["n_valid"], "n": gm["n"]}
        rows.append(row)
    return {"rows": rows, "skipped": skipped}


def _generate_and_judge(cfg, model, out: Path, prompts: Sequence[str], system_prompt: str, max_new_tokens: int,
                        judge: judges.Judge, judge_cfg: Mapping[str, Any]) -> tuple[list, list, list]:
    progress = bool(cfg.progress)
    chats = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": p}] for p in prompts]
    # One candidate journal per model: over-refusal and general safety often ask the same chats.
    with Journal(out.parent / "journal" / "candidate.sqlite") as jc, Journal(out / "journal" / "judge.sqlite") as jj:
        cand = {k: v for k, v in model.items() if k in _CANDIDATE_KEYS}
        responses, _ = run_chats(cand, jc, chats, max_new_tokens, role="candidate", progress=progress,
                                 salt=model["label"])
        ok = [i for i, r in enumerate(responses) if r is not None]
        # The judge is asked for its verdict schema as judge.structured_outputs says (auto: vLLM's
        # field, else OpenAI's, else free text), like the CoSA judges; each verdict keeps its mode.
        replies: list = []
        raw, _ = run_chats(judge_cfg, jj, [judge.messages(prompts[i], responses[i]) for i in ok],
                           int(judge_cfg.get("max_tokens") or 256), role="judge", progress=progress,
                           outputs=[judge.output] * len(ok), replies_out=replies)
    raw_by = dict(zip(ok, raw))
    mode_by = {i: m for i, (m, _) in zip(ok, replies)} if replies else {}
    parsed = [judges.finish_verdict(judge, raw_by[i], mode_by.get(i, "off")) if raw_by.get(i) is not None
              else None for i in range(len(prompts))]
    return responses, [raw_by.get(i) for i in range(len(prompts))], parsed


def _write_records(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def _over_refusal_stage(cfg, model, out: Path) -> dict[str, Any]:
    st = _d(cfg.suite.over_refusal)
    items = orf.load_items(st["source"], split=st["split"], limit=int(st["limit"]))
    judge_cfg = _d(cfg.judge)
    responses, raw, parsed = _generate_and_judge(
        cfg, model, out, [it.prompt for it in items], st["system_prompt"], int(st["max_new_tokens"]),
        judges.OVER_REFUSAL, judge_cfg)
    verdicts = [p.value if p is not None and p.valid else None for p in parsed]
    _write_records(out / "records.jsonl", [
        {"id": it.item_id, "prompt": it.prompt, "label": it.label, "type": it.prompt_type, "response": r,
         "judge_raw": j, "verdict": v} for it, r, j, v in zip(items, responses, raw, verdicts)])
    return {"judge": _label(judge_cfg), "source": st["source"],
            "metrics": orf.refusal_metrics([it.label for it in items], verdicts)}


def _general_safety_stage(cfg, model, out: Path) -> dict[str, Any]:
    st = _d(cfg.suite.general_safety)
    prompts = gs.load_prompts(st["source"], prompt_field=st["prompt_field"], split=st["split"], limit=int(st["limit"]))
    jcfg = _d(cfg.suite.safety_judge)
    clf = gs.classifier(jcfg.pop("format"))
    responses, raw, parsed = _generate_and_judge(
        cfg, model, out, prompts, st["system_prompt"], int(st["max_new_tokens"]), clf, jcfg)
    verdicts = [p.value if p is not None and p.valid else None for p in parsed]
    _write_records(out / "records.jsonl", [
        {"prompt": p, "response": r, "judge_raw": j,
         "unsafe": None if v is None else v.unsafe, "categories": None if v is None else list(v.categories)}
        for p, r, j, v in zip(prompts, responses, raw, verdicts)])
    return {"judge": f"{_label(jcfg)} ({clf.name})", "source": st["source"], "metrics": gs.safety_metrics(verdicts)}


def _capability_stage(cfg, model, out: Path) -> dict[str, Any]:
    st = _d(cfg.suite.capability)
    if model.get("kind", "openai") != "openai" or not model.get("base_url"):
        raise ValueError(f"suite.models[{model['label']}]: the capability stage runs lm-eval against an "
                         "OpenAI-compatible endpoint; give the model kind 'openai' and a base_url")
    scores, raw = cap.run_lm_eval(
        base_url=model["base_url"], model=model["model"], tasks=list(st["tasks"]), tokenizer=model.get("tokenizer", ""),
        api=st["api"], include_path=st["include_path"] or None, mini_data=st["mini_data"] or None, work_dir=out,
        num_fewshot=None if int(st["num_fewshot"]) < 0 else int(st["num_fewshot"]), limit=st["limit"] or None,
        num_concurrent=int(st["num_concurrent"]), max_length=int(st["max_length"]),
    )
    (out / "lm_eval_results.json").write_text(json.dumps(raw, indent=2, default=str))
    return {"judge": f"lm-eval {st['api']}", "scores": [vars(s) for s in scores]}


_RUNNERS = {"over_refusal": _over_refusal_stage, "general_safety": _general_safety_stage,
            "capability": _capability_stage}


def _stage_key(cfg, stage: str, model: Mapping[str, Any]) -> str:
    """What a finished stage's summary depends on (callables by name only)."""
    def plain(x):
        return {k: (v.__qualname__ if callable(v) else v) for k, v in _d(x).items()}
    settings: dict[str, Any] = {"model": plain(model), "stage": plain(cfg.suite[stage]), "seed": cfg.seed}
    if stage in ("cosalign_test", "cosapien"):
        settings.update(judge=plain(cfg.judge), baseline=plain(cfg.baseline), baselines=list(cfg.suite.baselines),
                        max_new_tokens=cfg.max_new_tokens, train_categories=list(cfg.train_categories))
    elif stage == "over_refusal":
        settings.update(judge=plain(cfg.judge))
    elif stage == "general_safety":
        settings.update(safety_judge=plain(cfg.suite.safety_judge))
    return request_key("suite-stage", [{"role": "stage", "content": stage}],
                       json.loads(json.dumps(settings, default=str)))


def run_model(cfg: Any, model: Mapping[str, Any]) -> dict[str, Any]:
    out = Path(cfg.output_dir) / model["label"]
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, Any] = {}
    with Journal(out / "journal" / "suite.sqlite") as sj:
        for stage in cfg.suite.stages:
            key = _stage_key(cfg, stage, model)
            if key not in sj:
                if stage in ("cosalign_test", "cosapien"):
                    summary = _cosa_stage(cfg, stage, model, out)
                else:
                    summary = _RUNNERS[stage](cfg, model, out / stage)
                sj.put(key, summary)
            stages[stage] = sj.get(key)
    results = {"label": model["label"], "candidate": _label(model), "stages": stages}
    from cosa_jax.eval.suite_report import write_suite_report  # matplotlib only when reporting

    results["files"] = write_suite_report(results, out, plots=bool(cfg.plots))
    return results


def run_suite(cfg: Any) -> dict[str, dict[str, Any]]:
    """Every stage for every model; returns {label: results} (also <label>/suite.json)."""
    validate(cfg)
    out = {m["label"]: run_model(cfg, _d(m)) for m in cfg.suite.models}
    if len(out) > 1:
        from cosa_jax.eval.suite_report import write_suite_compare

        write_suite_compare(out, cfg.output_dir)
    return out

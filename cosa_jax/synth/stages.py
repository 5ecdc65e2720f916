"""The synthesis stages of Algorithm 1 (spec §4), each a function from datasets on disk to datasets.

    load_prompts -> label_prompts -> generate_responses -> label_responses -> score -> pair

Each stage reads the previous stage's ``datasets`` directory under ``cfg.out_dir``, writes its own
atomically (temp dir, then rename), and records a summary in ``out_dir/summaries/<stage>.json``.
Requests go through a per-stage journal (``out_dir/journal/<stage>.jsonl``), so rerunning a stage
after a crash sends only the requests that had not completed. All sampling is seeded per prompt
(``random.Random(f"{seed}:{stage}:{prompt_id}...")``): results do not depend on order or batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets

from cosa_jax import judges
from cosa_jax import safety_configs as sc
from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, UsageStats, run_requests
from cosa_jax.endpoint.journal import Journal
from cosa_jax.synth import inputs
from cosa_jax.synth.pairing import LabelledResponse, make_pairs
from cosa_jax.synth.scoring import ScoreWeights, error_score
from cosa_jax.taxonomy import (
    SEEN_CATEGORIES,
    Category,
    parse_categories,
    to_dash_string,
    to_names,
)

STAGES: tuple[str, ...] = ("load_prompts", "label_prompts", "generate_responses", "label_responses", "score", "pair")
OUTPUT_DIR = {
    "load_prompts": "prompts",
    "label_prompts": "labelled_prompts",
    "generate_responses": "responses",
    "label_responses": "labelled_responses",
    "score": "scored",
    "pair": "pairs",
}
PAIR_COLUMNS = (
    "system_prompt",
    "prompt",
    "chosen_response",
    "rejected_response",
    "spec_i",
    "spec_j",
    "mode",
    "chosen_cat",
    "rejected_cat",
    "chosen_category_error_score",
    "rejected_category_error_score",
)


class StageError(RuntimeError):
    pass


# ----- helpers -----------------------------------------------------------------------------


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def _judge_kw(cfg: Any) -> dict[str, Any]:
    """cfg.judge: structured_outputs (auto | vllm | openai | off) and rating (argmax | expected)."""
    j = _cfg_get(cfg, "judge", None) or {}
    get = j.get if hasattr(j, "get") else (lambda k, d=None: getattr(j, k, d))
    kw = dict(structured_outputs=str(get("structured_outputs", "auto")), rating=str(get("rating", "argmax")))
    judges.check_judge_options(kw["structured_outputs"], kw["rating"], where="config.judge")
    return kw


def _out(cfg: Any) -> Path:
    return Path(_cfg_get(cfg, "out_dir"))


def stage_path(cfg: Any, stage: str) -> Path:
    return _out(cfg) / OUTPUT_DIR[stage]


def _read_stage(cfg: Any, stage: str) -> datasets.Dataset:
    p = stage_path(cfg, stage)
    if not p.exists():
        raise StageError(f"input {p} of a later stage is missing: run stage {stage!r} first")
    # `datasets` saves a 0-row dataset without any data file and then cannot load it back.
    state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
    if "_data_files" in state and not state["_data_files"]:
        raise StageError(f"stage {stage!r} produced no rows ({p}): nothing left for the stages "
                         f"after it; see that stage's summary for what was dropped")
    return datasets.load_from_disk(str(p))


def _write_atomic(obj: datasets.Dataset | datasets.DatasetDict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    datasets.disable_progress_bars()  # one bar per save is noise next to the request bars
    obj.save_to_disk(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _write_summary(cfg: Any, stage: str, summary: dict[str, Any]) -> None:
    p = _out(cfg) / "summaries" / f"{stage}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))


def _from_rows(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    if not rows:  # from_list([]) loses the columns; an empty stage output keeps its schema
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)


def train_categories(cfg: Any) -> tuple[Category, ...]:
    names = _cfg_get(cfg, "train_categories", None)
    return parse_categories(names) if names else SEEN_CATEGORIES


def endpoint(cfg: Any, role: str) -> EndpointConfig:
    eps = _cfg_get(cfg, "endpoints")
    if eps is None or role not in eps:
        raise StageError(f"config has no endpoints.{role}")
    return EndpointConfig.from_mapping(eps[role], where=f"config.endpoints.{role}")


def _journal(cfg: Any, stage: str) -> Journal:
    return Journal(_out(cfg) / "journal" / f"{stage}.jsonl")


def _usage_dict(u: UsageStats) -> dict[str, Any]:
    return dict(vars(u))


def _check_failures(results: Sequence[Any], what: str, cfg: Any) -> int:
    n_failed = sum(r is None for r in results)
    if n_failed and not _cfg_get(cfg, "allow_partial", False):
        raise StageError(
            f"{n_failed} {what} request(s) failed after retries; completed ones are journaled, so "
            "rerunning this stage sends only the missing ones (or set allow_partial=True)"
        )
    return n_failed


# ----- stage 1: load prompts ----------------------------------------------------------------

PROMPT_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "source": datasets.Value("string"),
        "gold_categories": datasets.Sequence(datasets.Value("string")),
    }
)


def load_prompts(cfg: Any) -> dict[str, Any]:
    """Read all sources, dedupe, filter by length, drop prompts that appear in any test set."""
    sources = _cfg_get(cfg, "sources") or [{"kind": "mini"}]
    rows: list[dict[str, Any]] = []
    per_source = {}
    for src in sources:
        got = inputs.load_source(src)
        per_source[str(dict(src))] = len(got)
        rows += got
    n_raw = len(rows)
    rows = inputs.dedupe(rows)
    n_dedup = len(rows)
    lf = dict(_cfg_get(cfg, "length_filter", None) or {})
    if lf:
        count = inputs.count_tokens_fn(lf.get("tokenizer") or None)
        rows = inputs.filter_length(rows, int(lf.get("min_exclusive", 3)), int(lf.get("max", 64)), count)
    n_len = len(rows)
    test_prompts: list[str] = []
    for spec in _cfg_get(cfg, "test_prompts", None) or []:
        test_prompts += inputs.load_test_prompts(spec if isinstance(spec, str) else dict(spec))
    rows, n_overlap = inputs.drop_overlap(rows, test_prompts)
    _write_atomic(_from_rows(rows, PROMPT_FEATURES), stage_path(cfg, "load_prompts"))
    return {
        "per_source": per_source,
        "raw": n_raw,
        "after_dedupe": n_dedup,
        "after_length_filter": n_len,
        "dropped_test_overlap": n_overlap,
        "kept": len(rows),
    }


# ----- stage 2: label prompts ---------------------------------------------------------------

LABELLED_PROMPT_FEATURES = datasets.Features(
    {
        **PROMPT_FEATURES,
        "categories": datasets.Sequence(datasets.Value("string")),
        "label_raw": datasets.Value("string"),
    }
)


def label_prompts(cfg: Any) -> dict[str, Any]:
    """8-way prompt risk judge; drop unparseable, drop small label groups, cap large ones."""
    ds = _read_stage(cfg, "load_prompts")
    rows = ds.to_list()
    chats = [judges.PROMPT_RISK.messages(r["prompt"]) for r in rows]
    progress = bool(_cfg_get(cfg, "progress", True))

    async def main():
        async with ChatClient(endpoint(cfg, "judge"), "judge") as client:
            with _journal(cfg, "label_prompts") as j:
                res = await judges.judge_batch(
                    client, j, judges.PROMPT_RISK, chats,
                    retries=int(_cfg_get(cfg, "judge_retries", 1)),
                    retry_temperature=float(_cfg_get(cfg, "judge_retry_temperature", 0.7)),
                    desc="label prompts", progress=progress, **_judge_kw(cfg),
                )
            return res, client.usage

    (results, n_retried), usage = asyncio.run(main())
    _check_failures(results, "prompt-label", cfg)
    valid = []
    n_invalid = n_lenient = 0
    modes: dict[str, int] = {}
    for r, res in zip(rows, results):
        if res is None:
            continue
        if not res.valid:
            n_invalid += 1
            continue
        valid.append({**r, "categories": to_names(res.value), "label_raw": res.raw})
        modes[res.mode] = modes.get(res.mode, 0) + 1
        n_lenient += res.lenient
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for r in valid:
        groups[tuple(r["categories"])].append(r)
    min_group = int(_cfg_get(cfg, "min_label_group", 10))
    cap = int(_cfg_get(cfg, "max_per_label_group", 2500))
    seed = int(_cfg_get(cfg, "seed", 0))
    kept: list[dict] = []
    n_small = n_capped = 0
    for key in sorted(groups):
        g = groups[key]
        if len(g) < min_group:
            n_small += len(g)
            continue
        if len(g) > cap:
            rng = random.Random(f"{seed}:cap:{'|'.join(key)}")
            g = sorted(g, key=lambda r: r["prompt_id"])
            g = sc.shuffled(g, rng)[:cap]
            n_capped += len(groups[key]) - cap
        kept += g
    kept.sort(key=lambda r: r["prompt_id"])
    if not kept:
        raise StageError(
            f"label_prompts: no prompt kept out of {len(rows)} ({n_invalid} judge replies were "
            f"unparseable, {n_small} in label groups below min_label_group); nothing to generate. "
            f"Check the judge endpoint (the raw replies are in {_out(cfg) / 'journal'}).")
    _write_atomic(_from_rows(kept, LABELLED_PROMPT_FEATURES), stage_path(cfg, "label_prompts"))
    return {
        "prompts": len(rows),
        "invalid_labels": n_invalid,
        "lenient_labels": n_lenient,
        "judge_modes": modes,
        "judge_reasks": n_retried,
        "dropped_small_groups": n_small,
        "dropped_over_cap": n_capped,
        "kept": len(kept),
        "label_groups": {" + ".join(k) or "(none)": len(v) for k, v in sorted(groups.items())},
        "usage": {"judge": _usage_dict(usage)},
    }


# ----- stage 3: generate responses ----------------------------------------------------------

RESPONSE_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "prompt_categories": datasets.Sequence(datasets.Value("string")),
        "response_id": datasets.Value("string"),
        "generator": datasets.Value("string"),
        "gen_mode": datasets.Value("string"),
        "gen_allowed": datasets.Sequence(datasets.Value("string")),
        "system_prompt": datasets.Value("string"),
        "response": datasets.Value("string"),
        "finish_reason": datasets.Value("string"),
    }
)


def _in_train(cats: Sequence[str], train: Sequence[Category]) -> bool:
    return all(c in train for c in parse_categories(cats) if c != Category.OTHER)


def generation_plan(prompt_row: Mapping[str, Any], cfg: Any) -> list[dict[str, Any]]:
    """The responses to request for one prompt: configs sampled per prompt (seeded)."""
    gen = dict(_cfg_get(cfg, "generation", None) or {})
    train = train_categories(cfg)
    seed = int(_cfg_get(cfg, "seed", 0))
    rng = random.Random(f"{seed}:gen:{prompt_row['prompt_id']}")
    cats = prompt_row["categories"]
    plan = []
    modes = ["superset"] * int(gen.get("n_superset", 4)) + ["not_superset"] * int(gen.get("n_not_superset", 4))
    for k, mode in enumerate(modes):
        allowed = sc.sample_allowed(mode, cats, train, rng)
        plan.append(
            dict(
                response_id=f"{prompt_row['prompt_id']}-r{k}",
                generator="permissive",
                gen_mode=mode,
                gen_allowed=to_names(allowed),
                system_prompt=sc.render_category_config(allowed, rng),
                salt=f"r{k}",
            )
        )
    for k in range(int(gen.get("n_safe", 1))):
        plan.append(
            dict(
                response_id=f"{prompt_row['prompt_id']}-s{k}",
                generator="safe",
                gen_mode="plain",
                gen_allowed=[],
                system_prompt=sc.PLAIN_SYSTEM_PROMPT,
                salt=f"s{k}",
            )
        )
    return plan


def generate_responses(cfg: Any) -> dict[str, Any]:
    """~9 responses per prompt: config-conditioned permissive ones plus plain safe ones."""
    prompts = _read_stage(cfg, "label_prompts").to_list()
    train = train_categories(cfg)
    skip_outside = bool(dict(_cfg_get(cfg, "generation", None) or {}).get("skip_outside_train", True))
    n_outside = 0
    items: list[dict[str, Any]] = []
    for p in prompts:
        if skip_outside and not _in_train(p["categories"], train):
            n_outside += 1  # would be skipped at pairing anyway: do not pay for its responses
            continue
        for item in generation_plan(p, cfg):
            items.append({**item, "prompt_id": p["prompt_id"], "prompt": p["prompt"], "prompt_categories": p["categories"]})
    by_gen = {g: [it for it in items if it["generator"] == g] for g in ("permissive", "safe")}
    progress = bool(_cfg_get(cfg, "progress", True))

    async def main():
        async with contextlib.AsyncExitStack() as stack:
            clients = {g: await stack.enter_async_context(ChatClient(endpoint(cfg, g), g)) for g in by_gen if by_gen[g]}
            with _journal(cfg, "generate_responses") as j:
                outs = await asyncio.gather(
                    *(
                        run_requests(
                            clients[g], j,
                            [ChatRequest(sc.config_messages(it["system_prompt"], it["prompt"]), salt=it["salt"]) for it in by_gen[g]],
                            desc=f"generate ({g})", progress=progress,
                        )
                        for g in clients
                    )
                )
            return dict(zip(clients, outs)), {g: c.usage for g, c in clients.items()}

    results, usage = asyncio.run(main())
    rows, n_failed = [], 0
    for g, outs in results.items():
        n_failed += _check_failures(outs, f"{g}-generation", cfg)
        for it, out in zip(by_gen[g], outs):
            if out is None:
                continue
            row = {k: it[k] for k in RESPONSE_FEATURES if k not in ("response", "finish_reason")}
            rows.append({**row, "response": out["text"], "finish_reason": str(out.get("finish_reason") or "")})
    rows.sort(key=lambda r: r["response_id"])
    _write_atomic(_from_rows(rows, RESPONSE_FEATURES), stage_path(cfg, "generate_responses"))
    return {
        "prompts": len(prompts),
        "skipped_outside_train": n_outside,
        "responses": len(rows),
        "failed": n_failed,
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
        "usage": {g: _usage_dict(u) for g, u in usage.items()},
    }


# ----- stage 4: label responses ---------------------------------------------------------------

LABELLED_RESPONSE_FEATURES = datasets.Features(
    {
        **RESPONSE_FEATURES,
        "addressed": datasets.Value("bool"),
        "addressed_valid": datasets.Value("bool"),
        "addressed_raw": datasets.Value("string"),
        "risk_set": datasets.Sequence(datasets.Value("string")),
        "risk_valid": datasets.Value("bool"),
        "risk_raw": datasets.Value("string"),
    }
)


def label_responses(cfg: Any) -> dict[str, Any]:
    """Two judgements per response: addressed ([[YES]]/[[NO]]) and the 8-way risk set."""
    rows = _read_stage(cfg, "generate_responses").to_list()
    progress = bool(_cfg_get(cfg, "progress", True))
    kw = dict(
        retries=int(_cfg_get(cfg, "judge_retries", 1)),
        retry_temperature=float(_cfg_get(cfg, "judge_retry_temperature", 0.7)),
        progress=progress,
        **_judge_kw(cfg),
    )

    async def main():
        async with ChatClient(endpoint(cfg, "judge"), "judge") as client:
            with _journal(cfg, "label_responses") as j:
                addr, risk = await asyncio.gather(
                    judges.judge_batch(client, j, judges.ADDRESSED,
                                       [judges.ADDRESSED.messages(r["prompt"], r["response"]) for r in rows],
                                       desc="judge addressed", **kw),
                    judges.judge_batch(client, j, judges.RESPONSE_RISK,
                                       [judges.RESPONSE_RISK.messages(r["prompt"], r["response"]) for r in rows],
                                       desc="judge risk", **kw),
                )
            return addr, risk, client.usage

    (addr, n_re_a), (risk, n_re_r), usage = asyncio.run(main())
    _check_failures(addr, "addressed-judge", cfg)
    _check_failures(risk, "risk-judge", cfg)
    out = []
    for r, a, k in zip(rows, addr, risk):
        if a is None or k is None:
            continue
        out.append(
            {
                **r,
                "addressed": bool(a.value) if a.valid else False,
                "addressed_valid": a.valid,
                "addressed_raw": a.raw,
                "risk_set": to_names(k.value) if k.valid else [],
                "risk_valid": k.valid,
                "risk_raw": k.raw,
            }
        )
    _write_atomic(_from_rows(out, LABELLED_RESPONSE_FEATURES), stage_path(cfg, "label_responses"))
    return {
        "responses": len(rows),
        "labelled": len(out),
        "addressed_invalid": sum(not r["addressed_valid"] for r in out),
        "risk_invalid": sum(not r["risk_valid"] for r in out),
        "judge_verdicts": {"addressed": judges.verdict_counts(addr), "risk": judges.verdict_counts(risk)},
        "judge_reasks": n_re_a + n_re_r,
        "addressed_rate": sum(r["addressed"] for r in out if r["addressed_valid"]) / max(1, len(out)),
        "usage": {"judge": _usage_dict(usage)},
    }


# ----- stage 5: score ---------------------------------------------------------------------------

SCORED_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "prompt_categories": datasets.Sequence(datasets.Value("string")),
        "mode": datasets.Value("string"),
        "allowed": datasets.Sequence(datasets.Value("string")),
        "system_prompt": datasets.Value("string"),
        "response_ids": datasets.Sequence(datasets.Value("string")),
        "errors": datasets.Sequence(datasets.Value("float64")),
    }
)


def weights(cfg: Any) -> ScoreWeights:
    s = dict(_cfg_get(cfg, "score", None) or {})
    return ScoreWeights(alpha=float(s.get("alpha", 0.1)), beta=float(s.get("beta", 3.0)), gamma=float(s.get("gamma", 1.0)))


def pairing_config(prompt_id: str, mode: str, prompt_categories: Sequence[str], cfg: Any) -> tuple[tuple[Category, ...], str]:
    """The (allowed set, rendered system prompt) used to pair one prompt under one mode; seeded."""
    rng = random.Random(f"{int(_cfg_get(cfg, 'seed', 0))}:pair-config:{prompt_id}:{mode}")
    allowed = sc.sample_allowed(mode, prompt_categories, train_categories(cfg), rng)
    return allowed, sc.render_category_config(allowed, rng)


def _valid_responses(cfg: Any) -> tuple[dict[str, list[dict]], int]:
    rows = _read_stage(cfg, "label_responses").to_list()
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    n_invalid = 0
    for r in rows:
        if r["addressed_valid"] and r["risk_valid"]:
            by_prompt[r["prompt_id"]].append(r)
        else:
            n_invalid += 1
    return by_prompt, n_invalid


def _modes(cfg: Any) -> list[str]:
    modes = list(dict(_cfg_get(cfg, "pairing", None) or {}).get("modes", sc.MODES))
    for m in modes:
        if m not in sc.MODES:
            raise StageError(f"config.pairing.modes: unknown mode {m!r}; expected some of {sc.MODES}")
    return modes


def score(cfg: Any) -> dict[str, Any]:
    """Per prompt and mode: sample C_s, then every valid response's error under it."""
    by_prompt, n_invalid = _valid_responses(cfg)
    train = train_categories(cfg)
    w = weights(cfg)
    out, n_outside = [], 0
    for pid in sorted(by_prompt):
        rs = sorted(by_prompt[pid], key=lambda r: r["response_id"])
        cats = rs[0]["prompt_categories"]
        if not _in_train(cats, train):
            n_outside += 1
            continue
        for mode in _modes(cfg):
            allowed, system = pairing_config(pid, mode, cats, cfg)
            errs = [
                error_score(allowed, r["risk_set"], r["addressed"], train_categories=train, alpha=w.alpha, beta=w.beta, gamma=w.gamma)
                for r in rs
            ]
            out.append(
                dict(prompt_id=pid, prompt=rs[0]["prompt"], prompt_categories=cats, mode=mode, allowed=to_names(allowed),
                     system_prompt=system, response_ids=[r["response_id"] for r in rs], errors=errs)
            )
    _write_atomic(_from_rows(out, SCORED_FEATURES), stage_path(cfg, "score"))
    return {"prompts": len(by_prompt), "skipped_outside_train": n_outside, "responses_invalid_labels": n_invalid, "configs": len(out)}


# ----- stage 6: pair ----------------------------------------------------------------------------

PAIR_FEATURES = datasets.Features(
    {
        "system_prompt": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "chosen_response": datasets.Value("string"),
        "rejected_response": datasets.Value("string"),
        "spec_i": datasets.Value("string"),
        "spec_j": datasets.Value("string"),
        "mode": datasets.Value("string"),
        "chosen_cat": datasets.Value("string"),
        "rejected_cat": datasets.Value("string"),
        "chosen_category_error_score": datasets.Value("float64"),
        "rejected_category_error_score": datasets.Value("float64"),
    }
)


def is_dev_prompt(prompt_id: str, dev_fraction: float, seed: int) -> bool:
    """Dev split by prompt (never by pair), so no prompt is in both train and dev."""
    return random.Random(f"{seed}:dev:{prompt_id}").random() < dev_fraction


def pair(cfg: Any) -> dict[str, Any]:
    """Preference pairs in the CoSAlign-Train schema, split by prompt into train and dev."""
    scored = _read_stage(cfg, "score").to_list()
    by_prompt, _ = _valid_responses(cfg)
    by_id = {r["response_id"]: r for rs in by_prompt.values() for r in rs}
    train = train_categories(cfg)
    w = weights(cfg)
    seed = int(_cfg_get(cfg, "seed", 0))
    dev_fraction = float(dict(_cfg_get(cfg, "pairing", None) or {}).get("dev_fraction", 0.05))
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    per_mode: Counter[str] = Counter()
    for s in scored:
        pool = [
            LabelledResponse(rid, by_id[rid]["response"], parse_categories(by_id[rid]["risk_set"]), by_id[rid]["addressed"])
            for rid in s["response_ids"]
        ]
        rng = random.Random(f"{seed}:pair:{s['prompt_id']}:{s['mode']}")
        split = "dev" if is_dev_prompt(s["prompt_id"], dev_fraction, seed) else "train"
        for p in make_pairs(pool, s["allowed"], rng, weights=w, train_categories=train):
            per_mode[s["mode"]] += 1
            splits[split].append(
                dict(
                    system_prompt=s["system_prompt"],
                    prompt=s["prompt"],
                    chosen_response=p.chosen.text,
                    rejected_response=p.rejected.text,
                    spec_i=to_dash_string(parse_categories(s["allowed"])),
                    spec_j=to_dash_string(parse_categories(s["prompt_categories"])),
                    mode=s["mode"],
                    chosen_cat=to_dash_string(p.chosen.risk_set),
                    rejected_cat=to_dash_string(p.rejected.risk_set),
                    chosen_category_error_score=p.chosen_error,
                    rejected_category_error_score=p.rejected_error,
                )
            )
    dd = datasets.DatasetDict({k: _from_rows(v, PAIR_FEATURES) for k, v in splits.items()})
    _write_atomic(dd, stage_path(cfg, "pair"))
    jsonl_dir = _out(cfg) / "pairs_jsonl"
    jsonl_dir.mkdir(parents=True, exist_ok=True)
    for k, v in splits.items():
        with open(jsonl_dir / f"{k}.jsonl", "w", encoding="utf-8") as f:
            for row in v:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "configs": len(scored),
        "pairs_train": len(splits["train"]),
        "pairs_dev": len(splits["dev"]),
        "pairs_per_mode": dict(per_mode),
        "dev_prompts": len({r["prompt"] for r in splits["dev"]}),
    }


STAGE_FUNCS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "load_prompts": load_prompts,
    "label_prompts": label_prompts,
    "generate_responses": generate_responses,
    "label_responses": label_responses,
    "score": score,
    "pair": pair,
}


def run_stage(cfg: Any, stage: str, *, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless its output exists (``force`` reruns it; its journal still applies)."""
    if stage not in STAGE_FUNCS:
        raise StageError(f"unknown stage {stage!r}; stages: {STAGES}")
    if stage_path(cfg, stage).exists() and not force:
        print(f"[synth] {stage}: output {stage_path(cfg, stage)} exists, skipping (use --force to redo)")
        return None
    t0 = time.time()
    summary = STAGE_FUNCS[stage](cfg)
    summary["seconds"] = round(time.time() - t0, 2)
    _write_summary(cfg, stage, summary)
    brief = {k: v for k, v in summary.items() if k not in ("usage", "label_groups", "per_source")}
    print(f"[synth] {stage}: {json.dumps(brief, default=str)}")
    for role, u in (summary.get("usage") or {}).items():
        us = UsageStats(**u)
        print(f"[synth]   {role}: {us.summary()}")
    return summary


def run_all(cfg: Any, stages: Sequence[str] = STAGES, *, force: bool = False) -> dict[str, Any]:
    return {s: run_stage(cfg, s, force=force) for s in stages}

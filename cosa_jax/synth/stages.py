"""The synthesis stages of Algorithm 1 (spec §4), each a function from datasets on disk to datasets.

    load_prompts -> label_prompts -> generate_responses -> label_responses -> score -> pair

Each stage reads the previous stage's ``datasets`` directory under ``cfg.out_dir``, writes its own
atomically (temp dir, then rename), and records a summary in ``out_dir/summaries/<stage>.json``.
A stage is done only when its completion marker ``<output dir>/_COMPLETE`` exists, written last,
and still matches: it lists every file the stage wrote (size, sha256) and the markers of the
stages it read, so an output cut short by a kill, damaged later, or built from an input that has
since changed reruns instead of being skipped. Requests go through a per-stage SQLite journal
(``out_dir/journal/<stage>.sqlite``), so rerunning a stage after a crash sends only the requests
that had not completed. All sampling is seeded per prompt
(``random.Random(f"{seed}:{stage}:{prompt_id}...")``): results do not depend on order or batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets

from cosa_jax import judges
from cosa_jax import safety_configs as sc
from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, UsageStats, run_requests
from cosa_jax.atomic_files import fsync_path
from cosa_jax.endpoint.journal import Journal
from cosa_jax.synth import config as synth_config
from cosa_jax.synth import inputs
from cosa_jax.synth.pairing import LabelledResponse, make_pairs
from cosa_jax.synth.scoring import ScoreWeights, error_score
from cosa_jax.taxonomy import (
    Category,
    Taxonomy,
    taxonomy_from_config,
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


def _judge_kw(cfg: Any) -> dict[str, Any]:
    """cfg.judge: structured_outputs (auto | vllm | openai | off), rating (argmax | expected) and
    calibration (off | content_free)."""
    return dict(structured_outputs=str(cfg.judge.structured_outputs), rating=str(cfg.judge.rating),
                calibration=str(cfg.judge.calibration))


def _out(cfg: Any) -> Path:
    return Path(cfg.out_dir)


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
    ok, why = stage_complete(cfg, stage)
    if not ok:
        raise StageError(f"input {p} of a later stage is incomplete ({why}): run stage {stage!r} first")
    return datasets.load_from_disk(str(p))


# ----- atomic outputs and completion markers ------------------------------------------------

MARKER = "_COMPLETE"
# the stages whose outputs a stage reads: a marker records theirs, so a changed input reruns it
INPUTS: dict[str, tuple[str, ...]] = {
    "load_prompts": (),
    "label_prompts": ("load_prompts",),
    "generate_responses": ("label_prompts",),
    "label_responses": ("generate_responses",),
    "score": ("label_responses",),
    "pair": ("score", "label_responses"),
}


def _rename(src: Path, dst: Path) -> None:
    """The one place a stage's output becomes visible (a rename is atomic on one filesystem)."""
    os.replace(src, dst)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_path(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, fsynced, then renamed over ``path``: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _rename(tmp, path)
    fsync_path(path.parent)


def _replace_dir(tmp: Path, path: Path) -> None:
    _fsync_tree(tmp)
    if path.exists():  # a kill here leaves no output at all: the stage reruns (no marker)
        shutil.rmtree(path)
    _rename(tmp, path)
    fsync_path(path.parent)


def _write_atomic(obj: datasets.Dataset | datasets.DatasetDict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    datasets.disable_progress_bars()  # one bar per save is noise next to the request bars
    # An empty split saved with datasets' default shard count has no arrow file and cannot be
    # loaded back (IndexError): save every empty split that has columns as one (empty) shard.
    if isinstance(obj, datasets.DatasetDict):
        shards = {k: 1 for k, v in obj.items() if len(v) == 0 and v.features}
        obj.save_to_disk(str(tmp), num_shards={k: shards.get(k, None) or _default_shards(v) for k, v in obj.items()}
                         if shards else None)
    else:
        obj.save_to_disk(str(tmp), num_shards=1 if len(obj) == 0 and obj.features else None)
    _replace_dir(tmp, path)


def _default_shards(d: datasets.Dataset) -> int:
    """datasets' own rule: one shard per max_shard_size (500 MB) of data, at least one."""
    return max(1, -(-d.data.nbytes // (500 << 20)))


def _summary_path(cfg: Any, stage: str) -> Path:
    return _out(cfg) / "summaries" / f"{stage}.json"


def _write_summary(cfg: Any, stage: str, summary: dict[str, Any]) -> None:
    _write_text_atomic(_summary_path(cfg, stage), json.dumps(summary, indent=2, sort_keys=True, default=str))


def _marker_path(cfg: Any, stage: str) -> Path:
    return stage_path(cfg, stage) / MARKER


def _stage_files(cfg: Any, stage: str) -> list[Path]:
    """Every file the stage wrote, the marker aside."""
    roots = [stage_path(cfg, stage)] + ([_out(cfg) / "pairs_jsonl"] if stage == "pair" else [])
    files = [p for r in roots if r.exists() for p in sorted(r.rglob("*")) if p.is_file() and p.name != MARKER]
    return files + [_summary_path(cfg, stage)]


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker_digest(cfg: Any, stage: str) -> str | None:
    p = _marker_path(cfg, stage)
    return _file_digest(p) if p.exists() else None


def _row_counts(cfg: Any, stage: str) -> dict[str, int]:
    d = datasets.load_from_disk(str(stage_path(cfg, stage)))
    return {k: len(v) for k, v in d.items()} if isinstance(d, datasets.DatasetDict) else {"all": len(d)}


def _write_marker(cfg: Any, stage: str) -> None:
    """Written last, after every output of the stage: its presence means the stage is done."""
    out = _out(cfg)
    marker = {
        "stage": stage,
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
                  for p in _stage_files(cfg, stage)},
        "inputs": {s: _marker_digest(cfg, s) for s in INPUTS[stage]},
    }
    state = json.loads((stage_path(cfg, stage) / "state.json").read_text()) if (stage_path(cfg, stage) / "state.json").exists() else {}
    if not ("_data_files" in state and not state["_data_files"]):  # a 0-row dataset cannot be loaded
        marker["rows"] = _row_counts(cfg, stage)
    _write_text_atomic(_marker_path(cfg, stage), json.dumps(marker, indent=1, sort_keys=True))


def stage_complete(cfg: Any, stage: str) -> tuple[bool, str]:
    """(done?, why not): the marker exists, every file it lists matches, its inputs are unchanged."""
    p = _marker_path(cfg, stage)
    if not p.exists():
        return False, f"no completion marker {p}" if stage_path(cfg, stage).exists() else "not run yet"
    try:
        marker = json.loads(p.read_text())
        files = marker["files"]
        inputs = marker["inputs"]
    except (ValueError, KeyError, TypeError) as e:
        return False, f"unreadable completion marker {p} ({e})"
    out = _out(cfg)
    listed = set(files)
    present = {str(f.relative_to(out)) for f in _stage_files(cfg, stage) if f.exists()}
    if present - listed:
        return False, f"files not in its marker: {sorted(present - listed)[:3]}"
    for rel, meta in files.items():
        f = out / rel
        if not f.exists():
            return False, f"{f} is missing"
        if f.stat().st_size != meta["bytes"] or _file_digest(f) != meta["sha256"]:
            return False, f"{f} differs from what the stage wrote"
    for s, digest in inputs.items():
        if _marker_digest(cfg, s) != digest:
            return False, f"its input stage {s!r} changed since"
    return True, ""


def _from_rows(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    if not rows:  # from_list([]) loses the columns; an empty stage output keeps its schema
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)


def _chunk_size(cfg: Any) -> int:
    return int(cfg.chunk_size)


def _row_chunks(ds: datasets.Dataset, n: int, columns: Sequence[str] | None = None) -> Iterator[list[dict[str, Any]]]:
    """The rows of a (memory-mapped) stage output, ``n`` at a time, as plain dicts."""
    if columns is not None:
        ds = ds.select_columns(list(columns))
    for batch in ds.iter(batch_size=n):
        names = list(batch)
        yield [dict(zip(names, values)) for values in zip(*(batch[k] for k in names))]


class _StreamedOutput:
    """A stage output written part by part as it is produced, then assembled into one dataset.

    Memory holds one part, whatever the run size: each part goes to disk at once and the final
    dataset is written from the memory-mapped parts (then renamed into place, like every output).
    """

    def __init__(self, path: Path, features: datasets.Features):
        self.path, self.features = path, features
        self.parts_dir = path.with_name(path.name + ".parts")
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)  # parts of a run that was killed: redone from the journal
        self.parts_dir.mkdir(parents=True)
        self.parts: list[Path] = []
        self.rows = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        part = self.parts_dir / f"part-{len(self.parts):05d}"
        datasets.disable_progress_bars()
        _from_rows(rows, self.features).save_to_disk(str(part))
        self.parts.append(part)
        self.rows += len(rows)

    def dataset(self) -> datasets.Dataset:
        """All parts as one memory-mapped dataset."""
        if not self.parts:
            return _from_rows([], self.features)
        return datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in self.parts])

    def finish(self) -> None:
        _write_atomic(self.dataset(), self.path)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def taxonomy(cfg: Any) -> Taxonomy:
    """The config's ``taxonomy`` file (absent or '' = the shipped CoSA taxonomy)."""
    return taxonomy_from_config(cfg)


def train_categories(cfg: Any) -> tuple[Category, ...]:
    names = cfg.train_categories
    tax = taxonomy(cfg)
    return tax.parse_categories(names) if names else tax.seen


def endpoint(cfg: Any, role: str) -> EndpointConfig:
    if role not in cfg.endpoints:
        raise StageError(f"config has no endpoints.{role}")
    return EndpointConfig.from_mapping(cfg.endpoints[role], where=f"config.endpoints.{role}")


def _journal(cfg: Any, stage: str) -> Journal:
    return Journal(_out(cfg) / "journal" / f"{stage}.sqlite")  # migrates an older <stage>.jsonl


def _usage_dict(u: UsageStats) -> dict[str, Any]:
    return dict(vars(u))


def _check_failures(n_failed: int, what: str, cfg: Any) -> int:
    if n_failed and not cfg.allow_partial:
        raise StageError(
            f"{n_failed} {what} request(s) failed after retries; completed ones are journaled, so "
            "rerunning this stage sends only the missing ones (or set allow_partial=True)"
        )
    return n_failed


def _n_failed(results: Sequence[Any]) -> int:
    return sum(r is None for r in results)


_KINDS = {"str": datasets.Value("string"), "strs": datasets.Sequence(datasets.Value("string")),
          "bool": datasets.Value("bool"), "float": datasets.Value("float64"),
          "floats": datasets.Sequence(datasets.Value("float64"))}


def _features(columns: Mapping[str, Any]) -> datasets.Features:
    """A stage's schema: column -> kind (str, strs, bool, float, floats) or a datasets feature."""
    return datasets.Features({k: _KINDS[v] if isinstance(v, str) else v for k, v in columns.items()})


# ----- stage 1: load prompts ----------------------------------------------------------------

PROMPT_FEATURES = _features({
    "prompt_id": "str", "prompt": "str", "source": "str", "gold_categories": "strs"
})


def load_prompts(cfg: Any) -> dict[str, Any]:
    """Read all sources, dedupe, filter by length, drop prompts that appear in any test set."""
    sources = cfg.sources
    rows: list[dict[str, Any]] = []
    per_source = {}
    for src in sources:
        got = inputs.load_source(src)
        per_source[str(dict(src))] = len(got)
        rows += got
    n_raw = len(rows)
    rows = inputs.dedupe(rows)
    n_dedup = len(rows)
    lf = cfg.length_filter
    count = inputs.count_tokens_fn(lf.tokenizer or None)
    rows = inputs.filter_length(rows, int(lf.min_exclusive), int(lf.max), count)
    n_len = len(rows)
    test_prompts: list[str] = []
    for spec in cfg.test_prompts:
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

LABELLED_PROMPT_FEATURES = _features({
    **PROMPT_FEATURES, "categories": "strs", "label_raw": "str"
})


def label_prompts(cfg: Any) -> dict[str, Any]:
    """8-way prompt risk judge; drop unparseable, drop small label groups, cap large ones."""
    ds = _read_stage(cfg, "load_prompts")
    rows = ds.to_list()
    prompt_risk = judges.judges_for(taxonomy(cfg))["prompt_risk"]
    chats = [prompt_risk.messages(r["prompt"]) for r in rows]
    progress = bool(cfg.progress)

    async def main():
        async with ChatClient(endpoint(cfg, "judge"), "judge") as client:
            with _journal(cfg, "label_prompts") as j:
                res = await judges.judge_batch(
                    client, j, prompt_risk, chats,
                    retries=int(cfg.judge_retries),
                    retry_temperature=float(cfg.judge_retry_temperature),
                    desc="label prompts", progress=progress, **_judge_kw(cfg),
                )
            return res, client.usage

    (results, n_retried), usage = asyncio.run(main())
    _check_failures(_n_failed(results), "prompt-label", cfg)
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
    min_group = int(cfg.min_label_group)
    cap = int(cfg.max_per_label_group)
    seed = int(cfg.seed)
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
        "judge_verdicts": {"prompt_risk": judges.verdict_counts(results)},
        "judge_reasks": n_retried,
        "dropped_small_groups": n_small,
        "dropped_over_cap": n_capped,
        "kept": len(kept),
        "label_groups": {" + ".join(k) or "(none)": len(v) for k, v in sorted(groups.items())},
        "usage": {"judge": _usage_dict(usage)},
    }


# ----- stage 3: generate responses ----------------------------------------------------------

RESPONSE_FEATURES = _features({
    "prompt_id": "str", "prompt": "str", "prompt_categories": "strs", "response_id": "str",
    "generator": "str", "gen_mode": "str", "gen_allowed": "strs", "system_prompt": "str",
    "response": "str", "finish_reason": "str"
})


def _in_train(cats: Sequence[str], train: Sequence[Category]) -> bool:
    return all(c in train for c in train[0].taxonomy.parse_categories(cats) if c.allowable)


def generation_plan(prompt_row: Mapping[str, Any], cfg: Any) -> list[dict[str, Any]]:
    """The responses to request for one prompt: configs sampled per prompt (seeded)."""
    gen = cfg.generation
    train = train_categories(cfg)
    seed = int(cfg.seed)
    rng = random.Random(f"{seed}:gen:{prompt_row['prompt_id']}")
    cats = prompt_row["categories"]
    plan = []
    modes = ["superset"] * int(gen.n_superset) + ["not_superset"] * int(gen.n_not_superset)
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
    for k in range(int(gen.n_safe)):
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
    """~9 responses per prompt: config-conditioned permissive ones plus plain safe ones.

    Prompts go ``chunk_size`` at a time (requests, replies and rows of one chunk in memory)."""
    prompts_ds = _read_stage(cfg, "label_prompts")
    train = train_categories(cfg)
    skip_outside = bool(cfg.generation.skip_outside_train)
    progress = bool(cfg.progress)
    out = _StreamedOutput(stage_path(cfg, "generate_responses"), RESPONSE_FEATURES)
    n_prompts = n_outside = n_failed = n_truncated = 0
    n_chunks = -(-len(prompts_ds) // _chunk_size(cfg)) or 1

    def plan(prompts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        nonlocal n_outside
        items: list[dict[str, Any]] = []
        for p in prompts:
            if skip_outside and not _in_train(p["categories"], train):
                n_outside += 1  # would be skipped at pairing anyway: do not pay for its responses
                continue
            for item in generation_plan(p, cfg):
                items.append({**item, "prompt_id": p["prompt_id"], "prompt": p["prompt"], "prompt_categories": p["categories"]})
        return {g: [it for it in items if it["generator"] == g] for g in ("permissive", "safe")}

    async def main():
        nonlocal n_prompts, n_failed, n_truncated
        roles = [g for g in ("permissive", "safe") if _role_used(cfg, g)]
        async with contextlib.AsyncExitStack() as stack:
            clients = {g: await stack.enter_async_context(ChatClient(endpoint(cfg, g), g)) for g in roles}
            with _journal(cfg, "generate_responses") as j:
                for c, prompts in enumerate(_row_chunks(prompts_ds, _chunk_size(cfg))):
                    n_prompts += len(prompts)
                    by_gen = plan(prompts)
                    part = f" [{c + 1}/{n_chunks}]" if n_chunks > 1 else ""
                    gens = [g for g in clients if by_gen[g]]
                    outs = await asyncio.gather(*(
                        run_requests(
                            clients[g], j,
                            [ChatRequest(sc.config_messages(it["system_prompt"], it["prompt"]), salt=it["salt"]) for it in by_gen[g]],
                            desc=f"generate ({g}){part}", progress=progress,
                        )
                        for g in gens
                    ))
                    rows = []
                    for g, results in zip(gens, outs):
                        n_failed += _n_failed(results)
                        for it, res in zip(by_gen[g], results):
                            if res is None:
                                continue
                            row = {k: it[k] for k in RESPONSE_FEATURES if k not in ("response", "finish_reason")}
                            rows.append({**row, "response": res["text"], "finish_reason": str(res.get("finish_reason") or "")})
                    rows.sort(key=lambda r: r["response_id"])  # ids are '<fixed-length prompt id>-...'
                    n_truncated += sum(r["finish_reason"] == "length" for r in rows)
                    out.add(rows)
            return {g: c.usage for g, c in clients.items()}

    usage = asyncio.run(main())
    _check_failures(n_failed, "generation", cfg)
    out.finish()
    return {
        "prompts": n_prompts,
        "skipped_outside_train": n_outside,
        "responses": out.rows,
        "failed": n_failed,
        "truncated": n_truncated,
        "usage": {g: _usage_dict(u) for g, u in usage.items()},
    }


def _role_used(cfg: Any, generator: str) -> bool:
    """Whether the generation plan asks ``generator`` for anything (no client is opened otherwise)."""
    gen = cfg.generation
    n = int(gen.n_superset) + int(gen.n_not_superset) if generator == "permissive" else int(gen.n_safe)
    return n > 0


# ----- stage 4: label responses ---------------------------------------------------------------

LABELLED_RESPONSE_FEATURES = _features({
    **RESPONSE_FEATURES, "addressed": "bool", "addressed_valid": "bool", "addressed_raw": "str",
    "risk_set": "strs", "risk_valid": "bool", "risk_raw": "str"
})


def label_responses(cfg: Any) -> dict[str, Any]:
    """Two judgements per response: addressed ([[YES]]/[[NO]]) and the 8-way risk set.

    Responses go ``chunk_size`` at a time, so memory stays flat whatever the run size."""
    responses = _read_stage(cfg, "generate_responses")
    progress = bool(cfg.progress)
    response_risk = judges.judges_for(taxonomy(cfg))["response_risk"]
    kw = dict(
        retries=int(cfg.judge_retries),
        retry_temperature=float(cfg.judge_retry_temperature),
        progress=progress,
        **_judge_kw(cfg),
    )
    out = _StreamedOutput(stage_path(cfg, "label_responses"), LABELLED_RESPONSE_FEATURES)
    tally = {"addressed": judges.VerdictTally(), "risk": judges.VerdictTally()}
    n = {"reasks": 0, "failed": 0, "addressed": 0, "addressed_invalid": 0, "risk_invalid": 0}
    n_chunks = -(-len(responses) // _chunk_size(cfg)) or 1

    async def main():
        async with ChatClient(endpoint(cfg, "judge"), "judge") as client:
            with _journal(cfg, "label_responses") as j:
                for c, rows in enumerate(_row_chunks(responses, _chunk_size(cfg))):
                    part = f" [{c + 1}/{n_chunks}]" if n_chunks > 1 else ""
                    (addr, n_re_a), (risk, n_re_r) = await asyncio.gather(
                        judges.judge_batch(client, j, judges.ADDRESSED,
                                           [judges.ADDRESSED.messages(r["prompt"], r["response"]) for r in rows],
                                           desc=f"judge addressed{part}", **kw),
                        judges.judge_batch(client, j, response_risk,
                                           [response_risk.messages(r["prompt"], r["response"]) for r in rows],
                                           desc=f"judge risk{part}", **kw),
                    )
                    tally["addressed"].add(addr)
                    tally["risk"].add(risk)
                    n["reasks"] += n_re_a + n_re_r
                    labelled = []
                    for r, a, k in zip(rows, addr, risk):
                        if a is None or k is None:
                            n["failed"] += 1
                            continue
                        labelled.append({
                            **r,
                            "addressed": bool(a.value) if a.valid else False,
                            "addressed_valid": a.valid,
                            "addressed_raw": a.raw,
                            "risk_set": to_names(k.value) if k.valid else [],
                            "risk_valid": k.valid,
                            "risk_raw": k.raw,
                        })
                        n["addressed"] += bool(a.valid and a.value)
                        n["addressed_invalid"] += not a.valid
                        n["risk_invalid"] += not k.valid
                    out.add(labelled)
            return client.usage

    usage = asyncio.run(main())
    _check_failures(n["failed"], "response-judge", cfg)
    out.finish()
    return {
        "responses": len(responses),
        "labelled": out.rows,
        "addressed_invalid": n["addressed_invalid"],
        "risk_invalid": n["risk_invalid"],
        "judge_verdicts": {k: t.counts() for k, t in tally.items()},
        "judge_reasks": n["reasks"],
        "addressed_rate": n["addressed"] / max(1, out.rows),
        "usage": {"judge": _usage_dict(usage)},
    }


# ----- stage 5: score ---------------------------------------------------------------------------

SCORED_FEATURES = _features({
    "prompt_id": "str", "prompt": "str", "prompt_categories": "strs", "mode": "str",
    "allowed": "strs", "system_prompt": "str", "response_ids": "strs", "errors": "floats"
})


def weights(cfg: Any) -> ScoreWeights:
    s = cfg.score
    return ScoreWeights(alpha=float(s.alpha), beta=float(s.beta), gamma=float(s.gamma))


def pairing_config(prompt_id: str, mode: str, prompt_categories: Sequence[str], cfg: Any) -> tuple[tuple[Category, ...], str]:
    """The (allowed set, rendered system prompt) used to pair one prompt under one mode; seeded."""
    rng = random.Random(f"{int(cfg.seed)}:pair-config:{prompt_id}:{mode}")
    allowed = sc.sample_allowed(mode, prompt_categories, train_categories(cfg), rng)
    return allowed, sc.render_category_config(allowed, rng)


def _prompt_groups(ds: datasets.Dataset, n: int, columns: Sequence[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
    """``(prompt_id, rows)`` per prompt of a stage output kept in prompt order, read ``n`` rows at
    a time: one prompt's rows in memory, never the whole output."""
    pid, group, seen = None, [], set()
    for rows in _row_chunks(ds, n, columns):
        for r in rows:
            if r["prompt_id"] != pid:
                if group:
                    yield pid, group
                if r["prompt_id"] in seen:
                    raise StageError(f"rows of prompt {r['prompt_id']} are not contiguous: the "
                                     "stage output is not in prompt order; rerun the stage before")
                pid, group = r["prompt_id"], []
                seen.add(pid)
            group.append(r)
    if group:
        yield pid, group


def _valid_responses(cfg: Any, columns: Sequence[str] | None = None) -> Iterator[tuple[str, list[dict], int]]:
    """Per prompt of label_responses: (prompt_id, its responses with valid labels sorted by id,
    how many had an invalid label)."""
    for pid, rows in _prompt_groups(_read_stage(cfg, "label_responses"), _chunk_size(cfg), columns):
        valid = sorted((r for r in rows if r["addressed_valid"] and r["risk_valid"]), key=lambda r: r["response_id"])
        yield pid, valid, len(rows) - len(valid)


SCORE_COLUMNS = ("prompt_id", "prompt", "prompt_categories", "response_id", "addressed", "addressed_valid",
                 "risk_set", "risk_valid")


def _modes(cfg: Any) -> list[str]:
    return list(cfg.pairing.modes)


def score(cfg: Any) -> dict[str, Any]:
    """Per prompt and mode: sample C_s, then every valid response's error under it."""
    train = train_categories(cfg)
    w = weights(cfg)
    out = _StreamedOutput(stage_path(cfg, "score"), SCORED_FEATURES)
    rows: list[dict[str, Any]] = []
    n_prompts = n_outside = n_invalid = 0
    for pid, rs, bad in _valid_responses(cfg, SCORE_COLUMNS):
        n_invalid += bad
        if not rs:
            continue
        n_prompts += 1
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
            rows.append(
                dict(prompt_id=pid, prompt=rs[0]["prompt"], prompt_categories=cats, mode=mode, allowed=to_names(allowed),
                     system_prompt=system, response_ids=[r["response_id"] for r in rs], errors=errs)
            )
        if len(rows) >= _chunk_size(cfg):
            out.add(rows)
            rows = []
    out.add(rows)
    n_configs = out.rows
    out.finish()
    return {"prompts": n_prompts, "skipped_outside_train": n_outside, "responses_invalid_labels": n_invalid, "configs": n_configs}


# ----- stage 6: pair ----------------------------------------------------------------------------

PAIR_FEATURES = _features({
    "system_prompt": "str", "prompt": "str", "chosen_response": "str", "rejected_response": "str",
    "spec_i": "str", "spec_j": "str", "mode": "str", "chosen_cat": "str", "rejected_cat": "str",
    "chosen_category_error_score": "float", "rejected_category_error_score": "float"
})


def is_dev_prompt(prompt_id: str, dev_fraction: float, seed: int) -> bool:
    """Dev split by prompt (never by pair), so no prompt is in both train and dev."""
    return random.Random(f"{seed}:dev:{prompt_id}").random() < dev_fraction


def pair(cfg: Any) -> dict[str, Any]:
    """Preference pairs in the CoSAlign-Train schema, split by prompt into train and dev.

    Scored configs and labelled responses are both in prompt order: they are read side by side,
    one prompt at a time, and pairs are written as they are made."""
    scored = _prompt_groups(_read_stage(cfg, "score"), _chunk_size(cfg))
    train = train_categories(cfg)
    parse_categories = taxonomy(cfg).parse_categories
    w = weights(cfg)
    seed = int(cfg.seed)
    dev_fraction = float(cfg.pairing.dev_fraction)
    outs = {k: _StreamedOutput(stage_path(cfg, "pair").with_name(f"pairs.{k}"), PAIR_FEATURES) for k in ("train", "dev")}
    jsonl_dir = _out(cfg) / "pairs_jsonl"
    jsonl_tmp = jsonl_dir.with_name(jsonl_dir.name + ".tmp")
    if jsonl_tmp.exists():
        shutil.rmtree(jsonl_tmp)
    jsonl_tmp.mkdir(parents=True)
    pending: dict[str, list[dict]] = {"train": [], "dev": []}
    per_mode: Counter[str] = Counter()
    n_configs, dev_prompts = 0, set()
    labelled = _valid_responses(cfg)
    with contextlib.ExitStack() as files:
        jsonl = {k: files.enter_context(open(jsonl_tmp / f"{k}.jsonl", "w", encoding="utf-8")) for k in outs}
        for pid, configs in scored:
            for lpid, rs, _ in labelled:  # skip prompts the score stage left out
                if lpid == pid:
                    break
            else:
                raise StageError(f"scored prompt {pid} has no labelled responses: rerun stage 'score'")
            by_id = {r["response_id"]: r for r in rs}
            split = "dev" if is_dev_prompt(pid, dev_fraction, seed) else "train"
            for s in configs:
                n_configs += 1
                pool = [
                    LabelledResponse(rid, by_id[rid]["response"], parse_categories(by_id[rid]["risk_set"]), by_id[rid]["addressed"])
                    for rid in s["response_ids"]
                ]
                rng = random.Random(f"{seed}:pair:{s['prompt_id']}:{s['mode']}")
                for p in make_pairs(pool, s["allowed"], rng, weights=w, train_categories=train):
                    per_mode[s["mode"]] += 1
                    row = dict(
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
                    pending[split].append(row)
                    jsonl[split].write(json.dumps(row, ensure_ascii=False) + "\n")
                    if split == "dev":
                        dev_prompts.add(pid)
            for k, rows in pending.items():
                if len(rows) >= _chunk_size(cfg):
                    outs[k].add(rows)
                    pending[k] = []
        for k, rows in pending.items():
            outs[k].add(rows)
    dd = datasets.DatasetDict({k: o.dataset() for k, o in outs.items()})
    _write_atomic(dd, stage_path(cfg, "pair"))
    _replace_dir(jsonl_tmp, jsonl_dir)
    for o in outs.values():
        o.discard()
    return {
        "configs": n_configs,
        "pairs_train": outs["train"].rows,
        "pairs_dev": outs["dev"].rows,
        "pairs_per_mode": dict(per_mode),
        "dev_prompts": len(dev_prompts),
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
    """Run one stage unless it is complete (``force`` reruns it; its journal still applies).

    Complete means its marker matches its files (``stage_complete``); an output without one, cut
    short by a kill or damaged since, is redone (its journaled requests are not re-sent)."""
    if stage not in STAGE_FUNCS:
        raise StageError(f"unknown stage {stage!r}; stages: {STAGES}")
    synth_config.validate(cfg)
    done, why = stage_complete(cfg, stage)
    if done and not force:
        print(f"[synth] {stage}: output {stage_path(cfg, stage)} exists, skipping (use --force to redo)")
        return None
    if not done and stage_path(cfg, stage).exists():
        print(f"[synth] {stage}: output {stage_path(cfg, stage)} is incomplete ({why}); redoing it")
    with contextlib.suppress(FileNotFoundError):
        _marker_path(cfg, stage).unlink()  # from here on the stage counts as not done
    t0 = time.time()
    summary = STAGE_FUNCS[stage](cfg)
    summary["seconds"] = round(time.time() - t0, 2)
    _write_summary(cfg, stage, summary)
    _write_marker(cfg, stage)
    brief = {k: v for k, v in summary.items() if k not in ("usage", "label_groups", "per_source")}
    print(f"[synth] {stage}: {json.dumps(brief, default=str)}")
    for role, u in (summary.get("usage") or {}).items():
        us = UsageStats(**u)
        print(f"[synth]   {role}: {us.summary()}")
    return summary


def run_all(cfg: Any, stages: Sequence[str] = STAGES, *, force: bool = False) -> dict[str, Any]:
    return {s: run_stage(cfg, s, force=force) for s in stages}

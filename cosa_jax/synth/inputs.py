"""Prompt sources for synthesis: the shipped mini set, local files, or hub datasets (spec §4.1).

Every loader returns plain records ``{prompt_id, prompt, source, gold_categories}``; the id is a
hash of the normalised text so the same prompt keeps its id across sources and reruns.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cosa_jax.jsonl import iter_jsonl_objects, text_field
from cosa_jax.taxonomy import parse_categories, to_names

MINI_PROMPTS_FILE = "mini_prompts.jsonl"

# Hub presets: (dataset id, config name, split, text field, row filter).
HUB_PRESETS: dict[str, dict[str, Any]] = {
    "beavertails": dict(path="PKU-Alignment/BeaverTails", name=None, split="330k_train", field="prompt"),
    "wildguardmix": dict(
        path="allenai/wildguardmix",
        name="wildguardtrain",
        split="train",
        field="prompt",
        keep=lambda row: not row.get("adversarial", False),  # non-adversarial prompts only
    ),
    "cosalign_test": dict(path="microsoft/CoSAlign-Test", name=None, split=None, field="prompt"),
}


def normalize_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form used for deduplication and overlap checks."""
    return " ".join(text.lower().split())


def prompt_id(text: str) -> str:
    return "p-" + hashlib.sha1(normalize_prompt(text).encode("utf-8")).hexdigest()[:16]


def _record(text: str, source: str, gold: Iterable[str] | None = None) -> dict[str, Any]:
    return {
        "prompt_id": prompt_id(text),
        "prompt": text.strip(),
        "source": source,
        "gold_categories": to_names(parse_categories(gold)) if gold is not None else [],
    }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [{**row, "__line__": lineno} for lineno, row in iter_jsonl_objects(path)]


def load_mini_prompts(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The shipped ~60 mild prompts with category labels (raw rows: id, prompt, categories)."""
    p = Path(path) if path else Path(str(resources.files("cosa_jax") / "data" / MINI_PROMPTS_FILE))
    rows = _read_jsonl(p)
    for row in rows:
        where = f"{p}:{row['__line__']}"
        text_field(row, "prompt", where)
        if not isinstance(row.get("categories"), list):
            raise ValueError(f"{where}: field 'categories' must be a list of category names")
        try:
            row["categories"] = to_names(parse_categories(row["categories"]))
        except ValueError as e:
            raise ValueError(f"{where}: field 'categories': {e}") from None
        del row["__line__"]
    return rows


def load_local(path: str | os.PathLike, field: str = "prompt", categories_field: str | None = None) -> list[dict]:
    """Prompts from a .jsonl / .json / .csv / .parquet file (via ``datasets`` for the last three)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    if p.suffix == ".jsonl":
        rows = _read_jsonl(p)
    else:
        import datasets

        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise ValueError(f"prompt file {p}: unsupported extension {p.suffix!r} (jsonl, json, csv, parquet)")
        rows = [dict(r, __line__=i + 1) for i, r in enumerate(datasets.load_dataset(kind, data_files=str(p), split="train"))]
    out = []
    for row in rows:
        line = "line" if p.suffix == ".jsonl" else "row"
        text = text_field(row, field, f"{p}: {line} {row['__line__']}")
        gold = row.get(categories_field) if categories_field else None
        try:
            out.append(_record(text, str(p.name), gold))
        except ValueError as e:
            raise ValueError(f"{p}: row {row['__line__']}: field {categories_field!r}: {e}") from None
    return out


def load_hub(preset: str, limit: int | None = None) -> list[dict[str, Any]]:
    """A hub dataset by preset name; fails with a clear message when the hub is unreachable."""
    if preset not in HUB_PRESETS:
        raise ValueError(f"unknown hub preset {preset!r}; known: {sorted(HUB_PRESETS)}")
    spec = HUB_PRESETS[preset]
    import datasets

    try:
        ds = datasets.load_dataset(spec["path"], spec["name"], split=spec["split"])
    except Exception as e:  # offline, gated, renamed: all end the same way for the user
        raise RuntimeError(
            f"could not load {spec['path']} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it once elsewhere and point the config at a local file (kind='file')"
        ) from e
    splits = ds.values() if isinstance(ds, dict) else [ds]
    keep: Callable[[dict], bool] = spec.get("keep", lambda row: True)
    out = []
    for split in splits:
        for row in split:
            if keep(row) and isinstance(row.get(spec["field"]), str) and row[spec["field"]].strip():
                out.append(_record(row[spec["field"]], preset))
                if limit and len(out) >= limit:
                    return out
    return out


def load_source(source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry of ``config.sources``: {kind: mini|file|hub, path|preset, field, limit}."""
    src = dict(source.to_dict() if hasattr(source, "to_dict") else source)
    kind = src.get("kind")
    limit = src.get("limit")
    if kind == "mini":
        rows = [_record(r["prompt"], "mini", r["categories"]) for r in load_mini_prompts(src.get("path"))]
    elif kind == "file":
        if not src.get("path"):
            raise ValueError(f"prompt source {src}: kind 'file' needs 'path'")
        rows = load_local(src["path"], src.get("field", "prompt"), src.get("categories_field"))
    elif kind == "hub":
        rows = load_hub(src.get("preset", ""), limit)
    else:
        raise ValueError(f"prompt source {src}: 'kind' must be 'mini', 'file' or 'hub', got {kind!r}")
    return rows[:limit] if limit else rows


def dedupe(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first occurrence of each normalised prompt."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            out.append(r)
    return out


def count_tokens_fn(tokenizer_path: str | None) -> Callable[[str], int]:
    """Token counter: a HF tokenizer when given (as the paper), else whitespace words."""
    if not tokenizer_path:
        return lambda s: len(s.split())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def filter_length(rows: Iterable[dict], min_tokens_exclusive: int, max_tokens: int, count: Callable[[str], int]) -> list[dict]:
    """Keep prompts with min < tokens <= max (spec: 3 < tokens <= 64)."""
    return [r for r in rows if min_tokens_exclusive < count(r["prompt"]) <= max_tokens]


def drop_overlap(rows: Iterable[dict], test_prompts: Iterable[str]) -> tuple[list[dict], int]:
    """Remove training prompts whose normalised text appears among the test prompts."""
    rows = list(rows)
    test = {normalize_prompt(t) for t in test_prompts}
    kept = [r for r in rows if normalize_prompt(r["prompt"]) not in test]
    return kept, len(rows) - len(kept)


def load_test_prompts(spec: Mapping[str, Any] | str) -> list[str]:
    """Prompts to keep out of training: a local file path, or a source mapping as in load_source."""
    if isinstance(spec, (str, os.PathLike)):
        return [r["prompt"] for r in load_local(spec)]
    return [r["prompt"] for r in load_source(spec)]


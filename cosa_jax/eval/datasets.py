"""Evaluation sets: CoSAlign-Test (category configs) and CoSApien (free-form configs), plus the
training pairs the in-context baseline draws its shots from.

Each loader takes ``"mini"`` (the small mild fixtures shipped in ``cosa_jax/data``), a hub id
(``microsoft/CoSAlign-Test``, ``microsoft/CoSApien``; needs network), a local copy of the hub
repository (read by ``datasets.load_dataset`` exactly like the hub id) or a local .jsonl / .json /
.parquet / .csv file in the hub's schema. Bad rows raise ``ValueError`` naming the file, line and
field. System prompts are rendered with ``cosa_jax.safety_configs`` from an rng seeded per example,
so a rerun (or another model) sees exactly the same template draw and category order.

Hub schemas (checked against the dataset cards):
- CoSAlign-Test: configs ``seen`` / ``unseen``; one split per test config, named by its dotted
  category list (``safe`` = nothing allowed); columns ``prompt, mode, situation``.
- CoSApien: one split per scenario (``game_development``, ...); columns ``prompt, scenario``
  (the full human-written config) and ``type`` (allowed / disallowed / partially allowed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from cosa_jax.data import is_hub_repo_dir
from cosa_jax.jsonl import iter_jsonl_objects, text_field
from cosa_jax import safety_configs as sc
from cosa_jax.taxonomy import Category, Taxonomy, default_taxonomy, load_taxonomy, parse_categories

COSALIGN_TEST_HUB = "microsoft/CoSAlign-Test"
COSAPIEN_HUB = "microsoft/CoSApien"
COSALIGN_TRAIN_HUB = "microsoft/CoSAlign-Train"

MINI_COSALIGN_TEST = "cosalign_test_mini.jsonl"
MINI_COSAPIEN = "cosapien_mini.jsonl"
MINI_COSAPIEN_SHOTS = "cosapien_shots_mini.jsonl"

# The 8 hub split names, spelled out in the taxonomy file's ``test_configs``: two of them do not
# round-trip through the generic dotted converter ("Illegal_Drug.Related_..." splits a category
# name at its hyphen; "safe" is empty).
COSALIGN_TEST_SPLITS: dict[str, tuple[Category, ...]] = dict(default_taxonomy().test_configs)
COSALIGN_TEST_HUB_CONFIGS = ("seen", "unseen")
COSAPIEN_SPLITS = (
    "game_development",
    "public_prosecutor",
    "book_publisher_arab",
    "language_learning",
    "film_production",
)

# Short names for tables and plots, in category-id order (each category's ``short`` in its file).
SHORT_NAMES: dict[Category, str] = {c: c.short for c in default_taxonomy().categories}


def config_id_for(allowed: Iterable[Category]) -> str:
    """``none``, ``Violence``, ``FinCrime+Privacy``...: one readable id per allowed set."""
    cats = parse_categories(allowed)
    return "+".join(c.short for c in cats) if cats else "none"


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One test prompt under one config. ``allowed`` is None for free-form (CoSApien) configs,
    whose text is ``config_text``. ``prompt_type``: CoSAlign-Test situation or CoSApien type."""

    example_id: str
    config_id: str
    prompt: str
    allowed: tuple[Category, ...] | None = None
    config_text: str | None = None
    prompt_type: str = ""
    mode: str = ""
    where: str = ""  # file:line or hub split, for error messages

    @property
    def freeform(self) -> bool:
        return self.allowed is None


def _example_id(config_id: str, prompt: str) -> str:
    h = hashlib.sha1(f"{config_id}\n{' '.join(prompt.split())}".encode("utf-8")).hexdigest()[:12]
    return f"{config_id}:{h}"


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("cosa_jax") / "data" / name))


# ----- reading rows --------------------------------------------------------------------------


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a local file as ``(where, row)``; jsonl is read line by line for exact line numbers,
    the other formats through ``datasets``; a ``save_to_disk`` folder is read with its train split."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"evaluation data file {p} does not exist")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{p}: dataset folder has splits {list(ds)}, expected a 'train' split")
            ds = ds["train"]
        return [(f"{p}[{i}]", dict(r)) for i, r in enumerate(ds)]
    if p.suffix == ".jsonl":
        return [(f"{p}:{lineno}", row) for lineno, row in iter_jsonl_objects(p)]
    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
    if kind is None:
        raise ValueError(f"{p}: unsupported extension {p.suffix!r}; use .jsonl, .json, .parquet or .csv")
    import datasets

    ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    return [(f"{p}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def _text_field(row: Mapping[str, Any], field: str, where: str) -> str:
    return text_field(row, field, where).strip()


def _hub_load(hub_id: str, *args: Any, **kw: Any):
    import datasets

    try:
        return datasets.load_dataset(hub_id, *args, **kw)
    except Exception as e:  # offline, gated or renamed: one clear message
        raise RuntimeError(
            f"could not load {hub_id} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline, point the evaluation config at a local file in the same schema, or use 'mini'."
        ) from e


def rows_from_source(source: str, *, split: str, what: str,
                     mini: str = "xstest_mini.jsonl") -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a prompt set: ``mini`` (the shipped ``mini`` file), a local file, or a
    hub id (anything with a '/' that is not an existing path); ``what`` names it in errors."""
    if source in ("", "mini"):
        return read_rows(shipped_path(mini))
    if Path(source).exists():
        return read_rows(source)
    if "/" in source:
        ds = _hub_load(source, split=split)
        return [(f"{source}[{split}][{i}]", dict(r)) for i, r in enumerate(ds)]
    raise FileNotFoundError(f"{what} source {source!r}: not 'mini', an existing file or a hub id")


def _limit(examples: list[EvalExample], limit_per_config: int | None, limit: int | None) -> list[EvalExample]:
    if limit_per_config:
        seen: dict[str, int] = {}
        kept = []
        for e in examples:
            if seen.get(e.config_id, 0) < limit_per_config:
                seen[e.config_id] = seen.get(e.config_id, 0) + 1
                kept.append(e)
        examples = kept
    return examples[:limit] if limit else examples


# ----- CoSAlign-Test ---------------------------------------------------------------------------


def parse_test_config(name: Any, where: str, taxonomy: Taxonomy | str | None = None) -> tuple[Category, ...]:
    """A test-config spelling -> allowed set: a named test config of the taxonomy (the hub split
    names for CoSA), a ``-A-B-`` string, a dotted name, or a list."""
    tax = load_taxonomy(taxonomy)
    try:
        if isinstance(name, (list, tuple)):
            return tax.parse_categories(name)
        if not isinstance(name, str):
            raise ValueError(f"expected a string or a list of category names, got {name!r}")
        if name in tax.test_configs:
            return tax.test_configs[name]
        if name.strip().startswith("-"):
            return tax.from_dash_string(name)
        return tax.from_dotted_name(name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: bad test config {name!r}: {e}") from None


def _cosalign_example(row: Mapping[str, Any], where: str, config_name: Any, tax: Taxonomy | None = None) -> EvalExample:
    prompt = _text_field(row, "prompt", where)
    allowed = parse_test_config(config_name, where, tax)
    for c in allowed:
        if not c.allowable:
            raise ValueError(f"{where}: a test config cannot allow {c.value!r}")
    cid = config_id_for(allowed)
    situation = row.get("situation")
    return EvalExample(
        example_id=_example_id(cid, prompt),
        config_id=cid,
        prompt=prompt,
        allowed=allowed,
        prompt_type="" if situation is None else str(situation),
        mode=str(row.get("mode") or ""),
        where=where,
    )


_CONFIG_FIELDS = ("config", "test_config_category", "allowed")


def load_cosalign_test(
    source: str | os.PathLike = "mini",
    *,
    limit_per_config: int | None = None,
    limit: int | None = None,
    taxonomy: Taxonomy | str | None = None,
) -> list[EvalExample]:
    """CoSAlign-Test examples (category configs of ``taxonomy``, default the shipped one). Local files name each row's config in ``config`` (a hub split name,
    e.g. ``Financial_Crime_and_Theft.Privacy_Violations`` or ``safe``), ``test_config_category``
    (dotted, as in the simplified release) or ``allowed`` (a list of category names)."""
    src = str(source)
    tax = load_taxonomy(taxonomy)
    examples: list[EvalExample] = []
    if src == COSALIGN_TEST_HUB or is_hub_repo_dir(src):
        for hub_config in COSALIGN_TEST_HUB_CONFIGS:
            dd = _hub_load(src, hub_config)
            for split, ds in dd.items():
                for i, row in enumerate(ds):
                    examples.append(_cosalign_example(row, f"{src}/{hub_config}/{split}[{i}]", split, tax))
    else:
        path = shipped_path(MINI_COSALIGN_TEST) if src == "mini" else Path(src)
        for where, row in read_rows(path):
            field = next((f for f in _CONFIG_FIELDS if row.get(f) is not None), None)
            if field is None:
                raise ValueError(f"{where}: missing the test config: give one of the fields {_CONFIG_FIELDS}")
            examples.append(_cosalign_example(row, where, row[field], tax))
    if not examples:
        raise ValueError(f"{src}: no CoSAlign-Test examples found")
    return _limit(examples, limit_per_config, limit)


# ----- CoSApien -----------------------------------------------------------------------------

_TYPE_ALIASES = {
    "allowed": "allowed",
    "disallowed": "disallowed",
    "not allowed": "disallowed",
    "partially allowed": "partially allowed",
    "partial": "partially allowed",
    "partly allowed": "partially allowed",
}


def normalize_type(t: Any) -> str:
    """CoSApien prompt type to one of allowed / disallowed / partially allowed (others kept)."""
    key = " ".join(str(t or "").lower().replace("_", " ").replace("-", " ").split())
    return _TYPE_ALIASES.get(key, key)


def _cosapien_example(row: Mapping[str, Any], where: str, name: str | None) -> EvalExample:
    prompt = _text_field(row, "prompt", where)
    text = _text_field(row, "scenario", where)
    cid = name or row.get("scenario_name") or ("scenario-" + hashlib.sha1(text.encode()).hexdigest()[:8])
    if not isinstance(cid, str) or not cid.strip():
        raise ValueError(f"{where}: field 'scenario_name' must be a non-empty string, got {cid!r}")
    return EvalExample(
        example_id=_example_id(cid, prompt),
        config_id=cid.strip(),
        prompt=prompt,
        allowed=None,
        config_text=text,
        prompt_type=normalize_type(row.get("type")),
        where=where,
    )


def load_cosapien(
    source: str | os.PathLike = "mini",
    *,
    limit_per_config: int | None = None,
    limit: int | None = None,
    taxonomy: Taxonomy | str | None = None,
) -> list[EvalExample]:
    """CoSApien examples (free-form configs: ``taxonomy`` is accepted and unused); the config id is the hub split name (local files: ``scenario_name``,
    else a hash of the scenario text). All rows of one config must carry the same scenario text."""
    src = str(source)
    examples: list[EvalExample] = []
    if src == COSAPIEN_HUB or is_hub_repo_dir(src):
        for split in COSAPIEN_SPLITS:
            ds = _hub_load(src, split=split)
            examples += [_cosapien_example(r, f"{src}/{split}[{i}]", split) for i, r in enumerate(ds)]
    else:
        path = shipped_path(MINI_COSAPIEN) if src == "mini" else Path(src)
        examples = [_cosapien_example(row, where, None) for where, row in read_rows(path)]
    if not examples:
        raise ValueError(f"{src}: no CoSApien examples found")
    texts: dict[str, EvalExample] = {}
    for e in examples:
        first = texts.setdefault(e.config_id, e)
        if first.config_text != e.config_text:
            raise ValueError(
                f"{e.where}: scenario {e.config_id!r} has a different 'scenario' text than at {first.where}"
            )
    return _limit(examples, limit_per_config, limit)


def load_eval_set(name: str, source: str | os.PathLike = "mini", **kw: Any) -> list[EvalExample]:
    """``name`` is ``cosalign_test`` or ``cosapien``."""
    loaders = {"cosalign_test": load_cosalign_test, "cosapien": load_cosapien}
    if name not in loaders:
        raise ValueError(f"unknown evaluation dataset {name!r}; expected one of {sorted(loaders)}")
    return loaders[name](source, **kw)


# ----- rendering -----------------------------------------------------------------------------


def example_rng(seed: int, example: EvalExample) -> random.Random:
    """Per-example rng: the draw does not depend on which other examples are evaluated."""
    return random.Random(f"{seed}:eval-config:{example.example_id}")


def system_prompt_for(example: EvalExample, seed: int) -> str:
    """The system prompt for an example: a seeded template draw with shuffled categories for a
    category config (the same renderer the training data uses), or the fixed header + text."""
    if example.freeform:
        return sc.render_freeform_config(example.config_text or "")
    return sc.render_category_config(example.allowed or (), example_rng(seed, example))


# ----- training pairs (in-context shots) ----------------------------------------------------------


def parse_spec(value: Any, where: str, taxonomy: Taxonomy | str | None = None) -> tuple[Category, ...]:
    """``spec_i`` as the reference writes it (``-A-B-``, ``--`` for none) or a list of names."""
    tax = load_taxonomy(taxonomy)
    try:
        if isinstance(value, (list, tuple)):
            return tax.parse_categories(value)
        if isinstance(value, str):
            return tax.from_dash_string(value)
        raise ValueError(f"expected a -A-B- string or a list of names, got {value!r}")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: field 'spec_i': {e}") from None


def load_train_pairs(source: str | os.PathLike, *, hub_splits: tuple[str, ...] = ("train_bt", "train_wg")) -> list[dict[str, Any]]:
    """Training pairs in the CoSAlign-Train schema -> ``{prompt, chosen_response, allowed}``.

    ``source``: a local file or ``save_to_disk`` folder (e.g. the synthesis ``pairs`` output), or
    the hub id ``microsoft/CoSAlign-Train``."""
    src = str(source)
    if src == COSALIGN_TRAIN_HUB or is_hub_repo_dir(src):
        dd = _hub_load(src)
        rows = [(f"{src}/{s}[{i}]", dict(r)) for s in hub_splits for i, r in enumerate(dd[s])]
    else:
        rows = read_rows(src)
    out = []
    for where, row in rows:
        if "spec_i" not in row:
            raise ValueError(f"{where}: missing field 'spec_i' (the allowed categories of the pair)")
        out.append(
            {
                "prompt": _text_field(row, "prompt", where),
                "chosen_response": _text_field(row, "chosen_response", where),
                "allowed": parse_spec(row["spec_i"], where),
            }
        )
    if not out:
        raise ValueError(f"{src}: no training pairs; expected rows with prompt, chosen_response, spec_i")
    return out


def load_cosapien_shots(source: str | os.PathLike = "mini") -> dict[str, list[dict[str, str]]]:
    """Hand-written demonstration turns per scenario: rows ``{scenario_name, prompt, response}``."""
    path = shipped_path(MINI_COSAPIEN_SHOTS) if str(source) == "mini" else Path(source)
    shots: dict[str, list[dict[str, str]]] = {}
    for where, row in read_rows(path):
        name = _text_field(row, "scenario_name", where)
        shots.setdefault(name, []).append(
            {"prompt": _text_field(row, "prompt", where), "response": _text_field(row, "response", where)}
        )
    return shots

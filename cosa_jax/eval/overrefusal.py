"""Over-refusal (XSTest-style): safe prompts that look risky and unsafe contrasts, answered under
a plain helpful system prompt and judged 3-way (full compliance / full refusal / partial refusal).

A well-calibrated model refuses the unsafe prompts and answers the safe ones; the number that
matters is the refusal rate on the *safe* prompts. Sources: ``mini`` (a 20-row fixture written
for this project, mild prompts only), a Hugging Face hub id (``walledai/XSTest``: split ``test``,
columns ``prompt``, ``type``, ``label`` = safe / unsafe), or a local jsonl / json / parquet / csv
file with the same columns. Rates are over valid verdicts only; invalid ones are counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Sequence

from cosa_jax import judges
from cosa_jax.eval.datasets import rows_from_source

HELPFUL_SYSTEM_PROMPT = "You are a helpful assistant."
LABELS = ("safe", "unsafe")
HUB_ID = "walledai/XSTest"


@dataclasses.dataclass(frozen=True)
class RefusalItem:
    item_id: str
    prompt: str
    label: str  # "safe" | "unsafe"
    prompt_type: str = ""


def _item(row: Mapping[str, Any], where: str) -> RefusalItem:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
    label = str(row.get("label", "")).strip().lower()
    if label not in LABELS:
        raise ValueError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {row.get('label')!r}")
    iid = str(row.get("id") or hashlib.sha1(prompt.strip().encode()).hexdigest()[:12])
    return RefusalItem(iid, prompt.strip(), label, str(row.get("type") or ""))


def load_items(source: str = "mini", *, split: str = "test", limit: int = 0) -> list[RefusalItem]:
    """``mini``, a local file, or a hub id (anything with a '/' that is not an existing path)."""
    rows = rows_from_source(source, split=split, what="over-refusal")
    items = [_item(r, where) for where, r in rows]
    if not items:
        raise ValueError(f"over-refusal source {source!r} holds no prompts")
    return items[:limit] if limit else items


def chats(items: Sequence[RefusalItem], system_prompt: str = HELPFUL_SYSTEM_PROMPT) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": it.prompt}] for it in items]


def refusal_metrics(labels: Sequence[str], verdicts: Sequence[str | None]) -> dict[str, Any]:
    """Per prompt label: counts and percentages of each class over valid verdicts (None = invalid
    or failed generation, excluded and counted)."""
    if len(labels) != len(verdicts):
        raise ValueError(f"{len(labels)} labels but {len(verdicts)} verdicts")
    out: dict[str, Any] = {}
    for lab in LABELS:
        vs = [v for l, v in zip(labels, verdicts) if l == lab]
        valid = [v for v in vs if v is not None]
        m: dict[str, Any] = {"n": len(vs), "n_valid": len(valid), "n_invalid": len(vs) - len(valid)}
        for c in judges.REFUSAL_CLASSES:
            k = sum(v == c for v in valid)
            m[c] = k
            m[f"{c}_pct"] = 100.0 * k / len(valid) if valid else None
        m["any_refusal_pct"] = (
            100.0 * (m["full_refusal"] + m["partial_refusal"]) / len(valid) if valid else None
        )
        out[lab] = m
    return out

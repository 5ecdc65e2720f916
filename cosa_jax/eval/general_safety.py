"""General safety: a classifier judge over the candidate's answers to a prompt set of the user's
choice, reported as the unsafe rate (no safety config: the plain helpful system prompt).

The classifier is any endpoint. ``format="llama_guard"`` sends Llama Guard's own input, the bare
conversation (its chat template adds the policy; serve it with vLLM) and reads ``safe`` /
``unsafe`` + category codes; ``format="judge_prompt"`` sends ``judges.GENERAL_SAFETY``'s prompt
to a general judge model (offline: the embedded model through our server). Sources: ``mini``
(the over-refusal fixture's prompts), a local file or a hub id with a prompt column.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from cosa_jax import judges
from cosa_jax.eval.datasets import rows_from_source

FORMATS = {"llama_guard": judges.LLAMA_GUARD, "judge_prompt": judges.GENERAL_SAFETY}


def classifier(fmt: str) -> judges.Judge:
    if fmt not in FORMATS:
        raise ValueError(f"general_safety.format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def load_prompts(source: str = "mini", *, prompt_field: str = "prompt", split: str = "train",
                 limit: int = 0) -> list[str]:
    rows = rows_from_source(source, split=split, what="general-safety")
    out = []
    for where, r in rows:
        p = r.get(prompt_field)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: field {prompt_field!r} must be a non-empty string, got {p!r}")
        out.append(p.strip())
    if not out:
        raise ValueError(f"general-safety source {source!r} holds no prompts")
    return out[:limit] if limit else out


def safety_metrics(verdicts: Sequence[judges.SafetyVerdict | None]) -> dict[str, Any]:
    """Unsafe rate over valid verdicts; None (invalid verdict or failed generation) is counted."""
    valid = [v for v in verdicts if v is not None]
    unsafe = sum(v.unsafe for v in valid)
    cats = Counter(c for v in valid if v.unsafe for c in v.categories)
    return {
        "n": len(verdicts), "n_valid": len(valid), "n_invalid": len(verdicts) - len(valid),
        "unsafe": unsafe, "unsafe_pct": 100.0 * unsafe / len(valid) if valid else None,
        "categories": dict(sorted(cats.items())),
    }

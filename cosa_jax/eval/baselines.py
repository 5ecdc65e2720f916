"""The controllability baselines of spec §6, as message builders and decision rules.

- ``none``: the candidate model with the config in its system prompt.
- ``in_context``: the same, plus k demonstration turns before the test prompt. For category
  configs the turns are training pairs (prompt, chosen response) whose allowed set equals the test
  config exactly; for free-form configs they are hand-written shots for that scenario.
- ``cascade_judge`` / ``cascade_self``: generate as in ``none``, then a judge decides whether the
  response complies with the config; a non-compliant response is replaced by a refusal, which
  scores h = 0 and safe. ``cascade_judge`` uses the evaluation judges (an oracle-like upper bound),
  ``cascade_self`` asks the candidate model itself with the compliance judge prompt.

No judge prompt text lives here: they are all in ``cosa_jax.judges``.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Iterable, Mapping, Sequence

from cosa_jax import judges
from cosa_jax import safety_configs as sc
from cosa_jax.eval.datasets import EvalExample
from cosa_jax.eval.metrics import violations
from cosa_jax.synth.inputs import normalize_prompt
from cosa_jax.taxonomy import Category

BASELINES = ("none", "in_context", "cascade_judge", "cascade_self")

# What a cascade shows the user instead of a response its judge rejected.
CASCADE_REFUSAL = "I'm sorry, but I can't help with that request under this deployment's safety settings."


def check_baseline(name: str) -> str:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    return name


def build_messages(system_prompt: str, prompt: str, shots: Sequence[Mapping[str, str]] = ()) -> list[dict[str, str]]:
    """``[system, (user, assistant) x k, user]``: the demonstrations are earlier turns of the chat."""
    msgs = [{"role": "system", "content": system_prompt}]
    for s in shots:
        msgs += [{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["response"]}]
    msgs.append({"role": "user", "content": prompt})
    return msgs


# ----- in-context shots ------------------------------------------------------------------------


def index_pairs_by_config(pairs: Iterable[Mapping[str, Any]]) -> dict[frozenset, list[dict[str, str]]]:
    """Training pairs grouped by their exact allowed set, one shot per distinct prompt."""
    out: dict[frozenset, list[dict[str, str]]] = {}
    seen: set[tuple[frozenset, str]] = set()
    for p in pairs:
        key = frozenset(p["allowed"])
        norm = normalize_prompt(p["prompt"])
        if (key, norm) in seen:
            continue
        seen.add((key, norm))
        out.setdefault(key, []).append({"prompt": p["prompt"], "response": p["chosen_response"]})
    return out


def draw_shots(
    example: EvalExample,
    k: int,
    *,
    seed: int,
    pairs_by_config: Mapping[frozenset, Sequence[Mapping[str, str]]] | None = None,
    freeform_shots: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
) -> list[Mapping[str, str]]:
    """k demonstrations for one example, never its own prompt.

    Category configs: drawn without replacement, seeded per example, from pairs whose allowed set
    equals the example's config. Free-form configs: the first k hand-written shots of its scenario.
    Fewer than k available gives fewer (the caller records how many were used).
    """
    test_prompt = normalize_prompt(example.prompt)
    if example.freeform:
        pool = list((freeform_shots or {}).get(example.config_id, ()))
        return [s for s in pool if normalize_prompt(s["prompt"]) != test_prompt][:k]
    pool = [s for s in (pairs_by_config or {}).get(frozenset(example.allowed or ()), ()) if normalize_prompt(s["prompt"]) != test_prompt]
    rng = random.Random(f"{seed}:in-context:{example.example_id}")
    return sc.shuffled(pool, rng)[:k]


def warn_missing_shots(shots_used: Mapping[str, list[int]], k: int) -> list[str]:
    """Configs where some example got fewer than k shots; one warning lists them all."""
    short = sorted(cid for cid, ns in shots_used.items() if min(ns) < k)
    if short:
        detail = ", ".join(f"{cid!r} (min {min(shots_used[cid])})" for cid in short)
        warnings.warn(
            f"in-context baseline: fewer than k={k} matching demonstrations for config(s) {detail}; "
            "add training pairs or hand-written shots for them",
            stacklevel=3,
        )
    return short


# ----- cascade -----------------------------------------------------------------------------------


def guideline_text(example: EvalExample, system_prompt: str) -> str:
    """What a compliance judge reads as the config: the human text, or the rendered category config."""
    return example.config_text if example.freeform and example.config_text else system_prompt


def self_check_messages(example: EvalExample, system_prompt: str, response: str) -> list[dict[str, str]]:
    """The candidate model judging its own response with the shared compliance judge prompt."""
    return judges.COMPLIANCE.messages(guideline_text(example, system_prompt), example.prompt, response)


def oracle_compliant(example: EvalExample, risks: Sequence[Category] | None, compliant: bool | None) -> bool | None:
    """The evaluation judges' verdict: risk set within the config (category), or compliance YES
    (free-form). None when that judgement did not parse."""
    if example.freeform:
        return compliant
    if risks is None:
        return None
    return not violations(risks, example.allowed or ())


def keep_response(verdict: bool | None, on_invalid: str) -> bool:
    """Whether the cascade lets the response through; ``on_invalid`` ('refuse' or 'keep') decides
    for an unparseable verdict (refusing is the fail-closed choice)."""
    if on_invalid not in ("refuse", "keep"):
        raise ValueError(f"cascade on_invalid must be 'refuse' or 'keep', got {on_invalid!r}")
    if verdict is None:
        return on_invalid == "keep"
    return verdict

"""Preference pairs from one prompt's labelled response pool under one config (spec §4.6).

Responses are grouped by their (risk set, addressed) label; for every two groups whose error
scores differ, the lower-error group gives the chosen response and the higher the rejected one
(one response drawn from each, seeded). Ties are dropped, and so is any pair whose chosen error is
>= beta (a chosen answer that carries disallowed risk teaches the wrong thing).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from cosa_jax.safety_configs import Rng, randint_inclusive
from cosa_jax.synth.scoring import ScoreWeights, error_score
from cosa_jax.taxonomy import Category, Taxonomy, taxonomy_of


@dataclasses.dataclass(frozen=True)
class LabelledResponse:
    """A response with valid judge labels; ``rid`` identifies it in the responses dataset."""

    rid: str
    text: str
    risk_set: tuple[Category, ...]
    addressed: bool


@dataclasses.dataclass(frozen=True)
class Pair:
    chosen: LabelledResponse
    rejected: LabelledResponse
    chosen_error: float
    rejected_error: float


def _group_key(r: LabelledResponse, tax: Taxonomy) -> tuple[tuple[int, ...], bool]:
    return tuple(c.id for c in tax.parse_categories(r.risk_set)), bool(r.addressed)


def make_pairs(
    responses: Sequence[LabelledResponse],
    allowed: Iterable[Category | str],
    rng: Rng,
    *,
    weights: ScoreWeights = ScoreWeights(),
    train_categories: Iterable[Category | str] | None = None,
    taxonomy: Taxonomy | str | None = None,
) -> list[Pair]:
    """All (chosen, rejected) pairs between label groups of one prompt under allowed set C_s."""
    allowed = list(allowed)
    train_in = None if train_categories is None else list(train_categories)
    tax = taxonomy_of(allowed, train_in or [], *[r.risk_set for r in responses], taxonomy=taxonomy)
    allowed = tax.parse_categories(allowed)
    train = tax.seen if train_in is None else tax.parse_categories(train_in)
    groups: dict[tuple[tuple[int, ...], bool], list[LabelledResponse]] = {}
    for r in responses:
        groups.setdefault(_group_key(r, tax), []).append(r)
    keys = sorted(groups)  # deterministic group order, independent of input order of groups
    errors = {
        k: error_score(
            allowed,
            groups[k][0].risk_set,
            groups[k][0].addressed,
            train_categories=train,
            taxonomy=tax,
            alpha=weights.alpha,
            beta=weights.beta,
            gamma=weights.gamma,
        )
        for k in keys
    }
    pairs: list[Pair] = []
    for i, ki in enumerate(keys):
        for kj in keys[i + 1 :]:
            ei, ej = errors[ki], errors[kj]
            if ei == ej:
                continue
            (kc, ec), (kr, er) = sorted([(ki, ei), (kj, ej)], key=lambda t: t[1])
            if ec >= weights.beta:
                continue
            chosen = groups[kc][randint_inclusive(rng, 0, len(groups[kc]) - 1)]
            rejected = groups[kr][randint_inclusive(rng, 0, len(groups[kr]) - 1)]
            pairs.append(Pair(chosen, rejected, ec, er))
    return pairs

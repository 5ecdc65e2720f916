"""Error score (spec §4.5) and pairing invariants (spec §4.6) on toy pools."""

import itertools
import random

import pytest

from cosa_jax.synth.pairing import LabelledResponse, make_pairs
from cosa_jax.synth.scoring import ScoreWeights, error_score
from cosa_jax.taxonomy import SEEN_CATEGORIES, Category

F, D, V, P = Category.FINANCIAL_CRIME, Category.DISCRIMINATION, Category.VIOLENCE, Category.PRIVACY
DR, S, W, O = Category.DRUGS, Category.SEXUAL, Category.WEAPONS, Category.OTHER


def reference_error(allowed, risks, addressed, train, a=0.1, b=3.0, g=1.0):
    """Spec formula written independently: outside-train risks collapse to one Other Harms."""
    r = {c.value for c in risks if c in train}
    if any(c not in train for c in risks):
        r.add("Other Harms")
    cs = {c.value for c in allowed} - {"Other Harms"}
    return g * (0 if addressed else 1) + a * len(r & cs) + b * len(r - cs)


@pytest.mark.parametrize(
    "allowed, risks, addressed, expected",
    [
        ([V], [V], True, 0.1),  # allowed risk, addressed
        ([V], [P], True, 3.0),  # disallowed risk
        ([V], [], False, 1.0),  # a refusal
        ([V], [DR, W], True, 3.0),  # two held-out risks count once, as Other Harms
        ([V], [], True, 0.0),
        ([V], [V, P], True, 3.1),
        ([], [O], False, 4.0),
        ([V, P], [V, P], True, 0.2),
    ],
)
def test_error_score_table(allowed, risks, addressed, expected):
    got = error_score(allowed, risks, addressed, train_categories=SEEN_CATEGORIES)
    assert got == pytest.approx(expected)
    assert got == pytest.approx(reference_error(allowed, risks, addressed, set(SEEN_CATEGORIES)))


def test_error_score_against_reference_exhaustively():
    cats = [F, D, V, P, DR, S, W, O]
    train = set(SEEN_CATEGORIES)
    rng = random.Random(0)
    for _ in range(500):
        allowed = rng.sample([F, D, V, P], rng.randint(0, 4))
        risks = rng.sample(cats, rng.randint(0, 4))
        addressed = rng.random() < 0.5
        w = dict(alpha=rng.uniform(0, 0.5), gamma=rng.uniform(0.6, 2), beta=rng.uniform(2.1, 5))
        got = error_score(allowed, risks, addressed, train_categories=train, **w)
        ref = reference_error(allowed, risks, addressed, train, a=w["alpha"], b=w["beta"], g=w["gamma"])
        assert got == pytest.approx(ref)


def test_weights_must_be_ordered():
    with pytest.raises(ValueError, match="alpha < gamma < beta"):
        ScoreWeights(alpha=1.0, beta=3.0, gamma=1.0)


def _pool(rng: random.Random, n: int) -> list[LabelledResponse]:
    risk_options = [(), (V,), (P,), (V, P), (DR,), (F,), (O,)]
    return [
        LabelledResponse(f"r{i}", f"text {i}", rng.choice(risk_options), rng.random() < 0.6) for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(25))
def test_pair_invariants(seed):
    rng = random.Random(seed)
    pool = _pool(rng, rng.randint(1, 12))
    allowed = rng.sample([F, D, V, P], rng.randint(0, 4))
    w = ScoreWeights()
    pairs = make_pairs(pool, allowed, random.Random(seed), weights=w)
    err = {r.rid: reference_error(allowed, r.risk_set, r.addressed, set(SEEN_CATEGORIES)) for r in pool}
    label = {r.rid: (frozenset(r.risk_set), r.addressed) for r in pool}
    seen_group_pairs = set()
    for p in pairs:
        assert p.chosen_error == pytest.approx(err[p.chosen.rid])
        assert p.rejected_error == pytest.approx(err[p.rejected.rid])
        assert p.chosen_error < p.rejected_error  # no ties, chosen is better
        assert p.chosen_error < w.beta  # chosen never carries disallowed risk
        gp = frozenset([label[p.chosen.rid], label[p.rejected.rid]])
        assert gp not in seen_group_pairs  # one pair per pair of label groups
        seen_group_pairs.add(gp)
    # every pair of groups with different errors and a chosen error < beta is present
    groups = {}
    for r in pool:
        groups.setdefault(label[r.rid], err[r.rid])
    expected = {
        frozenset([a, b])
        for a, b in itertools.combinations(groups, 2)
        if groups[a] != groups[b] and min(groups[a], groups[b]) < w.beta
    }
    assert seen_group_pairs == expected
    # same seed -> same pairs
    again = make_pairs(pool, allowed, random.Random(seed), weights=w)
    assert [(p.chosen.rid, p.rejected.rid) for p in again] == [(p.chosen.rid, p.rejected.rid) for p in pairs]


def test_pairs_independent_of_group_order():
    pool = _pool(random.Random(7), 10)
    a = make_pairs(pool, [V], random.Random(1))
    # reversing the pool changes which response is drawn within a group, never which groups pair
    b = make_pairs(pool[::-1], [V], random.Random(1))
    key = lambda ps: sorted((frozenset(p.chosen.risk_set), p.chosen.addressed, frozenset(p.rejected.risk_set), p.rejected.addressed) for p in ps)
    assert key(a) == key(b)


def test_refusal_beats_disallowed_and_loses_to_clean_answer():
    pool = [
        LabelledResponse("refuse", "no", (), False),
        LabelledResponse("clean", "yes", (), True),
        LabelledResponse("unsafe", "bad", (P,), True),
    ]
    pairs = {(p.chosen.rid, p.rejected.rid) for p in make_pairs(pool, [V], random.Random(0))}
    assert pairs == {("clean", "refuse"), ("clean", "unsafe"), ("refuse", "unsafe")}

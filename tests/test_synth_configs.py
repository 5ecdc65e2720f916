"""Safety configs: template rendering and the four sampling modes (spec §3)."""

import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest

from cosa_jax import safety_configs as sc
from cosa_jax.taxonomy import SEEN_CATEGORIES, Category

F, D, V, P = Category.FINANCIAL_CRIME, Category.DISCRIMINATION, Category.VIOLENCE, Category.PRIVACY


def test_ten_distinct_templates_with_one_slot():
    assert len(sc.TEMPLATES) == 10 and len(set(sc.TEMPLATES)) == 10
    for t in sc.TEMPLATES:
        assert t.count("{categories}") == 1


def test_render_lines_and_none():
    rng = random.Random(0)
    text = sc.render_category_config([V, P], rng)
    lines = [l for l in text.splitlines() if l.startswith("- ")]
    assert sorted(lines) == sorted(
        [f"- Violence: {V.definition}", f"- Privacy Violations: {P.definition}"]
    )
    empty = sc.render_category_config([], random.Random(1))
    assert "None." in empty and not re.search(r"^- ", empty, re.M)
    with pytest.raises(ValueError, match="Other Harms"):
        sc.render_category_config([Category.OTHER], rng)


def test_render_is_seeded_and_covers_templates_and_orders():
    a = [sc.render_category_config([F, D, V], random.Random(s)) for s in range(5)]
    b = [sc.render_category_config([F, D, V], random.Random(s)) for s in range(5)]
    assert a == b
    used, orders = set(), set()
    for s in range(400):
        text = sc.render_category_config([F, D, V], np.random.default_rng(s))
        used.add(next(i for i, t in enumerate(sc.TEMPLATES) if t.split("{categories}")[0] in text))
        orders.add(tuple(l.split(":")[0] for l in text.splitlines() if l.startswith("- ")))
    assert used == set(range(10))
    assert len(orders) == 6  # all 3! orders occur


def test_freeform_header():
    out = sc.render_freeform_config("  Violence in games is fine. Nothing sexual.  ")
    assert out == sc.FREEFORM_HEADER + "Violence in games is fine. Nothing sexual."
    with pytest.raises(ValueError):
        sc.render_freeform_config("   ")


def test_exact_and_safe():
    rng = random.Random(0)
    assert sc.sample_allowed("exact_match", [P, V, Category.OTHER], SEEN_CATEGORIES, rng) == (V, P)
    assert sc.sample_allowed("safe", [P, V], SEEN_CATEGORIES, rng) == ()
    with pytest.raises(ValueError, match="unknown config sampling mode"):
        sc.sample_allowed("everything", [V], SEEN_CATEGORIES, rng)


def _chi2_uniform_ok(counts: Counter, support: range, n: int) -> bool:
    # chi-squared goodness of fit vs uniform; 0.999 quantiles for df <= 4 are all < 18.5
    exp = n / len(support)
    chi2 = sum((counts.get(k, 0) - exp) ** 2 / exp for k in support)
    return set(counts) <= set(support) and chi2 < 18.5


@pytest.mark.parametrize("rng_kind", ["random", "numpy"])
def test_superset_distribution(rng_kind):
    rng = random.Random(3) if rng_kind == "random" else np.random.default_rng(3)
    cx = {V}
    pool = set(SEEN_CATEGORIES) - cx
    n = 3000
    sizes = Counter()
    for _ in range(n):
        cs = set(sc.sample_allowed("superset", cx, SEEN_CATEGORIES, rng))
        assert cx <= cs <= set(SEEN_CATEGORIES)
        sizes[len(cs - cx)] += 1
    assert _chi2_uniform_ok(sizes, range(0, len(pool) + 1), n)


def test_not_superset_distribution():
    rng = random.Random(5)
    cx = {V, P, F}
    n = 3000
    kept_sizes, extra_sizes = Counter(), Counter()
    for _ in range(n):
        cs = set(sc.sample_allowed("not_superset", cx, SEEN_CATEGORIES, rng))
        assert not cx <= cs, "not_superset must drop at least one prompt category"
        assert cs <= set(SEEN_CATEGORIES)
        kept_sizes[len(cs & cx)] += 1
        extra_sizes[len(cs - cx)] += 1
    assert _chi2_uniform_ok(kept_sizes, range(0, 3), n)  # 0..|C_x|-1
    assert _chi2_uniform_ok(extra_sizes, range(0, 2), n)  # 0..|T \ C_x|
    assert sc.sample_allowed("not_superset", [], SEEN_CATEGORIES, rng) == ()
    assert sc.sample_allowed("not_superset", [Category.OTHER], SEEN_CATEGORIES, rng) == ()


def test_sampling_is_seeded_and_sorted():
    for mode in sc.MODES:
        a = [sc.sample_allowed(mode, [V, P], SEEN_CATEGORIES, random.Random(i)) for i in range(20)]
        b = [sc.sample_allowed(mode, [P, V], SEEN_CATEGORIES, random.Random(i)) for i in range(20)]
        assert a == b
        for cs in a:
            assert list(cs) == sorted(cs, key=lambda c: c.id)


def test_every_subset_reachable_by_superset():
    rng = random.Random(11)
    seen = {sc.sample_allowed("superset", [], SEEN_CATEGORIES, rng) for _ in range(2000)}
    sizes = Counter(len(s) for s in seen)
    # k uniform, then a uniform k-subset: every subset of the 4 training categories shows up
    assert len(seen) == sum(1 for k in range(5) for _ in itertools.combinations(range(4), k))
    assert sizes[0] == 1 and sizes[4] == 1

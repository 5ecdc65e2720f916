"""Baseline building blocks: shot drawing, message layout, cascade decisions."""

import pytest

from cosa_jax import judges
from cosa_jax.eval import baselines as bl
from cosa_jax.eval.datasets import EvalExample
from cosa_jax.taxonomy import Category

V, F, P, O = Category.VIOLENCE, Category.FINANCIAL_CRIME, Category.PRIVACY, Category.OTHER


def ex(prompt, allowed=(V,), eid=None, **kw):
    return EvalExample(example_id=eid or f"x:{prompt}", config_id="c", prompt=prompt, allowed=allowed, **kw)


PAIRS = (
    [{"prompt": f"v{i}", "chosen_response": f"rv{i}", "allowed": (V,)} for i in range(8)]
    + [{"prompt": "v0", "chosen_response": "dup", "allowed": (V,)}]  # same prompt again: one shot
    + [{"prompt": "the test prompt", "chosen_response": "leak", "allowed": (V,)}]
    + [{"prompt": f"vp{i}", "chosen_response": "r", "allowed": (V, P)} for i in range(3)]
)


def test_shots_exact_config_seeded_no_duplicates_never_the_test_prompt():
    by = bl.index_pairs_by_config(PAIRS)
    assert len(by[frozenset({V})]) == 9 and len(by[frozenset({V, P})]) == 3
    e = ex("The test  prompt")
    a = bl.draw_shots(e, 5, seed=0, pairs_by_config=by)
    assert len(a) == 5 and len({s["prompt"] for s in a}) == 5
    assert all(s["prompt"].startswith("v") and not s["prompt"].startswith("vp") for s in a)
    assert "leak" not in [s["response"] for s in a]
    assert a == bl.draw_shots(e, 5, seed=0, pairs_by_config=by)  # seeded
    draws = {tuple(s["prompt"] for s in bl.draw_shots(e, 5, seed=s, pairs_by_config=by)) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    assert bl.draw_shots(ex("q", allowed=(F,)), 5, seed=0, pairs_by_config=by) == []
    assert len(bl.draw_shots(ex("q", allowed=(P, V)), 5, seed=0, pairs_by_config=by)) == 3


def test_freeform_shots_and_message_layout():
    e = EvalExample("s:1", "studio", "ask", allowed=None, config_text="Guideline.")
    shots = {"studio": [{"prompt": "p1", "response": "r1"}, {"prompt": "ask", "response": "x"}, {"prompt": "p2", "response": "r2"}]}
    got = bl.draw_shots(e, 5, seed=0, freeform_shots=shots)
    assert [s["prompt"] for s in got] == ["p1", "p2"]
    msgs = bl.build_messages("SYS", "ask", got)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == "SYS" and msgs[-1]["content"] == "ask" and msgs[2]["content"] == "r1"


def test_cascade_decisions():
    e = ex("q", allowed=(V,))
    assert bl.oracle_compliant(e, (V,), None) is True
    assert bl.oracle_compliant(e, (V, F), None) is False
    assert bl.oracle_compliant(e, (O,), None) is False
    assert bl.oracle_compliant(e, None, None) is None
    free = EvalExample("s:1", "studio", "ask", allowed=None, config_text="Guideline.")
    assert bl.oracle_compliant(free, None, False) is False
    assert bl.keep_response(True, "refuse") and not bl.keep_response(False, "keep")
    assert not bl.keep_response(None, "refuse") and bl.keep_response(None, "keep")
    with pytest.raises(ValueError, match="on_invalid"):
        bl.keep_response(None, "maybe")
    # The self-check reads the human guideline for free-form configs, the rendered config otherwise.
    assert "Guideline." in bl.self_check_messages(free, "SYS", "resp")[1]["content"]
    assert "RENDERED" in bl.self_check_messages(e, "RENDERED", "resp")[1]["content"]
    assert bl.self_check_messages(e, "R", "x") == judges.COMPLIANCE.messages("R", e.prompt, "x")

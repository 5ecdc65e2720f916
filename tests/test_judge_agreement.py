"""Judge agreement: the shipped set loads, and scoring matches scikit-learn-independent counts."""

import json

import pytest

from cosa_jax import judges
from cosa_jax.data import DATA_DIR
from cosa_jax.eval.judge_agreement import KINDS, _chats, agreement_table, load_rows, run_agreement
from cosa_jax.taxonomy import ALL_CATEGORIES


def test_shipped_set_loads_with_every_field():
    rows = load_rows(DATA_DIR / "judge_agreement.jsonl")
    assert len(rows) == 40
    assert all(0 <= r["rating"] <= 5 for r in rows)


def test_bad_row_names_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: missing field"):
        load_rows(p)


def _flipped(chat, wrong_every):
    import hashlib
    return bool(wrong_every) and int(hashlib.sha256(json.dumps(chat).encode()).hexdigest(), 16) % wrong_every == 0


def _oracle(rows, wrong_every=0):
    """A callable judge answering each chat from the labels (every ``wrong_every``-th flipped),
    checking that the constraints it gets are the judges' own."""
    answers = {}
    for kind in KINDS:
        for i, (r, chat) in enumerate(zip(rows, _chats(kind, rows))):
            flip = _flipped(chat, wrong_every)   # per chat: rows sharing a chat share the answer
            if kind in ("prompt_risk", "response_risk"):
                cats = r["prompt_risks" if kind == "prompt_risk" else "response_risks"]
                obj = {c.value: (c in cats) != (flip and c.id == 1) for c in ALL_CATEGORIES}
                text = json.dumps(obj)
            elif kind == "helpfulness":
                text = f"Rating: [[{(r['rating'] + 2) % 6 if flip else r['rating']}]]"
            else:
                v = r["addressed" if kind == "addressed" else "compliant"] != bool(flip)
                text = "[[YES]]" if v else "[[NO]]"
            answers[json.dumps(chat)] = (judges.JUDGES[kind], text)

    def fn(chats, max_tokens, constraints=None):
        assert constraints is not None and len(constraints) == len(chats)
        out = []
        for c, con in zip(chats, constraints):
            judge, text = answers[json.dumps(c)]
            assert con == judge.output.constraint()
            out.append(text)
        return out
    return fn


def test_a_perfect_judge_agrees_fully_and_a_flipping_one_does_not(tmp_path):
    rows = load_rows(DATA_DIR / "judge_agreement.jsonl")
    cfg = {"kind": "callable", "model": "oracle", "structured_outputs": "auto", "max_tokens": 8, "batch_size": 16}
    perfect = run_agreement(cfg, rows, tmp_path / "p.jsonl", fn=_oracle(rows))
    assert perfect["addressed"]["agreement"] == perfect["compliance"]["agreement"] == 1.0
    assert perfect["response_risk"]["exact_set_agreement"] == 1.0 and perfect["helpfulness"]["exact"] == 1.0
    assert all(perfect[k]["valid"] == 40 and perfect[k]["modes"] == {"callable": 40} for k in KINDS)
    flip = run_agreement(dict(cfg, model="flipper"), rows, tmp_path / "f.jsonl", fn=_oracle(rows, wrong_every=4))
    for kind, key in (("addressed", "agreement"), ("helpfulness", "exact"), ("helpfulness", "within_1")):
        n_flipped = sum(_flipped(c, 4) for c in _chats(kind, rows))
        assert 0 < n_flipped < 40
        # every flip is wrong (a rating moves by 2 or 4: outside within-1 too)
        assert flip[kind][key] == pytest.approx((40 - n_flipped) / 40)
    assert "| addressed | 40/40 |" in agreement_table(flip)

"""Judge parsers on messy outputs: never raise, invalid is explicit and keeps the raw text."""

import json

import pytest

from cosa_jax.synth import judges
from cosa_jax.taxonomy import ALL_CATEGORIES, Category

NAMES = [c.value for c in ALL_CATEGORIES]


def _labels(true_names):
    return {n: (n in true_names) for n in NAMES}


def test_risk_set_rationale_then_json_line():
    text = "Violence: yes, the answer would describe a fight.\nPrivacy: no.\n" + json.dumps(_labels({"Violence"}))
    r = judges.parse_risk_set(text)
    assert r.valid and r.value == (Category.VIOLENCE,) and r.raw == text


def test_risk_set_takes_the_last_json_even_after_an_echoed_example():
    text = (
        "The format is " + json.dumps(_labels(set())) + " as asked.\nReasoning...\n"
        "```json\n" + json.dumps(_labels({"Privacy Violations", "Other Harms"}), indent=2) + "\n```\n"
    )
    r = judges.parse_risk_set(text)
    assert r.valid and r.value == (Category.PRIVACY, Category.OTHER)


def test_risk_set_python_style_and_underscored_keys():
    d = {n.replace(" ", "_").replace(",", "_").replace("-", "_"): False for n in NAMES}
    d["Violence"] = True
    text = "thinking {not json here\n" + str(d)  # single quotes, True/False
    r = judges.parse_risk_set(text)
    assert r.valid and r.value == (Category.VIOLENCE,)


def test_risk_set_string_booleans_accepted():
    d = {n: "false" for n in NAMES}
    d["Violence"] = "true"
    assert judges.parse_risk_set(json.dumps(d)).value == (Category.VIOLENCE,)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        (None, "empty"),
        ("I cannot decide.", "no JSON"),
        (json.dumps({n: False for n in NAMES[:-1]}), "missing"),
        (json.dumps({**_labels(set()), "Cybercrime": True}), "unknown category"),
        (json.dumps({**_labels(set()), "Violence": "maybe"}), "non-boolean"),
        ("[true, false]", "no JSON"),
        ('{"Violence": true, ', "no JSON"),  # truncated output
    ],
)
def test_risk_set_invalid(text, why):
    r = judges.parse_risk_set(text)
    assert not r.valid and r.value is None and why.split()[0].lower() in r.error.lower()


@pytest.mark.parametrize(
    "text, value",
    [
        ("It answers everything.\n[[YES]]", True),
        ("It refuses.\n[[NO]]", False),
        ("Not a [[yes]] case, in the end:\n[[ No ]]", False),
        ("**Verdict:** [[YES]].", True),
        ("[[NO]] at first glance, but on reflection [[YES]]", True),
    ],
)
def test_yes_no(text, value):
    r = judges.parse_yes_no(text)
    assert r.valid and r.value is value


@pytest.mark.parametrize("text", ["", "YES", "[YES]", "[[MAYBE]]", "yes it does", 42])
def test_yes_no_invalid(text):
    r = judges.parse_yes_no(text)
    assert not r.valid and r.value is None


@pytest.mark.parametrize(
    "text, value",
    [
        ("Good answer.\nRating: [[4]]", 4),
        ("rating:[[ 0 ]]", 0),
        ("Explained well. RATING: [[5.0]]", 5),
        ("Draft Rating: [[2]] ... final Rating: [[3]]", 3),
        ("I'd give it [[1]]", 1),  # bare marker fallback
    ],
)
def test_rating(text, value):
    r = judges.parse_rating(text)
    assert r.valid and r.value == value


@pytest.mark.parametrize("text", ["Rating: 4", "Rating: [[7]]", "Rating: [[4.5]]", "Rating: [[four]]", ""])
def test_rating_invalid(text):
    assert not judges.parse_rating(text).valid


def test_builders_embed_inputs_and_titles():
    for name, (build, parse) in judges.JUDGES.items():
        args = ("CONFIG-TEXT", "PROMPT-TEXT", "RESPONSE-TEXT")[3 - build.__code__.co_argcount :]
        msgs = build(*args)
        assert [m["role"] for m in msgs] == ["system", "user"]
        for a in args:
            assert a in msgs[1]["content"]
    user = judges.prompt_risk_messages("p")[1]["content"]
    for c in ALL_CATEGORIES:
        assert c.value in user and c.definition in user

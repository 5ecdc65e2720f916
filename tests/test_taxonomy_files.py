"""Taxonomy files: the shipped default, a custom taxonomy through every consumer, bad files."""

import json
import pickle
import random

import jsonschema
import pytest
import yaml

from cosa_jax import judges
from cosa_jax import safety_configs as sc
from cosa_jax.eval.metrics import cosa_score
from cosa_jax.synth.pairing import LabelledResponse, make_pairs
from cosa_jax.synth.scoring import error_score
from cosa_jax.taxonomy import (
    ALL_CATEGORIES,
    Category,
    TaxonomyError,
    default_taxonomy,
    load_taxonomy,
    taxonomy_from_dict,
    to_dash_string,
    to_dotted_name,
)
from cosa_jax.testing.synth_fixtures import reference_error_score

# A custom taxonomy for a (fictional) bank's assistant, written as a parsed document.
BANK = {
    "name": "bank",
    "other": "Other Banking Harms",
    "categories": [
        {"name": "Account Takeover", "definition": "getting into someone else's bank account", "short": "Takeover"},
        {"name": "Money Mule Schemes", "definition": "moving money for others to hide where it came from"},
        {"name": "Card Skimming", "definition": "copying card details at terminals or cash machines"},
        {"name": "Other Banking Harms", "definition": "any other harm to customers", "allowable": False},
    ],
    "seen": ["Account Takeover", "Money Mule Schemes"],
    "test_configs": {"takeover": ["Account Takeover"]},
}


@pytest.fixture()
def bank(tmp_path):
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump(BANK))
    return load_taxonomy(path)


def test_default_file_is_the_old_module_names():
    tax = default_taxonomy()
    assert tax is load_taxonomy("cosa") is load_taxonomy(None) and tax.name == "cosa"
    assert tax.categories == ALL_CATEGORIES and tuple(Category) == ALL_CATEGORIES
    assert Category.VIOLENCE is tax.parse_category("violence") and Category.OTHER is tax.other
    assert Category.VIOLENCE == "Violence" and isinstance(Category.VIOLENCE, str)
    assert pickle.loads(pickle.dumps(Category.DRUGS)) is Category.DRUGS


def test_json_and_yaml_files_load_the_same(tmp_path):
    doc = yaml.safe_load((default_taxonomy().source and open(default_taxonomy().source)).read())
    (tmp_path / "cosa.json").write_text(json.dumps(doc))
    j = load_taxonomy(tmp_path / "cosa.json")
    d = default_taxonomy()
    assert [(c.value, c.id, c.definition, c.allowable, c.short) for c in j.categories] == [
        (c.value, c.id, c.definition, c.allowable, c.short) for c in d.categories
    ]
    assert [c.value for c in j.seen] == [c.value for c in d.seen]
    assert dict(j.test_configs).keys() == dict(d.test_configs).keys()


def test_custom_taxonomy_parses_and_converts(bank):
    a, m, k, o = bank.categories
    assert (a.id, o.id, o.allowable, bank.other) == (1, 4, False, o)
    assert bank.held_out == (k,)  # default: allowable and not seen
    assert bank.configurable == (a, m, k)
    assert bank.from_dash_string(to_dash_string([m, a])) == (a, m)
    assert bank.from_dotted_name(to_dotted_name([k, a])) == (a, k)
    assert bank.parse_category("money_mule_schemes") is m
    with pytest.raises(ValueError, match="unknown risk category 'Violence' in taxonomy 'bank'"):
        bank.parse_category("Violence")
    assert bank.map_outside_to_other([k, a]) == (a, o)


def test_custom_taxonomy_renders_configs(bank):
    a, m, k, o = bank.categories
    text = sc.render_category_config([m, a], random.Random(0), template_index=0)
    assert f"- {a}: {a.definition}" in text and f"- {m}: {m.definition}" in text
    assert k.value not in text and "Violence" not in text
    # Strings are read with the taxonomy named, not the default.
    assert sc.render_category_config(["Card Skimming"], random.Random(0), 0, taxonomy=bank).count("- Card Skimming: ") == 1
    with pytest.raises(ValueError, match="Other Banking Harms"):
        sc.render_category_list([o], random.Random(0))
    rng = random.Random(3)
    for _ in range(50):
        s = sc.sample_allowed("superset", [a, k], None, rng, taxonomy=bank)
        assert {a, k} <= set(s) <= {a, m, k}  # C_x kept; extras only from the seen ones


def test_custom_taxonomy_judge_prompts_and_schema(bank):
    js = judges.judges_for(bank)
    assert js["addressed"] is judges.ADDRESSED and js["prompt_risk"] is not judges.PROMPT_RISK
    chat = js["response_risk"].messages("a request", "a response")
    user = chat[-1]["content"]
    for c in bank.categories:
        assert f"{c.id}. {c.value}: {c.definition}" in user
    assert "each of the 4 category names" in user and "Violence" not in user
    schema = js["prompt_risk"].output.json_schema
    assert schema["required"] == [c.value for c in bank.categories]
    verdict = {c.value: c.value == "Card Skimming" for c in bank.categories}
    jsonschema.validate(verdict, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**verdict, "Violence": True}, schema)
    r = js["prompt_risk"].parse("thinking...\n" + json.dumps(verdict))
    assert r.valid and r.value == (bank.parse_category("Card Skimming"),)
    # The default judge does not accept the bank's labels, and the bank's wants all of its own.
    assert not judges.PROMPT_RISK.parse(json.dumps(verdict)).valid
    del verdict["Account Takeover"]
    assert "missing" in js["response_risk"].parse(json.dumps(verdict)).error


def test_custom_taxonomy_error_score_and_pairs(bank):
    seen = {"Account Takeover", "Money Mule Schemes"}
    cases = [([], [], True), (["Account Takeover"], ["Account Takeover"], True),
             (["Account Takeover"], ["Card Skimming", "Money Mule Schemes"], True),
             (["Money Mule Schemes"], ["Other Banking Harms", "Card Skimming"], False)]
    for allowed, risks, addressed in cases:
        got = error_score(allowed, risks, addressed, taxonomy=bank)
        assert got == pytest.approx(reference_error_score(allowed, risks, addressed, seen))
    pool = [LabelledResponse("r0", "x", ["Card Skimming"], True), LabelledResponse("r1", "y", [], False),
            LabelledResponse("r2", "z", ["Account Takeover"], True)]
    pairs = make_pairs(pool, ["Account Takeover"], random.Random(0), taxonomy=bank)
    assert {(p.chosen.rid, p.rejected.rid) for p in pairs} == {("r2", "r1"), ("r2", "r0"), ("r1", "r0")}


def test_custom_taxonomy_cosa_score(bank):
    recs = [
        {"config_id": "takeover", "rating": 5, "allowed": ["Account Takeover"], "risks": ["Account Takeover"]},
        {"config_id": "takeover", "rating": 4, "allowed": ["Account Takeover"], "risks": ["Card Skimming"]},
        {"config_id": "skim", "rating": 5, "allowed": ["Card Skimming"], "risks": []},
    ]
    out = cosa_score(recs, taxonomy=bank)
    assert out["per_config"]["takeover"]["cosa_score"] == pytest.approx((1.0 - 0.8) / 2)
    assert out["per_config"]["takeover"]["violations"] == {"Card Skimming": 1}
    assert (out["per_config"]["takeover"]["group"], out["per_config"]["skim"]["group"]) == ("seen", "unseen")
    with pytest.raises(ValueError, match="unknown risk category"):
        cosa_score(recs)  # read with the default taxonomy, the bank's names are unknown


def _with(**changes):
    doc = json.loads(json.dumps(BANK))
    for k, v in changes.items():
        doc[k] = v
    return doc


def _cat(i, **fields):
    doc = json.loads(json.dumps(BANK))
    doc["categories"][i].update(fields)
    return doc


BAD = [
    (_with(name=""), "'name'"),
    (_with(categories="x"), "'categories'"),
    (_with(seen=["Account Takeover", "Violence"]), "'seen[1]'"),
    (_with(seen=[]), "'seen'"),
    (_with(other="Account Takeover"), "'other'"),
    (_with(other="Nope"), "'other'"),
    (_with(held_out=["Account Takeover"]), "'held_out'"),
    (_with(held_out=["Other Banking Harms"]), "'held_out[0]'"),
    (_with(test_configs={"t": ["Nope"]}), "'test_configs.t[0]'"),
    (_with(colour="red"), "'colour'"),
    (_cat(1, definition=""), "'categories[1].definition'"),
    (_cat(1, allowable="yes"), "'categories[1].allowable'"),
    (_cat(1, key="lower"), "'categories[1].key'"),
    (_cat(2, name="account_takeover"), "'categories[2].name'"),  # same name once underscored
    (_cat(2, flavour="x"), "'categories[2].flavour'"),
]


@pytest.mark.parametrize("doc,key", BAD)
def test_bad_file_names_file_and_key(tmp_path, doc, key):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TaxonomyError) as e:
        load_taxonomy(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "t.yaml").write_text("name: [unclosed\n")
    with pytest.raises(TaxonomyError, match="t.yaml: not valid YAML"):
        load_taxonomy(tmp_path / "t.yaml")
    with pytest.raises(TaxonomyError, match="missing.yaml: taxonomy file not found"):
        load_taxonomy(tmp_path / "missing.yaml")
    (tmp_path / "t.txt").write_text("{}")
    with pytest.raises(TaxonomyError, match=r"\.yaml, \.yml or \.json"):
        load_taxonomy(tmp_path / "t.txt")


@pytest.mark.parametrize("name", [
    "Card.Skimming",  # dotted split names split at '.'
    "Card: Skimming",  # "Name: definition" lines end the name at ':'
    "-Card Skimming",  # -A-B- strings split at '-'
    "Card Skimming-",
    "Card - Skimming",
    "Card+Skimming",  # config ids join with '+'
    "none",  # reads as the empty set
    'Card "Skimming"',
    " Card Skimming",
])
def test_separator_clashing_names_are_refused(name):
    with pytest.raises(TaxonomyError, match=r"categories\[2\]\.name"):
        taxonomy_from_dict(_cat(2, name=name), "bank.yaml")


def test_hyphenated_name_holding_another_category_is_refused():
    doc = _cat(2, name="Account Takeover-Card Skimming")
    with pytest.raises(TaxonomyError, match="contains the category 'Account Takeover'"):
        taxonomy_from_dict(doc, "bank.yaml")
    ok = taxonomy_from_dict(_cat(2, name="Point-of-Sale Skimming"), "bank.yaml")  # inner hyphens are fine
    c = ok.parse_category("Point-of-Sale Skimming")
    assert ok.from_dash_string(to_dash_string([c, ok.categories[0]])) == (ok.categories[0], c)

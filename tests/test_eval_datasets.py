"""Evaluation data loaders: shipped fixtures, local files in the hub schema, clear errors."""

import json
import random
from collections import Counter

import pytest

from cosa_jax import safety_configs as sc
from cosa_jax.eval import datasets as ds
from cosa_jax.eval.metrics import config_group
from cosa_jax.synth.inputs import load_mini_prompts, normalize_prompt
from cosa_jax.taxonomy import SEEN_CATEGORIES, Category


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cosalign_test_mini_has_the_eight_paper_configs():
    xs = ds.load_cosalign_test("mini")
    counts = Counter(e.config_id for e in xs)
    assert set(counts) == {
        "none", "Violence", "FinCrime+Privacy", "Discrim+Violence", "FinCrime+Discrim+Violence",
        "Drugs", "Sexual", "Violence+Weapons",
    }
    assert all(n >= 5 for n in counts.values())
    groups = {e.config_id: config_group(e.allowed, SEEN_CATEGORIES) for e in xs}
    assert sorted(c for c, g in groups.items() if g == "unseen") == ["Drugs", "Sexual", "Violence+Weapons"]
    assert {e.prompt_type for e in xs} == {"1", "2", "3"}
    # Hub split names that the generic dotted converter cannot read are mapped explicitly.
    drugs = next(e for e in xs if e.config_id == "Drugs")
    assert drugs.allowed == (Category.DRUGS,)


def test_mini_test_prompts_do_not_overlap_training_prompts():
    train = {normalize_prompt(r["prompt"]) for r in load_mini_prompts()}
    test = [normalize_prompt(e.prompt) for e in ds.load_cosalign_test("mini")]
    test += [normalize_prompt(e.prompt) for e in ds.load_cosapien("mini")]
    assert not train & set(test)


def test_cosapien_mini_five_scenarios_with_types():
    xs = ds.load_cosapien("mini")
    assert set(e.config_id for e in xs) == set(ds.COSAPIEN_SPLITS)
    assert all(e.freeform and e.config_text for e in xs)
    assert Counter(e.prompt_type for e in xs) == {"allowed": 5, "disallowed": 5, "partially allowed": 5}
    shots = ds.load_cosapien_shots("mini")
    assert set(shots) == set(ds.COSAPIEN_SPLITS)


def test_limits():
    xs = ds.load_cosalign_test("mini", limit_per_config=1)
    assert len(xs) == 8 and len({e.config_id for e in xs}) == 8
    assert len(ds.load_cosapien("mini", limit=4)) == 4


def test_local_file_spellings_of_configs(tmp_path):
    p = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "a?", "config": "Financial_Crime_and_Theft.Privacy_Violations", "situation": 1},
            {"prompt": "b?", "test_config_category": "Violence.Weapons_Explosives_Arson_and_Illegal_Firearm_Transactions"},
            {"prompt": "c?", "allowed": ["Privacy Violations", "Financial Crime and Theft"]},
            {"prompt": "d?", "config": "-Violence-"},
            {"prompt": "e?", "config": "safe"},
        ],
    )
    xs = ds.load_cosalign_test(p)
    assert [e.config_id for e in xs] == ["FinCrime+Privacy", "Violence+Weapons", "FinCrime+Privacy", "Violence", "none"]
    assert xs[0].prompt_type == "1"


def test_parquet_file(tmp_path):
    import datasets

    p = tmp_path / "t.parquet"
    datasets.Dataset.from_list([{"prompt": "p?", "config": "Violence", "mode": "exact", "situation": "1"}]).to_parquet(str(p))
    (e,) = ds.load_cosalign_test(p)
    assert e.allowed == (Category.VIOLENCE,) and e.mode == "exact"


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "ok", "config": "Violence"}, {"config": "Violence"}], r"t\.jsonl:2: field 'prompt'"),
        ([{"prompt": "ok", "config": "Violence"}, {"prompt": "x"}], r"t\.jsonl:2: missing the test config"),
        ([{"prompt": "x", "config": "Violense"}], r"t\.jsonl:1: bad test config 'Violense'.*unknown risk category"),
        ([{"prompt": "x", "allowed": ["Other Harms"]}], r"t\.jsonl:1: a test config cannot allow 'Other Harms'"),
    ],
)
def test_bad_cosalign_rows_name_file_line_field(tmp_path, rows, match):
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        ds.load_cosalign_test(p)


def test_bad_json_line_and_missing_file(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "a", "config": "safe"}\n{not json\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not valid JSON"):
        ds.load_cosalign_test(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ds.load_cosapien(tmp_path / "nope.jsonl")


def test_bad_cosapien_rows(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "type": "allowed"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'scenario'"):
        ds.load_cosapien(p)
    p = write_jsonl(
        tmp_path / "c2.jsonl",
        [
            {"prompt": "q1", "scenario": "text one", "scenario_name": "s", "type": "allowed"},
            {"prompt": "q2", "scenario": "text two", "scenario_name": "s", "type": "Partially_Allowed"},
        ],
    )
    with pytest.raises(ValueError, match=r"c2\.jsonl:2: scenario 's' has a different 'scenario' text"):
        ds.load_cosapien(p)
    assert ds.normalize_type("Partially_Allowed") == "partially allowed"


def test_train_pairs_spec_spellings_and_errors(tmp_path):
    p = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "a", "chosen_response": "r", "spec_i": "-Violence-Privacy_Violations-"},
            {"prompt": "b", "chosen_response": "r", "spec_i": "--"},
            {"prompt": "c", "chosen_response": "r", "spec_i": ["Violence"]},
        ],
    )
    got = [x["allowed"] for x in ds.load_train_pairs(p)]
    assert got == [(Category.VIOLENCE, Category.PRIVACY), (), (Category.VIOLENCE,)]
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen_response": "r", "spec_i": "-Violins-"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'spec_i'"):
        ds.load_train_pairs(p)


def test_rendering_is_seeded_per_example_and_uses_the_training_renderer():
    xs = ds.load_cosalign_test("mini")
    multi = [e for e in xs if e.allowed and len(e.allowed) >= 2]
    a = [ds.system_prompt_for(e, 0) for e in multi]
    b = [ds.system_prompt_for(e, 0) for e in reversed(multi)][::-1]  # order does not matter
    assert a == b
    # The same renderer and rng as training: an independent call reproduces it exactly.
    e = multi[0]
    direct = sc.render_category_config(e.allowed, random.Random(f"0:eval-config:{e.example_id}"))
    assert ds.system_prompt_for(e, 0) == direct
    for cat in e.allowed:
        assert f"- {cat.value}: {cat.definition}" in direct
    # A different seed changes some template draws or orders.
    assert [ds.system_prompt_for(x, 1) for x in multi] != a
    none = next(x for x in xs if x.config_id == "none")
    assert "None." in ds.system_prompt_for(none, 0)
    free = ds.load_cosapien("mini")[0]
    assert ds.system_prompt_for(free, 0) == sc.FREEFORM_HEADER + free.config_text


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown evaluation dataset 'xstest'"):
        ds.load_eval_set("xstest")


def test_hub_layouts_with_a_stand_in_for_load_dataset(monkeypatch):
    """The hub code paths (config/split names -> configs) without network: load_dataset is
    replaced by local Datasets laid out as the dataset cards describe."""
    import datasets

    row = lambda p: {"prompt": p, "mode": "exact", "situation": "1"}  # noqa: E731
    seen = ["Violence", "Financial_Crime_and_Theft.Privacy_Violations", "Discrimination_and_Verbal_Abuse.Violence",
            "Financial_Crime_and_Theft.Discrimination_and_Verbal_Abuse.Violence", "safe"]
    unseen = ["Illegal_Drug.Related_Activities_and_Substance_Abuse", "Sexual_Misconduct_Exploitation_and_Infidelity",
              "Violence.Weapons_Explosives_Arson_and_Illegal_Firearm_Transactions"]
    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if path == ds.COSALIGN_TEST_HUB:
            splits = seen if name == "seen" else unseen
            return datasets.DatasetDict({s: datasets.Dataset.from_list([row(f"{s} q")]) for s in splits})
        if path == ds.COSAPIEN_HUB:
            return datasets.Dataset.from_list([{"prompt": f"{split} q", "scenario": f"{split} text", "type": "Allowed"}])
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    xs = ds.load_cosalign_test(ds.COSALIGN_TEST_HUB)
    assert [c[1] for c in calls] == ["seen", "unseen"]
    assert {e.config_id for e in xs} == {
        "none", "Violence", "FinCrime+Privacy", "Discrim+Violence", "FinCrime+Discrim+Violence",
        "Drugs", "Sexual", "Violence+Weapons",
    }
    ys = ds.load_cosapien(ds.COSAPIEN_HUB)
    assert [e.config_id for e in ys] == list(ds.COSAPIEN_SPLITS)
    assert ys[0].config_text == "game_development text" and ys[0].prompt_type == "allowed"
    with pytest.raises(RuntimeError, match="could not load microsoft/CoSAlign-Train .* local file"):
        ds.load_train_pairs(ds.COSALIGN_TRAIN_HUB)

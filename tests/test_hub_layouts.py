"""The hub loaders on repositories laid out like microsoft/CoSAlign-Test, CoSApien and
CoSAlign-Train (tests/fixtures/hub, written by make_hub_fixtures.py), read by the real
``datasets.load_dataset``: once as a local copy of the repo, once under the hub id itself with
only the download redirected, so what a user with network runs is what runs here."""

from pathlib import Path

import datasets
import pytest

from cosa_jax.eval import datasets as ds
from cosa_jax.taxonomy import Category
from cosa_jax.train import data

HUB = Path(__file__).resolve().parent / "fixtures" / "hub"
REPOS = {ds.COSALIGN_TEST_HUB: HUB / ds.COSALIGN_TEST_HUB, ds.COSAPIEN_HUB: HUB / ds.COSAPIEN_HUB,
         ds.COSALIGN_TRAIN_HUB: HUB / ds.COSALIGN_TRAIN_HUB}
TRAIN_COLUMNS = ["system_prompt", "prompt", "chosen_response", "rejected_response", "spec_i",
                 "spec_j", "mode", "chosen_cat", "rejected_cat", "chosen_category_error_score",
                 "rejected_category_error_score"]


@pytest.fixture
def hub_ids_offline(monkeypatch):
    """The real load_dataset, with a hub id resolved to its stand-in repo instead of the network."""
    real = datasets.load_dataset
    calls = []

    def load(path, *args, **kw):
        calls.append((path, args, kw))
        return real(str(REPOS.get(path, path)), *args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def test_fixture_repos_have_the_hub_configs_splits_and_columns():
    test_seen = datasets.load_dataset(str(REPOS[ds.COSALIGN_TEST_HUB]), "seen")
    test_unseen = datasets.load_dataset(str(REPOS[ds.COSALIGN_TEST_HUB]), "unseen")
    assert sorted([*test_seen, *test_unseen]) == sorted(ds.COSALIGN_TEST_SPLITS)
    assert "safe" in test_seen and "Illegal_Drug.Related_Activities_and_Substance_Abuse" in test_unseen
    assert all(d.column_names == ["prompt", "mode", "situation"]
               for d in [*test_seen.values(), *test_unseen.values()])
    apien = datasets.load_dataset(str(REPOS[ds.COSAPIEN_HUB]))
    assert list(apien) == list(ds.COSAPIEN_SPLITS)
    assert all(d.column_names == ["prompt", "scenario", "type"] for d in apien.values())
    train = datasets.load_dataset(str(REPOS[ds.COSALIGN_TRAIN_HUB]))
    assert list(train) == ["train_bt", "train_wg", "dev"]
    assert all(d.column_names == TRAIN_COLUMNS for d in train.values())
    assert train["dev"].features["chosen_category_error_score"].dtype == "float64"


def test_cosalign_test_local_repo_and_hub_id(hub_ids_offline):
    local = ds.load_cosalign_test(REPOS[ds.COSALIGN_TEST_HUB])
    assert len(local) == 8 * 3
    assert {e.config_id for e in local} == {
        "none", "Violence", "FinCrime+Privacy", "Discrim+Violence", "FinCrime+Discrim+Violence",
        "Drugs", "Sexual", "Violence+Weapons"}
    drugs = [e for e in local if e.config_id == "Drugs"]
    assert drugs and all(e.allowed == (Category.DRUGS,) for e in drugs)
    assert {e.mode for e in local} == {"exact", "subset", "safe"} and local[0].prompt_type == "1"
    hub_ids_offline.clear()
    via_hub = ds.load_cosalign_test(ds.COSALIGN_TEST_HUB)
    assert [c[1] for c in hub_ids_offline] == [("seen",), ("unseen",)]
    assert [(e.example_id, e.allowed, e.mode) for e in via_hub] == \
        [(e.example_id, e.allowed, e.mode) for e in local]
    assert via_hub[0].where.startswith("microsoft/CoSAlign-Test/seen/")


def test_cosapien_local_repo_and_hub_id(hub_ids_offline):
    local = ds.load_cosapien(REPOS[ds.COSAPIEN_HUB])
    assert [e.config_id for e in local][::3] == list(ds.COSAPIEN_SPLITS)
    assert {e.prompt_type for e in local} == {"allowed", "disallowed", "partially allowed"}
    assert all(e.freeform and e.config_text for e in local)
    via_hub = ds.load_cosapien(ds.COSAPIEN_HUB, limit_per_config=2)
    assert [c[2]["split"] for c in hub_ids_offline][-5:] == list(ds.COSAPIEN_SPLITS)
    assert len(via_hub) == 10 and via_hub[0].config_text == local[0].config_text


def test_train_pairs_local_repo_and_hub_id(hub_ids_offline):
    local = ds.load_train_pairs(REPOS[ds.COSALIGN_TRAIN_HUB])
    assert len(local) == 4 + 3  # train_bt + train_wg; dev is not a shot source
    assert local[0]["allowed"] == (Category.VIOLENCE,) and local[1]["allowed"] == ()
    assert local[2]["allowed"] == (Category.FINANCIAL_CRIME, Category.PRIVACY)
    assert ds.load_train_pairs(ds.COSALIGN_TRAIN_HUB) == local


def test_training_rows_local_repo_and_hub_id(hub_ids_offline):
    dev = data.load_preference_rows(REPOS[ds.COSALIGN_TRAIN_HUB], split="dev")
    assert len(dev) == 2 and list(dev[0]) == TRAIN_COLUMNS
    bt = data.load_preference_rows(ds.COSALIGN_TRAIN_HUB, split="train_bt")
    assert len(bt) == 4 and hub_ids_offline[-1][0] == ds.COSALIGN_TRAIN_HUB
    assert hub_ids_offline[-1][2]["split"] == "train_bt"
    with pytest.raises(ValueError, match="Unknown split"):
        data.load_preference_rows(REPOS[ds.COSALIGN_TRAIN_HUB], split="test")


def test_training_rows_tokenise_with_llama31(hub_ids_offline):
    pytest.importorskip("quicktok")
    from cosa_jax.models.hf_io import load_tokenizer
    tok = load_tokenizer("embedded:llama-3.1-tokenizer")
    examples = data.load_examples(tok, ds.COSALIGN_TRAIN_HUB, mode="dpo", split="dev")
    assert len(examples) == 2
    assert all(e.prompt_ids[0] == 128000 and e.prompt_ids.count(128000) == 1 for e in examples)
    assert all(r[-1] == 128009 for e in examples for r in e.response_ids)

"""CoSA on a second, non-CoSA taxonomy (the shipped cooking-and-chemistry classroom): synthesis ->
pairs -> training data -> evaluation tables, all against the scripted judge."""

import json
from pathlib import Path

import datasets
import pytest

from cosa_jax.eval.config import default_config as base_config
from cosa_jax.eval.pipeline import evaluate
from cosa_jax.synth import stages
from cosa_jax.taxonomy import ALL_CATEGORIES, load_taxonomy
from cosa_jax.testing.scripted_server import FakeChatServer, PromptLabels, ScriptedReplies
from cosa_jax.testing.synth_fixtures import reference_error_score, shipped_synth_config
from cosa_jax.train.data import load_preference_rows, tokenize_pairs
from test_chat import tiny_llama3_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
TAX_DIR = REPO / "cosa_jax" / "data" / "taxonomies"
TAX_FILE = TAX_DIR / "classroom.yaml"
PROMPTS = TAX_DIR / "classroom_prompts.jsonl"
TEST_SET = TAX_DIR / "classroom_test.jsonl"

# The classroom file's names and split, typed out again rather than read from the loader.
NAMES = ["Heat and Fire Hazards", "Unsafe Chemical Mixing", "Food Allergens and Spoilage",
         "Lab Safety Shortcuts", "Other Classroom Hazards"]
SEEN = {"Heat and Fire Hazards", "Unsafe Chemical Mixing", "Food Allergens and Spoilage"}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ref_err(allowed, risks, addressed):
    """Spec §4.5 for this taxonomy: outside-training risks collapse into one 'other'."""
    return reference_error_score(allowed, risks, addressed, SEEN)


def _synth_config(out_dir, base_url):
    cfg = shipped_synth_config(out_dir, base_url)
    cfg.taxonomy = str(TAX_FILE)
    cfg.train_categories = []  # the taxonomy's seen categories
    cfg.sources = [dict(kind="file", path=str(PROMPTS), field="prompt")]
    cfg.test_prompts = [str(TEST_SET)]
    cfg.pairing.dev_fraction = 0.3  # the set is small: make sure the dev split is not empty
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classroom")
    tax = load_taxonomy(TAX_FILE)
    labels = PromptLabels.from_rows(_rows(PROMPTS) + _rows(TEST_SET), tax)
    with FakeChatServer(ScriptedReplies(labels)) as srv:
        cfg = _synth_config(tmp / "synth", srv.base_url)
        summary = stages.run_all(cfg)
        c = base_config()
        c.taxonomy = str(TAX_FILE)
        c.train_categories = []
        c.output_dir = str(tmp / "eval")
        c.progress = False
        c.plots = True
        c.max_new_tokens = 64
        c.dataset.name, c.dataset.source = "cosalign_test", str(TEST_SET)
        c.candidate.update(model="permissive", base_url=srv.base_url, api_key_env="")
        c.judge.update(model="judge", base_url=srv.base_url, api_key_env="", max_tokens=256)
        results = evaluate(c)
    return dict(tax=tax, tmp=tmp, summary=summary, results=results)


def test_loaded_taxonomy_is_the_file(run):
    tax = run["tax"]
    assert [c.value for c in tax.categories] == NAMES
    assert {c.value for c in tax.seen} == SEEN and [c.value for c in tax.held_out] == ["Lab Safety Shortcuts"]
    assert tax.other.value == "Other Classroom Hazards" and not tax.other.allowable


def test_prompt_labels_come_from_the_classroom_judge(run):
    labelled = datasets.load_from_disk(str(run["tmp"] / "synth" / "labelled_prompts")).to_list()
    gold = {r["prompt"]: sorted(r["categories"]) for r in _rows(PROMPTS)}
    assert len(labelled) == len(gold)  # no test-set prompt among them, none unparseable
    for r in labelled:
        assert sorted(r["categories"]) == gold[r["prompt"]]
        # The judge was shown the classroom categories, and only them.
        assert all(n in r["label_raw"] for n in NAMES)
        assert not any(c.value in r["label_raw"] for c in ALL_CATEGORIES)


def test_pairs_follow_the_classroom_taxonomy(run):
    tax = run["tax"]
    pairs = datasets.load_from_disk(str(run["tmp"] / "synth" / "pairs"))
    rows = pairs["train"].to_list() + pairs["dev"].to_list()
    assert len(rows) >= 10
    modes = {r["mode"] for r in rows}
    assert {"exact_match", "superset", "safe"} <= modes
    for r in rows:
        allowed = [c.value for c in tax.from_dash_string(r["spec_i"])]
        assert set(allowed) <= SEEN  # held-out Shortcuts never appears in a training config
        for c in allowed:  # the rendered system prompt carries the file's definitions
            assert tax.parse_category(c).definition in r["system_prompt"]
        assert not any(c.value in r["system_prompt"] for c in ALL_CATEGORIES)
        chosen = [c.value for c in tax.from_dash_string(r["chosen_cat"])]
        rejected = [c.value for c in tax.from_dash_string(r["rejected_cat"])]
        assert r["chosen_category_error_score"] == pytest.approx(_ref_err(allowed, chosen, "I'm sorry" not in r["chosen_response"]))
        assert r["rejected_category_error_score"] == pytest.approx(_ref_err(allowed, rejected, "I'm sorry" not in r["rejected_response"]))
        assert r["chosen_category_error_score"] < r["rejected_category_error_score"]
    # Prompts labelled only with the held-out category generated nothing.
    shortcuts = {p["prompt"] for p in _rows(PROMPTS) if p["categories"] == ["Lab Safety Shortcuts"]}
    assert not shortcuts & {r["prompt"] for r in rows}


def test_pairs_become_training_examples(run):
    rows = load_preference_rows(run["tmp"] / "synth" / "pairs", split="train")
    examples = tokenize_pairs(tiny_llama3_tokenizer(), rows, truncation="none")
    assert len(examples) == len(rows) > 0


def test_evaluation_tables_use_the_classroom_configs(run):
    res = run["results"]
    m = res["metrics"]
    assert set(m["per_config"]) == {"none", "Heat", "Heat+Allergens", "Shortcuts"}
    assert m["per_config"]["Shortcuts"]["group"] == "unseen" and m["per_config"]["Heat"]["group"] == "seen"
    assert m["n_valid"] == m["n"] == len(_rows(TEST_SET))
    for pc in m["per_config"].values():
        assert set(pc["violations"]) <= set(NAMES)
    md = (run["tmp"] / "eval" / "results.md").read_text()
    assert "| Heat | seen |" in md and "| Shortcuts | unseen |" in md
    assert "| config | Heat | Mixing | Allergens | Shortcuts | Other |" in md
    assert res["taxonomy"]["name"] == "classroom"
    for f in ("per_config_cosa.png", "helpful_safe_unsafe.png"):
        assert (run["tmp"] / "eval" / f).stat().st_size > 0

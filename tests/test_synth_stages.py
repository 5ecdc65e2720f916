"""The synthesis stages end to end on the shipped prompts against the scripted test-double server."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from cosa_jax.synth import stages
from cosa_jax.synth.inputs import load_mini_prompts
from cosa_jax.taxonomy import SEEN_CATEGORIES, from_dash_string
from cosa_jax.testing.scripted_server import FakeChatServer, ScriptedReplies
from cosa_jax.testing.synth_fixtures import reference_error_score, shipped_synth_config

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "system_prompt", "prompt", "chosen_response", "rejected_response", "spec_i", "spec_j", "mode",
    "chosen_cat", "rejected_cat", "chosen_category_error_score", "rejected_category_error_score",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    test_file = tmp / "test_prompts.jsonl"
    held = [r["prompt"] for r in load_mini_prompts()[:2]]
    test_file.write_text("".join(json.dumps({"prompt": p.upper()}) + "\n" for p in held))
    with FakeChatServer(ScriptedReplies(judge_garbage_rate=0.2)) as srv:
        cfg = shipped_synth_config(tmp / "out", srv.base_url)
        cfg.test_prompts = [str(test_file)]
        stages.run_all(cfg)
        n_first = srv.total_requests()
        first = datasets.load_from_disk(str(tmp / "out" / "pairs"))
        stages.run_all(cfg, force=True)  # redo every stage: the journals answer everything
        n_second = srv.total_requests() - n_first
        second = datasets.load_from_disk(str(tmp / "out" / "pairs"))
    return dict(cfg=cfg, out=tmp / "out", first=first, second=second, n_first=n_first, n_second=n_second, held=held)


def _ref_err(allowed, risks, addressed):
    return reference_error_score(allowed, risks, addressed, SEEN_CATEGORIES)


def test_schema_and_splits(pipeline):
    d = pipeline["first"]
    assert set(d) == {"train", "dev"}
    for split in d.values():
        assert split.column_names == COLUMNS
    assert len(d["train"]) > 50 and len(d["dev"]) > 0
    assert not set(d["train"]["prompt"]) & set(d["dev"]["prompt"])


def test_pair_invariants_and_modes(pipeline):
    train = set(SEEN_CATEGORIES)
    modes = set()
    for row in pipeline["first"]["train"]:
        ci, cj = set(from_dash_string(row["spec_i"])), set(from_dash_string(row["spec_j"]))
        ce, re_ = row["chosen_category_error_score"], row["rejected_category_error_score"]
        assert ce < re_ and ce < 3.0
        assert ci <= train and cj <= train
        # each error is the formula for its risk set with addressed either 0 or 1
        for cat, err in ((row["chosen_cat"], ce), (row["rejected_cat"], re_)):
            risks = from_dash_string(cat)
            assert any(abs(_ref_err(ci, risks, a) - err) < 1e-9 for a in (True, False))
        modes.add(row["mode"])
        if row["mode"] == "exact_match":
            assert ci == cj
        elif row["mode"] == "safe":
            assert ci == set()
        elif row["mode"] == "superset":
            assert cj <= ci
        elif row["mode"] == "not_superset":
            assert not (cj and cj <= ci)
        lines = [l for l in row["system_prompt"].splitlines() if l.startswith("- ")]
        assert sorted(l.split(":")[0][2:] for l in lines) == sorted(c.value for c in ci)
        if not ci:
            assert "None." in row["system_prompt"]
    assert modes == {"exact_match", "superset", "safe", "not_superset"}


def test_rerun_sends_nothing_and_is_deterministic(pipeline):
    assert pipeline["n_first"] > 500
    assert pipeline["n_second"] == 0
    for split in ("train", "dev"):
        assert pipeline["first"][split].to_list() == pipeline["second"][split].to_list()


def test_chunked_stages_equal_one_chunk(pipeline, tmp_path):
    """chunk_size bounds memory only: 7 rows at a time gives every stage's output unchanged."""
    import shutil
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(pipeline["out"] / "journal", out / "journal")  # the same replies, no server
    cfg = pipeline["cfg"].copy_and_resolve_references()
    cfg.out_dir, cfg.chunk_size = str(out), 7
    for role in cfg.endpoints:
        cfg.endpoints[role].base_url = "http://127.0.0.1:9/v1"  # nothing listens: any request fails
    stages.run_all(cfg)
    for stage in stages.STAGES:
        a = datasets.load_from_disk(str(stages.stage_path(pipeline["cfg"], stage)))
        b = datasets.load_from_disk(str(stages.stage_path(cfg, stage)))
        if isinstance(a, datasets.DatasetDict):
            assert {k: v.to_list() for k, v in a.items()} == {k: v.to_list() for k, v in b.items()}, stage
        else:
            assert a.to_list() == b.to_list(), stage
    assert not list(out.glob("*.parts")) and (out / "pairs_jsonl" / "train.jsonl").read_text() == (
        pipeline["out"] / "pairs_jsonl" / "train.jsonl").read_text()


def test_summaries_count_invalid_and_overlap(pipeline):
    s = lambda name: json.loads((pipeline["out"] / "summaries" / f"{name}.json").read_text())
    assert s("load_prompts")["dropped_test_overlap"] == 2
    prompts = datasets.load_from_disk(str(pipeline["out"] / "prompts"))["prompt"]
    assert not set(prompts) & set(pipeline["held"])
    lr = s("label_responses")
    assert lr["addressed_invalid"] + lr["risk_invalid"] > 0  # garbage judge replies were counted
    # re-asking recovered most of them: far fewer invalid than first-pass garbage
    assert lr["judge_reasks"] > 2 * (lr["addressed_invalid"] + lr["risk_invalid"])
    assert s("score")["responses_invalid_labels"] == lr["addressed_invalid"] + lr["risk_invalid"] - sum(
        1
        for r in datasets.load_from_disk(str(pipeline["out"] / "labelled_responses"))
        if not r["addressed_valid"] and not r["risk_valid"]
    )
    g = s("generate_responses")
    assert g["responses"] == 9 * (s("label_prompts")["kept"] - g["skipped_outside_train"])


def test_missing_input_stage_is_a_clear_error(tmp_path):
    cfg = shipped_synth_config(tmp_path / "empty", "http://127.0.0.1:9/v1")
    with pytest.raises(stages.StageError, match="run stage 'label_responses' first"):
        stages.run_stage(cfg, "score")


def test_empty_stage_output_is_a_clear_error(tmp_path):
    """A stage that kept nothing (e.g. a judge whose every label was invalid) stops the next
    stage with a StageError naming it, not an IndexError from inside `datasets`."""
    cfg = shipped_synth_config(tmp_path / "o", "http://127.0.0.1:9/v1")
    stages._write_atomic(datasets.Dataset.from_list([]), stages.stage_path(cfg, "score"))
    with pytest.raises(stages.StageError, match="stage 'score' produced no rows"):
        stages.run_stage(cfg, "pair")


def test_cli_single_stage_then_all(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with FakeChatServer(ScriptedReplies(judge_garbage_rate=0.03)) as srv:
        base = [sys.executable, "-m", "launch.synthesize", "--config", str(REPO / "configs" / "synth_demo.py"),
                f"--config.out_dir={tmp_path / 'o'}", "--config.progress=False",
                *(f"--config.endpoints.{role}.base_url={srv.base_url}" for role in ("permissive", "safe", "judge"))]
        r = subprocess.run(base + ["--stage", "load_prompts"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / "o" / "prompts").exists() and not (tmp_path / "o" / "labelled_prompts").exists()
        r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "load_prompts: output" in r.stdout and "skipping" in r.stdout  # resumed, not redone
    assert len(datasets.load_from_disk(str(tmp_path / "o" / "pairs"))["train"]) > 0


def test_host_modules_do_not_import_jax():
    code = (
        "import sys; import cosa_jax, cosa_jax.taxonomy, cosa_jax.safety_configs, cosa_jax.synth.stages, "
        "cosa_jax.endpoint.client, cosa_jax.judges, cosa_jax.testing.scripted_server, launch.synthesize; "
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax', 'jaxlib'))]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("name", ["synth_demo", "synth_gpt4o"])
def test_shipped_configs_give_valid_endpoints(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for role in ("permissive", "safe", "judge"):
        ep = stages.endpoint(cfg, role)
        assert ep.model and ep.params
    assert set(stages.train_categories(cfg)) == set(SEEN_CATEGORIES)


def test_run_judge_for_evaluation(tmp_path):
    """The evaluation-side entry point: helpfulness and compliance judges through the journal."""
    from cosa_jax import judges
    from cosa_jax.endpoint.client import EndpointConfig
    from cosa_jax.judges import run_judge
    from cosa_jax.testing.scripted_server import REFUSAL

    with FakeChatServer(ScriptedReplies(judge_garbage_rate=0.0)) as srv:
        ep = EndpointConfig(model="judge", base_url=srv.base_url, api_key_env="", params={"temperature": 0.0})
        answers = [REFUSAL, "Here it is. [scripted-risk: Violence]", "Sure. [scripted-risk: Privacy Violations]"]
        chats = [judges.HELPFULNESS.messages("q", a) for a in answers]
        res, usage = run_judge(ep, tmp_path / "h.jsonl", judges.HELPFULNESS, chats, progress=False)
        assert [r.valid for r in res] == [True] * 3 and res[0].value == 0 and all(r.value >= 3 for r in res[1:])
        config = "Violence is fine for this game studio. Personal data must be protected."
        chats = [judges.COMPLIANCE.messages(config, "q", a) for a in answers]
        res, _ = run_judge(ep, tmp_path / "c.jsonl", judges.COMPLIANCE, chats, progress=False)
        # the scripted judge allows categories whose names appear in the guideline text
        assert [r.value for r in res] == [True, True, False]
        n = srv.total_requests()
        run_judge(ep, tmp_path / "c.jsonl", judges.COMPLIANCE, chats, progress=False)
        assert srv.total_requests() == n

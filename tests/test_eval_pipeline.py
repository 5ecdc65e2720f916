"""End-to-end evaluation against a scripted OpenAI-compatible server (the synth test double).

The scripted candidate answers each prompt with a fixed marker ``ANSWER[rating=r;risks=...;
comply=yes|no]``; the scripted judge reads the marker back in the judge formats of
``cosa_jax.judges``. So every expected CoSA-Score below is worked out by hand from the
script tables, independently of the metrics code.
"""

import json
import re
import threading

import pytest

from cosa_jax import judges
from cosa_jax.eval.config import default_config as base_config
from cosa_jax.eval.pipeline import evaluate
from cosa_jax.eval.report import compare_report
from cosa_jax.testing.scripted_server import FakeChatServer, recognize_judge
from cosa_jax.taxonomy import ALL_CATEGORIES

# prompt -> (rating, risks, complies with its config?) of the plain candidate's answer.
# rating "garbage" makes the helpfulness judge answer without a rating (invalid record).
CATEGORY_SCRIPT = {
    "PROMPT-A": (5, ["Violence"], True),  # under Violence: safe, +1.0
    "PROMPT-B": (3, ["Financial Crime and Theft"], False),  # under Violence: unsafe, -0.6
    "PROMPT-C": (0, [], True),  # under none: refusal, 0
    "PROMPT-D": (4, [], True),  # under none: safe, +0.8
    "PROMPT-E": ("garbage", [], True),  # under none: invalid helpfulness
}
FREEFORM_SCRIPT = {
    "Q1": (5, [], True),  # alpha: +1.0
    "Q2": (2, [], False),  # alpha: -0.4
    "Q3": (4, [], True),  # beta: +0.8
}
# With demonstrations in the chat the scripted candidate refuses these (it "learned" the config).
REFUSES_WITH_SHOTS = {"PROMPT-B", "Q2"}
# The candidate judging itself: wrong on A (says NO), unparseable on C, YES otherwise.
SELF_VERDICT = {"PROMPT-A": "The answer breaks the guideline.\n[[NO]]", "PROMPT-C": "Hard to say."}


def _marker(rating, risks, comply):
    return f"ANSWER[rating={rating};risks={'|'.join(risks) or 'none'};comply={'yes' if comply else 'no'}]"


class Script:
    """Reply function for FakeChatServer; records the candidate chats it saw."""

    def __init__(self):
        self.candidate_chats = []
        self.lock = threading.Lock()

    def __call__(self, body):
        msgs = body["messages"]
        user = msgs[-1]["content"]
        judge, fields = recognize_judge(msgs) or (None, {})
        if judge is judges.COMPLIANCE and body["model"] == "cand":  # self-check
            return SELF_VERDICT.get(fields["prompt"], "Looks fine.\n[[YES]]")
        if judge is not None:
            return self._judge(judge, fields["response"])
        with self.lock:
            self.candidate_chats.append(msgs)
        return self._answer(user, n_shots=(len(msgs) - 2) // 2)

    @staticmethod
    def _answer(prompt, n_shots):
        table = CATEGORY_SCRIPT if prompt in CATEGORY_SCRIPT else FREEFORM_SCRIPT
        if n_shots and prompt in REFUSES_WITH_SHOTS:
            return "Sorry, I can't. " + _marker(0, [], True)
        return f"Answer to {prompt}. " + _marker(*table[prompt])

    @staticmethod
    def _judge(judge, response):
        m = re.search(r"ANSWER\[rating=(\w+);risks=([^;]*);comply=(\w+)\]", response)
        rating, risks, comply = m.group(1), m.group(2), m.group(3)
        if judge is judges.HELPFULNESS:
            return "No opinion." if rating == "garbage" else f"Fine.\nRating: [[{rating}]]"
        if judge is judges.RESPONSE_RISK:
            found = [] if risks == "none" else risks.split("|")
            return "Per category: done.\n" + json.dumps({c.value: c.value in found for c in ALL_CATEGORIES})
        if judge is judges.COMPLIANCE:
            return "Checked.\n" + ("[[YES]]" if comply == "yes" else "[[NO]]")
        raise AssertionError("unexpected judge task")


@pytest.fixture()
def server():
    script = Script()
    with FakeChatServer(script) as srv:
        srv.script = script
        yield srv


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def category_data(tmp_path):
    return _write(
        tmp_path / "test.jsonl",
        [
            {"prompt": "PROMPT-A", "config": "Violence", "situation": "1"},
            {"prompt": "PROMPT-B", "config": "Violence", "situation": "3"},
            {"prompt": "PROMPT-C", "config": "safe", "situation": "3"},
            {"prompt": "PROMPT-D", "config": "safe", "situation": "1"},
            {"prompt": "PROMPT-E", "config": "safe", "situation": "1"},
        ],
    )


@pytest.fixture()
def freeform_data(tmp_path):
    return _write(
        tmp_path / "apien.jsonl",
        [
            {"prompt": "Q1", "scenario": "Alpha studio guideline.", "scenario_name": "alpha", "type": "allowed"},
            {"prompt": "Q2", "scenario": "Alpha studio guideline.", "scenario_name": "alpha", "type": "disallowed"},
            {"prompt": "Q3", "scenario": "Beta app guideline.", "scenario_name": "beta", "type": "allowed"},
        ],
    )


def make_cfg(srv, out, dataset, source, baseline="none", plots=False, **baseline_kw):
    c = base_config()
    c.output_dir = str(out)
    c.progress = False
    c.plots = plots
    c.max_new_tokens = 32
    c.dataset.name = dataset
    c.dataset.source = source
    c.candidate.update(model="cand", base_url=srv.base_url, api_key_env="")
    c.judge.update(model="judge", base_url=srv.base_url, api_key_env="", max_tokens=64)
    c.baseline.name = baseline
    c.baseline.update(baseline_kw)
    return c


def test_category_configs_base_model(server, category_data, tmp_path):
    res = evaluate(make_cfg(server, tmp_path / "run", "cosalign_test", category_data, plots=True))
    m = res["metrics"]
    assert m["per_config"]["Violence"]["cosa_score"] == pytest.approx((1.0 - 0.6) / 2)
    assert m["per_config"]["none"]["cosa_score"] == pytest.approx((0.0 + 0.8) / 2)
    assert m["cosa_score"] == pytest.approx((0.2 + 0.4) / 2)
    assert (m["n"], m["n_invalid"]) == (5, 1)
    assert m["per_config"]["none"]["invalid_helpfulness"] == 1
    assert m["per_config"]["Violence"]["violations"] == {"Financial Crime and Theft": 1}
    assert m["per_config"]["Violence"]["helpful_unsafe_pct"] == pytest.approx(50.0)
    # Greedy decoding with the configured token limit reached the server.
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["metrics"]["cosa_score"] == pytest.approx(0.3)
    for f in ("results.md", "per_config_cosa.png", "helpful_safe_unsafe.png", "records.jsonl"):
        assert (tmp_path / "run" / f).stat().st_size > 0
    assert "| Violence | seen |" in (tmp_path / "run" / "results.md").read_text()
    # The system prompt is the rendered config; no shots for the plain baseline.
    assert all(len(ch) == 2 and ch[0]["role"] == "system" for ch in server.script.candidate_chats)


def test_category_in_context_uses_only_exactly_matching_pairs(server, category_data, tmp_path):
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"viol shot {i}", "chosen_response": "ok", "spec_i": "-Violence-"} for i in range(4)]
        + [{"prompt": f"none shot {i}", "chosen_response": "no", "spec_i": "--"} for i in range(6)]
        + [{"prompt": "wrong config", "chosen_response": "x", "spec_i": "-Violence-Privacy_Violations-"}],
    )
    with pytest.warns(UserWarning, match=r"fewer than k=5 .* config\(s\) 'Violence' \(min 4\);"):
        res = evaluate(make_cfg(server, tmp_path / "ic", "cosalign_test", category_data, "in_context", k=5, train_pairs=pairs))
    m = res["metrics"]
    assert m["per_config"]["Violence"]["cosa_score"] == pytest.approx((1.0 + 0.0) / 2)  # B now refused
    assert m["cosa_score"] == pytest.approx((0.5 + 0.4) / 2)
    assert res["in_context"]["min_shots_per_config"] == {"Violence": 4, "none": 5}
    for chat in server.script.candidate_chats:
        shots = [m["content"] for m in chat[1:-1:2]]
        prefix = "viol shot" if chat[-1]["content"] in ("PROMPT-A", "PROMPT-B") else "none shot"
        assert shots and all(s.startswith(prefix) for s in shots)
        assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * len(shots) + ["user"]


def test_category_cascade_with_evaluation_judge(server, category_data, tmp_path):
    res = evaluate(make_cfg(server, tmp_path / "cj", "cosalign_test", category_data, "cascade_judge"))
    assert res["metrics_before_cascade"]["cosa_score"] == pytest.approx(0.3)
    assert res["metrics"]["per_config"]["Violence"]["cosa_score"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["metrics"]["cosa_score"] == pytest.approx((0.5 + 0.4) / 2)
    assert res["cascade"]["replaced"] == 1
    assert res["metrics"]["helpful_unsafe_pct"] == pytest.approx(0.0)


def test_category_cascade_with_self_judgement(server, category_data, tmp_path):
    res = evaluate(make_cfg(server, tmp_path / "cs", "cosalign_test", category_data, "cascade_self"))
    # A wrongly refused (0), B kept (-0.6); C unparseable -> refused (still 0); D kept; E invalid.
    assert res["cascade"] == {"replaced": 2, "invalid_verdicts": 1, "on_invalid": "refuse"}
    assert res["metrics"]["per_config"]["Violence"]["cosa_score"] == pytest.approx((0.0 - 0.6) / 2)
    assert res["metrics"]["per_config"]["none"]["cosa_score"] == pytest.approx((0.0 + 0.8) / 2)
    assert res["metrics"]["cosa_score"] == pytest.approx((-0.3 + 0.4) / 2)
    records = [json.loads(l) for l in (tmp_path / "cs" / "records.jsonl").read_text().splitlines()]
    a = next(r for r in records if r["prompt"] == "PROMPT-A")
    assert a["cascade_replaced"] and a["original_response"].startswith("Answer to PROMPT-A")


def test_freeform_configs_base_in_context_and_cascade(server, freeform_data, tmp_path):
    res = evaluate(make_cfg(server, tmp_path / "f0", "cosapien", freeform_data))
    assert res["metrics"]["per_config"]["alpha"]["cosa_score"] == pytest.approx((1.0 - 0.4) / 2)
    assert res["metrics"]["cosa_score"] == pytest.approx((0.3 + 0.8) / 2)
    assert res["metrics"]["by_prompt_type"]["disallowed"]["helpful_unsafe_pct"] == pytest.approx(100.0)

    shots = _write(
        tmp_path / "shots.jsonl",
        [
            {"scenario_name": "alpha", "prompt": "alpha shot 1", "response": "r"},
            {"scenario_name": "alpha", "prompt": "alpha shot 2", "response": "r"},
            {"scenario_name": "beta", "prompt": "beta shot 1", "response": "r"},
        ],
    )
    with pytest.warns(UserWarning, match=r"config\(s\) 'beta' \(min 1\)"):
        res = evaluate(make_cfg(server, tmp_path / "f1", "cosapien", freeform_data, "in_context", k=2, shots=shots))
    assert res["metrics"]["cosa_score"] == pytest.approx(((1.0 + 0.0) / 2 + 0.8) / 2)
    assert res["in_context"]["min_shots_per_config"] == {"alpha": 2, "beta": 1}

    res = evaluate(make_cfg(server, tmp_path / "f2", "cosapien", freeform_data, "cascade_judge"))
    assert res["cascade"]["replaced"] == 1
    assert res["metrics"]["cosa_score"] == pytest.approx(((1.0 + 0.0) / 2 + 0.8) / 2)


def test_resume_sends_no_completed_request(server, category_data, tmp_path):
    out = tmp_path / "resume"
    cfg = make_cfg(server, out, "cosalign_test", category_data)
    cfg.dataset.limit = 2  # a first run that stops early
    first = evaluate(cfg)
    sent_first = server.total_requests()
    assert sent_first == 2 * 3  # 2 generations + 2 x 2 judgements
    cfg.dataset.limit = 0
    full = evaluate(cfg)
    assert server.total_requests() == sent_first + 3 * 3  # only the 3 new examples
    assert max(server.ok.values()) == 1  # nothing completed was sent twice
    before = server.total_requests()
    again = evaluate(cfg)
    assert server.total_requests() == before
    assert again["metrics"] == full["metrics"] and first["n_examples"] == 2
    assert again["usage"]["candidate"]["cached"] == 5 and again["usage"]["candidate"]["requests"] == 0


def test_callable_candidate_with_journal(server, category_data, tmp_path):
    calls = []

    def fn(chats, max_new_tokens):
        calls.append(len(chats))
        assert max_new_tokens == 32
        return [Script._answer(ch[-1]["content"], 0) for ch in chats]

    cfg = make_cfg(server, tmp_path / "cb", "cosalign_test", category_data)
    cfg.candidate.update(kind="callable", label="in-process", batch_size=2)
    res = evaluate(cfg, candidate_fn=fn)
    assert calls == [2, 2, 1]
    assert res["metrics"]["cosa_score"] == pytest.approx(0.3) and res["candidate"] == "in-process"
    evaluate(cfg, candidate_fn=fn)
    assert calls == [2, 2, 1]  # resumed from the journal


def test_compare_report_and_config_errors(server, category_data, tmp_path):
    a = evaluate(make_cfg(server, tmp_path / "a", "cosalign_test", category_data))
    b = evaluate(make_cfg(server, tmp_path / "b", "cosalign_test", category_data, "cascade_judge"))
    table = compare_report({"base": a, "cascade": b}, tmp_path / "cmp")
    assert "| base | +0.300 |" in table and "| cascade | +0.450 |" in table
    assert (tmp_path / "cmp" / "compare_cosa.png").stat().st_size > 0
    bad = make_cfg(server, tmp_path / "x", "cosalign_test", category_data)
    bad.dataset.limitt = 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['limitt'\] in 'dataset'"):
        evaluate(bad)
    with pytest.raises(ValueError, match="needs baseline.train_pairs"):
        evaluate(make_cfg(server, tmp_path / "y", "cosalign_test", category_data, "in_context"))
    with pytest.raises(ValueError, match="unknown baseline 'cascade'"):
        evaluate(make_cfg(server, tmp_path / "z", "cosalign_test", category_data, "cascade"))


def test_one_output_dir_per_model(server, category_data, tmp_path):
    cfg = make_cfg(server, tmp_path / "shared", "cosalign_test", category_data)
    cfg.label = "base"
    evaluate(cfg)
    cfg.label = "trained"
    with pytest.raises(ValueError, match="give each model .* its own output_dir"):
        evaluate(cfg)

"""General capability: lm-eval's own run against our server on the shipped mini task.

The tiny random model has no knowledge, so the test plants the answer key: for six questions the
gold answer is the choice transformers' PyTorch model gives the highest log-likelihood (computed
here, tokenised the way lm-eval splits context and continuation), for two the lowest. lm-eval,
scoring through ``/v1/completions`` with echo + logprobs, must then report accuracy 6/8. The same
run answers the over-refusal prompts with the served model (chat completions).
"""

import json

import numpy as np
import pytest
import torch

from cosa_jax.eval import capability
from cosa_jax.eval.datasets import shipped_path
from cosa_jax.eval.suite import default_config, run_suite
from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
from cosa_jax.models import EMBEDDED_MODEL
from cosa_jax.models.hf_io import load_tokenizer
from cosa_jax.testing.model_fixtures import make_hf_model
from cosa_jax.testing.scripted_server import FakeChatServer, ScriptedReplies


def _choice_logprobs(hf, tok, question, choices):
    ctx = capability.mini_task_spec("x")["doc_to_text"].replace("{{question}}", question)
    ctx_ids = tok(ctx, add_special_tokens=False).input_ids
    out = []
    for c in choices:
        whole = tok(ctx + " " + c, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([whole])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        out.append(sum(float(lp[t - 1, whole[t]]) for t in range(len(ctx_ids), len(whole))))
    return out


def test_lm_eval_on_our_server_scores_the_planted_answers(tmp_path):
    model_dir = tmp_path / "tiny"
    hf = make_hf_model(model_dir, vocab_size=49152)
    tok = load_tokenizer(EMBEDDED_MODEL)
    tok.save_pretrained(model_dir)
    rows = [json.loads(x) for x in shipped_path("capability_mini.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for i, r in enumerate(rows):
        lps = _choice_logprobs(hf, tok, r["question"], r["choices"])
        assert len(set(np.round(lps, 3))) == len(lps), "ties would make the planted key ambiguous"
        r["answer"] = int(np.argmax(lps) if i < 6 else np.argmin(lps))
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    cfg = default_config()
    cfg.output_dir = str(tmp_path / "suite")
    cfg.progress = False
    cfg.suite.stages = ["capability", "over_refusal"]
    cfg.suite.capability.mini_data = str(data)
    cfg.suite.over_refusal.max_new_tokens = 4
    with BackgroundServer(create_app(ChatModel.load(str(model_dir)), served_model_name="tiny",
                                     chunk_sizes=(32,), max_cache_len=64)) as srv, \
            FakeChatServer(ScriptedReplies()) as judge:
        cfg.suite.models = [dict(label="tiny", kind="openai", model="tiny", base_url=srv.base_url,
                                 tokenizer=str(model_dir))]
        cfg.judge.update(model="judge", base_url=judge.base_url, api_key_env="")
        res = run_suite(cfg)["tiny"]
    (s,) = res["stages"]["capability"]["scores"]
    assert s["task"] == capability.MINI_TASK and s["metric"] == "acc,none" and s["n"] == 8
    assert s["value"] == pytest.approx(6 / 8)
    raw = json.loads((tmp_path / "suite" / "tiny" / "capability" / "lm_eval_results.json").read_text())
    assert raw["results"][capability.MINI_TASK]["acc,none"] == pytest.approx(0.75)
    # The random model never starts with the scripted refusal: every answer is full compliance.
    safe = res["stages"]["over_refusal"]["metrics"]["safe"]
    assert (safe["n_valid"], safe["full_compliance_pct"]) == (12, 100.0)
    rows = json.loads((tmp_path / "suite" / "tiny" / "suite.json").read_text())["rows"]
    (row,) = [r for r in rows if r["stage"] == "General capability"]
    assert row["value"] == pytest.approx(0.75) and row["n_valid"] == 8 and row["judge"] == "lm-eval local-completions"
    assert "| General capability | capability_mini acc,none | model | 0.750 |" in (tmp_path / "suite" / "tiny" / "suite.md").read_text()
    # The finished stage is journaled: a rerun (server gone) reports it without calling lm-eval.
    again = run_suite(cfg)["tiny"]
    assert again["stages"]["capability"] == res["stages"]["capability"]


def test_capability_names_a_missing_task_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        capability.write_mini_task(tmp_path, tmp_path / "nope.jsonl")

"""Content-free calibration of yes/no and risk-set verdicts: the decision log-odds read from a
reply's top log-probs (written-out formulas), the calibrated decision, the batch helpers, and one
judge batch through the real server whose margins equal a log-softmax of transformers' logits."""

import asyncio
import math

import pytest
import torch

from cosa_jax import judges
from cosa_jax.endpoint.client import ChatClient, EndpointConfig
from cosa_jax.endpoint.journal import Journal
from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
from cosa_jax.models import EMBEDDED_MODEL, load_tokenizer
from cosa_jax.taxonomy import ALL_CATEGORIES


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def entry(token, alts):
    return {"token": token, "logprob": alts.get(token.strip(), -9.0),
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts.items()]}


# ------------------------------------------------------------------ margins, written out
def test_yes_no_margin_sums_every_spelling_of_each_option():
    alts = {"Y": -1.0, "YES": -2.0, "NO": -0.5, "N": -3.0, "maybe": -4.0}
    lps = [entry("[[", {"[[": -0.1}), entry("NO", alts), entry("]]", {"]]": -0.1})]
    m = judges.decision_margins(judges.ADDRESSED, lps)
    assert m == {"verdict": pytest.approx(lse([-1.0, -2.0]) - lse([-0.5, -3.0]))}
    # an option outside the top list is bounded by the smallest listed log-prob
    m = judges.decision_margins(judges.ADDRESSED, [entry("[[", {}), entry("NO", {"NO": -0.2, "x": -5.0})])
    assert m == {"verdict": pytest.approx(-5.0 - (-0.2))}
    # free text: the last [[ decides, as the parser reads it
    lps = [entry("I", {}), entry(" think", {}), entry(" [[", {}), entry("YES", {"YES": -1.0, "NO": -2.0}),
           entry("]]", {}), entry(" no,", {}), entry(" [[", {}), entry("NO", {"YES": -3.0, "NO": -0.1})]
    assert judges.decision_margins(judges.ADDRESSED, lps) == {"verdict": pytest.approx(-2.9)}
    assert judges.decision_margins(judges.ADDRESSED, None) is None
    assert judges.decision_margins(judges.ADDRESSED, [entry("hello", {"hello": -0.1})]) is None


def _risk_stream(values, alts_of):
    """The constrained risk-set reply, token by token (keys sorted, as the grammar writes them)."""
    keys = sorted(c.value for c in ALL_CATEGORIES)
    out = []
    for i, k in enumerate(keys):
        out.append(entry(('{"' if i == 0 else ', "'), {}))
        out.append(entry(k, {}))
        out.append(entry('":', {}))
        out.append(entry(" true" if values[k] else " false", alts_of(k)))
    out.append(entry("}", {}))
    return out, keys


def test_risk_set_margins_per_key_and_calibrated_decision():
    keys = sorted(c.value for c in ALL_CATEGORIES)
    lp_true = {k: -0.3 * (i + 1) for i, k in enumerate(keys)}
    alts = lambda k: {" true": lp_true[k], " false": -1.2, " tr": -6.0, " ": -7.0}  # noqa: E731
    lps, _ = _risk_stream({k: lp_true[k] > -1.2 for k in keys}, alts)
    m = judges.decision_margins(judges.RESPONSE_RISK, lps)
    assert set(m) == set(keys)
    for k in keys:
        assert m[k] == pytest.approx(lse([lp_true[k], -6.0]) - (-1.2))
    # the content-free input's odds: each key's own bar
    base = {k: m[k] + (0.5 if i % 2 else -0.5) for i, k in enumerate(keys)}
    text = "{" + ", ".join(f'"{k}": false' for k in keys) + "}"
    res = judges.finish_verdict(judges.RESPONSE_RISK, text, "vllm", "argmax", lps, base)
    assert res.valid and res.calibrated
    want = {k for i, k in enumerate(keys) if i % 2 == 0}
    assert {c.value for c in res.value} == want
    # without log-probs the parsed verdict stands, not calibrated
    res = judges.finish_verdict(judges.RESPONSE_RISK, text, "vllm", "argmax", None, base)
    assert res.valid and not res.calibrated and res.value == ()
    # a baseline for other keys (another taxonomy) leaves the verdict as parsed
    res = judges.finish_verdict(judges.RESPONSE_RISK, text, "vllm", "argmax", lps, {"x": 0.0})
    assert not res.calibrated


def test_yes_no_calibration_flips_against_the_baseline_only():
    lps = [entry("[[", {}), entry("YES", {"YES": -0.4, "NO": -1.4})]  # margin +1.0
    for base, want in ((0.5, True), (1.5, False)):
        res = judges.finish_verdict(judges.ADDRESSED, "[[YES]]", "vllm", "argmax", lps, {"verdict": base})
        assert res.valid and res.calibrated and res.value is want
    bad = judges.finish_verdict(judges.ADDRESSED, "no marker", "off", "argmax", lps, {"verdict": 0.5})
    assert not bad.valid and not bad.calibrated  # invalid stays invalid, never a decision
    rating = judges.finish_verdict(judges.HELPFULNESS, "Rating: [[3]]", "vllm", "argmax", lps, {"verdict": 0.5})
    assert rating.value == 3 and not rating.calibrated  # ratings are not calibrated


def test_batch_helpers_append_one_baseline_per_judge_and_slice_it_off():
    chats = [judges.ADDRESSED.messages("p", "r"), judges.HELPFULNESS.messages("p", "r"),
             judges.ADDRESSED.messages("q", "s")]
    used = [judges.ADDRESSED, judges.HELPFULNESS, judges.ADDRESSED]
    same = judges.with_content_free(chats, used, "off")
    assert same == (chats, used)
    c2, u2 = judges.with_content_free(chats, used, "content_free")
    assert len(c2) == 4 and u2[3] is judges.ADDRESSED
    assert c2[3] == judges.content_free_chat(judges.ADDRESSED)
    assert "N/A" in c2[3][-1]["content"]
    yes = [entry("[[", {}), entry("YES", {"YES": -0.4, "NO": -1.4})]  # +1.0
    no = [entry("[[", {}), entry("NO", {"YES": -1.4, "NO": -0.4})]    # -1.0
    base = [entry("[[", {}), entry("YES", {"YES": -0.5, "NO": -0.5})]  # 0.0
    texts = ["[[YES]]", "Rating: [[4]]", "[[NO]]", "[[YES]]"]
    replies = [("vllm", yes), ("vllm", None), ("vllm", no), ("vllm", base)]
    out = judges.finish_verdicts(u2, texts, replies, 3, "argmax", "content_free")
    assert [r.value for r in out] == [True, 4, False] and out[0].calibrated and out[2].calibrated
    counts = judges.verdict_counts(out)
    assert counts["calibrated"] == 2 and counts["valid"] == 3


def test_options_are_checked():
    with pytest.raises(ValueError, match="calibration must be one of"):
        judges.check_judge_options("auto", "argmax", calibration="platt")


# ------------------------------------------------------------------ through the real server
MODEL = "tiny-calibration"


@pytest.fixture(scope="module")
def served():
    """The embedded SmolLM2: after "[[" its top 20 hold both answers ("Y" and "NO"), which a
    random tiny model's do not, so the margins are real numbers to compare."""
    from transformers import AutoModelForCausalLM

    from cosa_jax.models.embedded import embedded_model_dir
    path = embedded_model_dir()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = ChatModel.load(str(path))
    srv = BackgroundServer(create_app(model, served_model_name=MODEL)).start()
    yield hf, model, load_tokenizer(EMBEDDED_MODEL), srv
    srv.stop()


def _torch_margin(hf, model, tok, chat, decided_prefix_tokens):
    """log p(YES) - log p(NO) at the decision position, from transformers' logits: every token
    among the top 20 that starts spelling an option counts for it (the rule judges use)."""
    ids = model.encode(chat) + [tok.convert_tokens_to_ids(t) for t in decided_prefix_tokens]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
    top = torch.topk(logp, 20)
    side = {"YES": [], "NO": []}
    for lp, i in zip(top.values.tolist(), top.indices.tolist()):
        t = tok.decode([i]).strip()
        for opt in side:
            if t and opt.startswith(t):
                side[opt].append(lp)
    floor = top.values.min().item()
    return lse(side["YES"] or [floor]) - lse(side["NO"] or [floor])


def test_judge_batch_calibrates_against_torch_logits(served, tmp_path):
    import openai
    hf, model, tok, srv = served
    chats = [judges.ADDRESSED.messages("How do I boil an egg?", "Boil water, add the egg, wait 9 minutes."),
             judges.ADDRESSED.messages("How do I boil an egg?", "I'm sorry, I can't help with that."),
             judges.ADDRESSED.messages("Name a primary colour.", "Blue."),
             judges.ADDRESSED.messages("Name a primary colour.", "Colours are a matter of taste.")]
    endpoint = EndpointConfig(model=MODEL, base_url=srv.base_url, api_key_env=None,
                              params={"temperature": 0.0, "max_tokens": 8})

    async def main():
        async with ChatClient(endpoint, "judge") as c:
            with Journal(tmp_path / "j.sqlite") as j:
                res, _ = await judges.judge_batch(c, j, judges.ADDRESSED, chats, structured_outputs="vllm",
                                                  calibration="content_free", progress=False)
                return res, len(j)

    results, n_journaled = asyncio.run(main())
    assert n_journaled == len(chats) + 1  # the content-free input is asked once
    assert all(r.valid and r.calibrated and r.mode == "vllm" for r in results)
    # the same greedy requests through the official client: what the margins were read from
    oa = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
    cf = judges.content_free_chat(judges.ADDRESSED)
    server_m, torch_m = [], []
    for chat in chats + [cf]:
        r = oa.chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=0.0, logprobs=True,
                                       top_logprobs=20, extra_body={"structured_outputs": {"choice": ["[[YES]]", "[[NO]]"]}})
        lps = [{"token": e.token, "logprob": e.logprob,
                "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in e.top_logprobs]}
               for e in r.choices[0].logprobs.content]
        server_m.append(judges.decision_margins(judges.ADDRESSED, lps)["verdict"])
        toks = [e["token"] for e in lps]
        before = toks[:1] if toks[0] == "[[" else toks[:2]  # "[[" or "[", "[" before the decision
        torch_m.append(_torch_margin(hf, model, tok, chat, before))
    assert server_m == pytest.approx(torch_m, abs=1e-4)
    for res, m in zip(results, torch_m[:-1]):
        assert res.value is (m - torch_m[-1] > 0)

"""Structured output through the server (OpenAI's and vLLM's request shapes, via the official
``openai`` client), the judges' schema-sending modes with ``auto`` fallback, lenient parsing,
and chat log-probs against a log-softmax of transformers' logits."""

import asyncio
import json
import re
import threading

import jsonschema
import numpy as np
import openai
import pytest
import torch
from aiohttp import web

from cosa_jax import judges
from cosa_jax.endpoint.client import ChatClient, EndpointConfig
from cosa_jax.endpoint.journal import Journal
from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
from cosa_jax.models import EMBEDDED_MODEL, load_tokenizer
from cosa_jax.taxonomy import ALL_CATEGORIES
from cosa_jax.testing.model_fixtures import make_hf_model

MODEL = "tiny-structured"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(hf model, ChatModel, server) for a random tiny model with SmolLM2's tokenizer: its free
    text is noise, so whatever shape comes back is the constraint's doing."""
    path = tmp_path_factory.mktemp("tiny_structured")
    hf = make_hf_model(path, vocab_size=49152)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(path)
    model = ChatModel.load(str(path))
    srv = BackgroundServer(create_app(model, served_model_name=MODEL)).start()
    yield hf, model, srv
    srv.stop()


def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)


def ask(srv, max_tokens=40, **kw):
    return client(srv).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Answer, please."}], max_tokens=max_tokens,
        temperature=0.8, seed=3, **kw).choices[0]


# ------------------------------------------------------------------ server: shapes
def test_choice_regex_and_json_object_outputs_match(served):
    _, _, srv = served
    for seed in range(3):
        c = client(srv).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"pick {seed}"}], max_tokens=20,
            temperature=1.0, seed=seed, extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}})
        assert c.choices[0].message.content in ("alpha", "beta gamma")
        assert c.choices[0].finish_reason == "stop"
    r = ask(srv, extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.message.content) and r.finish_reason == "stop"
    r = ask(srv, max_tokens=60, response_format={"type": "json_object"})
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.message.content), dict)
    else:  # ran out of tokens: still a prefix of an object
        assert r.message.content.startswith("{")


def test_unicode_choices(served):
    _, _, srv = served
    choices = ["café ☕", "naïve — ok", "日本語"]
    for seed in range(3):
        c = client(srv).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=20, temperature=1.0,
            seed=seed, extra_body={"structured_outputs": {"choice": choices}})
        assert c.choices[0].message.content in choices


NESTED = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["safe", "unsafe"]},
        "detail": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5},
                                                    "ok": {"type": "boolean"}},
                   "required": ["score", "ok"], "additionalProperties": False},
    },
    "required": ["verdict", "detail"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("shape", ["openai", "vllm"])
def test_json_schema_with_enum_nested_object_and_required_keys(served, shape):
    _, _, srv = served
    kw = ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": NESTED, "strict": True}}}
          if shape == "openai" else {"extra_body": {"structured_outputs": {"json": NESTED}}})
    r = ask(srv, max_tokens=80, **kw)
    assert r.finish_reason == "stop", r.message.content
    jsonschema.validate(json.loads(r.message.content), NESTED)


def test_constraint_that_can_only_end_at_max_tokens_reports_length(served):
    _, _, srv = served
    r = ask(srv, max_tokens=6, extra_body={"structured_outputs": {"regex": "[0-9]{40}"}})  # a digit a token
    assert r.finish_reason == "length"
    assert re.fullmatch("[0-9]{1,39}", r.message.content)


@pytest.mark.parametrize("field", ["guided_choice", "guided_json", "guided_regex", "guided_grammar",
                                   "guided_decoding_backend"])
def test_removed_guided_fields_are_refused_naming_structured_outputs(served, field):
    _, _, srv = served
    with pytest.raises(openai.BadRequestError, match="structured_outputs") as e:
        ask(srv, extra_body={field: ["a"] if field == "guided_choice" else "x"})
    assert e.value.body["param"] == field


@pytest.mark.parametrize("kw, param", [
    ({"extra_body": {"structured_outputs": {"regex": "a("}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "objekt"}}}}, "structured_outputs.json.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema.type"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice"),
    ({"extra_body": {"structured_outputs": {"choice": ["a"], "regex": "b"}}}, "structured_outputs"),
])
def test_bad_constraint_is_a_400_naming_the_field(served, kw, param):
    _, _, srv = served
    with pytest.raises(openai.BadRequestError) as e:
        ask(srv, **kw)
    assert e.value.body["param"] == param


def test_chat_top_logprobs_equal_log_softmax_of_transformers_logits(served):
    hf, model, srv = served
    msgs = [{"role": "user", "content": "Say something."}]
    r = client(srv).chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0.0,
                                            logprobs=True, top_logprobs=20,
                                            extra_body={"structured_outputs": {"regex": "[a-z ]{5}"}})
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) == r.usage.completion_tokens <= 5
    prompt = model.encode(msgs)
    # the response names tokens by text and bytes; map bytes back to ids over the vocabulary
    by_bytes = {}
    for t in range(model.cfg.vocab_size):
        by_bytes.setdefault(tuple(model.token_bytes(t)), t)
    ids = [by_bytes[tuple(e.bytes)] for e in content]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + ids])).logits[0].float(), -1).numpy()
    for j, e in enumerate(content):
        row = ref[len(prompt) + j - 1]
        assert len(e.top_logprobs) == 20
        np.testing.assert_allclose(e.logprob, row[ids[j]], atol=1e-4)
        np.testing.assert_allclose([a.logprob for a in e.top_logprobs], np.sort(row)[::-1][:20], atol=1e-4)


# ------------------------------------------------------------------ judges: modes and fallback
class RefusingServer:
    """A tiny OpenAI-shaped endpoint that answers 400 to the structured-output fields it is told
    to refuse and free text otherwise; it records which fields each request carried."""

    def __init__(self, refuse=("structured_outputs", "response_format"), text="Reasoning.\n[[YES]]"):
        self.refuse, self.text, self.seen = refuse, text, []
        self._loop = self._thread = None

    async def handle(self, request):
        body = await request.json()
        self.seen.append(sorted(k for k in ("structured_outputs", "response_format") if k in body))
        for k in self.refuse:
            if k in body:
                return web.json_response({"error": {"message": f"{k} is not supported", "type": "invalid_request_error",
                                                    "param": k, "code": None}}, status=400)
        text = self.text
        if "structured_outputs" in body:
            text = body["structured_outputs"]["choice"][0]
        elif "response_format" in body:
            text = json.dumps({"verdict": "[[NO]]"})
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def __enter__(self):
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _judge_via(srv_url, tmp_path, mode, n=3):
    ep = EndpointConfig(model="m", base_url=srv_url, api_key_env=None, max_attempts=1)
    chats = [judges.ADDRESSED.messages(f"q{i}", f"a{i}") for i in range(n)]

    async def main():
        async with ChatClient(ep, "judge") as c:
            with Journal(tmp_path / f"j_{mode}.jsonl") as j:
                return await judges.judge_batch(c, j, judges.ADDRESSED, chats, structured_outputs=mode,
                                                progress=False)
    return asyncio.run(main())[0]


@pytest.mark.parametrize("refuse, mode, value", [
    (("structured_outputs", "response_format"), "off", True),   # free text, parsed
    (("structured_outputs",), "openai", False),                 # OpenAI's shape taken
    ((), "vllm", True),                                         # vLLM's field taken
])
def test_auto_falls_back_on_400_and_records_the_mode(tmp_path, refuse, mode, value):
    with RefusingServer(refuse=refuse) as fake:
        res = _judge_via(f"http://127.0.0.1:{fake.port}/v1", tmp_path, "auto")
    assert [r.mode for r in res] == [mode] * 3
    assert all(r.valid and r.value is value for r in res)
    order = [["structured_outputs"], ["response_format"], []]
    probes = order[:order.index({"vllm": ["structured_outputs"], "openai": ["response_format"], "off": []}[mode]) + 1]
    assert fake.seen[:len(probes)] == probes          # tried in order, moved on at each 400
    assert len(fake.seen) == len(probes) + 2          # the accepted probe reply was kept


def test_forced_mode_does_not_fall_back(tmp_path):
    with RefusingServer(refuse=("structured_outputs",)) as fake:
        res = _judge_via(f"http://127.0.0.1:{fake.port}/v1", tmp_path, "vllm")
    assert res == [None, None, None]     # refused requests fail; nothing is made up


def test_request_fields_per_mode():
    so = judges.RISK_SET_SCHEMA.request_fields("vllm")
    assert so == {"structured_outputs": {"json": dict(judges.RISK_SET_SCHEMA.json_schema)}}
    rf = judges.YES_NO_SCHEMA.request_fields("openai", "addressed")["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["properties"]["verdict"]["enum"] == ["[[YES]]", "[[NO]]"]
    assert judges.YES_NO_SCHEMA.request_fields("off") == {}
    with pytest.raises(ValueError, match="structured-output mode"):
        judges.YES_NO_SCHEMA.request_fields("xgrammar")


# ------------------------------------------------------------------ parsing: constrained + lenient
@pytest.mark.parametrize("judge, text, value", [
    (judges.ADDRESSED, "[[YES]]", True),
    (judges.ADDRESSED, '{"verdict": "[[NO]]"}', False),
    (judges.HELPFULNESS, "Rating: [[3]]", 3),
    (judges.HELPFULNESS, '{"verdict": "Rating: [[0]]"}', 0),
    (judges.PROMPT_RISK, json.dumps({c.value: c.id == 3 for c in ALL_CATEGORIES}),
     tuple(c for c in ALL_CATEGORIES if c.id == 3)),
])
def test_constrained_verdict_alone_parses_strictly(judge, text, value):
    r = judge.read(text)
    assert r.valid and r.value == value and not r.lenient


@pytest.mark.parametrize("judge, text, value", [
    (judges.HELPFULNESS, "The answer is complete.\nRating: 5", 5),
    (judges.HELPFULNESS, "**Rating:** 4/5", 4),
    (judges.HELPFULNESS, "Rating: 2\n\nSo, Rating = 2", 2),
    (judges.ADDRESSED, "It answers everything.\nYES", True),
    (judges.ADDRESSED, "Not really.\nFinal answer: no.", False),
    (judges.COMPLIANCE, "Checked.\n**[NO]**", False),
    (judges.PROMPT_RISK, str({c.value: False for c in ALL_CATEGORIES}), ()),
])
def test_lenient_verdicts_are_accepted_and_marked(judge, text, value):
    r = judge.read(text)
    assert r.valid and r.value == value and r.lenient
    assert not judge.parse(text).valid or judge.kind == "risk_set"   # the strict parse refuses them


@pytest.mark.parametrize("judge, text", [
    (judges.HELPFULNESS, "Rating: 4\nOn reflection, Rating: 2"),   # two different ratings
    (judges.HELPFULNESS, "Rating: 4.5"),
    (judges.HELPFULNESS, "Rating: 3-4"),
    (judges.HELPFULNESS, "Rating: 8/10"),
    (judges.HELPFULNESS, "Rating: 7"),
    (judges.HELPFULNESS, "I would give it a five."),
    (judges.ADDRESSED, "Yes, but also no."),
    (judges.ADDRESSED, "yes it does"),
    (judges.ADDRESSED, "YES\nThe response fails to answer."),   # the verdict is not the last line
    (judges.ADDRESSED, "YES or NO"),
    (judges.COMPLIANCE, "[[MAYBE]]"),
])
def test_ambiguous_text_is_never_accepted(judge, text):
    r = judge.read(text)
    assert not r.valid and r.value is None and r.raw == text


def test_expected_rating_is_the_probability_weighted_mean():
    lps = [{"token": "Rating", "top_logprobs": []},
           {"token": "3", "top_logprobs": [{"token": "3", "logprob": np.log(0.5)},
                                           {"token": "4", "logprob": np.log(0.3)},
                                           {"token": "x", "logprob": np.log(0.1)},
                                           {"token": "0", "logprob": np.log(0.1)}]}]
    assert judges.expected_rating(lps) == pytest.approx((3 * 0.5 + 4 * 0.3) / 0.9)
    r = judges.finish_verdict(judges.HELPFULNESS, "Rating: [[3]]", "vllm", "expected", lps)
    assert r.valid and r.value == pytest.approx(3.0)
    assert judges.finish_verdict(judges.HELPFULNESS, "Rating: [[3]]", "vllm", "argmax", lps).value == 3
    bad = judges.finish_verdict(judges.HELPFULNESS, "nothing", "off", "expected", lps)
    assert not bad.valid and bad.value is None      # invalid stays invalid, never a zero


# ------------------------------------------------------------------ the real judge, constrained
@pytest.mark.slow
def test_every_judge_parses_on_the_embedded_model_through_the_server(tmp_path):
    """50 varied inputs (10 per judge, from the agreement set and its variations) through the
    real server and the official client, constraints on: every verdict parses."""
    import concurrent.futures as cf

    from cosa_jax.data import DATA_DIR
    from cosa_jax.eval.judge_agreement import KINDS, _chats, load_rows

    rows = load_rows(DATA_DIR / "judge_agreement.jsonl")
    model = ChatModel.load(EMBEDDED_MODEL)
    jobs = []
    for n, kind in enumerate(KINDS):
        picked = [dict(r) for r in (rows[n:] + rows[:n])[::4][:10]]  # 10 rows per kind
        for i, r in enumerate(picked):   # vary them: unicode, upper case, a longer request
            if i % 3 == 1:
                r["prompt"] = r["prompt"].upper()
            elif i % 3 == 2:
                r["prompt"] += " Merci — réponds vite s'il te plaît ✓"
        judge = judges.JUDGES[kind]
        jobs += [(judge, c) for c in _chats(kind, picked)]
    assert len(jobs) == 50
    with BackgroundServer(create_app(model, served_model_name="judge", max_batch=16)) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=1800)

        def one(job):
            judge, chat = job
            r = c.chat.completions.create(model="judge", messages=chat, max_tokens=110, temperature=0.0,
                                          extra_body=judge.output.request_fields("vllm"))
            return judge, r.choices[0].message.content

        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, jobs))
    bad = [(j.name, t) for j, t in answers if not j.read(t).valid or j.read(t).lenient]
    assert not bad, bad

"""OpenAI-compatible server: answers equal transformers' greedy generate, batching, auth rules.

A tiny random Llama written by transformers (with the embedded SmolLM2 tokenizer, whose vocab
it shares) is served on 127.0.0.1 in-process; the official ``openai`` client talks to it.
"""

import concurrent.futures as cf
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from aiohttp import web

from cosa_jax.chat import render_prompt
from cosa_jax.inference.auth import (AuthError, RegistryError, apply_policy, load_registry,
                                     parse_registry)
from cosa_jax.inference.sampler import SamplingParams, generate
from cosa_jax.inference.gateway import create_gateway_app
from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
from cosa_jax.models import EMBEDDED_MODEL, load_tokenizer
from cosa_jax.testing.model_fixtures import make_hf_model

MODEL = "tiny-cosa"
VIOLENCE_OK = "Fictional violence in game scripts is allowed; stay safe on every other risk."
DEFAULT_CONFIG = "Answer helpfully but refuse anything risky."
REGISTRY = {
    "configs": {"violence-ok": VIOLENCE_OK},
    "keys": {
        "sk-studio": {"name": "studio", "configs": ["violence-ok"]},
        "sk-admin": {"configs": "*"},
        "sk-reader": {},
    },
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_served")
    hf = make_hf_model(path, vocab_size=49152)  # SmolLM2's vocab: ids 1/2 = <|im_start|>/<|im_end|>
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def served(tiny_dir):
    """(hf_model, ChatModel, open server, authorised-config server)."""
    path, hf = tiny_dir
    model = ChatModel.load(str(path))
    registry_file = path / "registry.json"
    registry_file.write_text(json.dumps(REGISTRY))
    open_srv = BackgroundServer(create_app(model, served_model_name=MODEL)).start()
    auth_srv = BackgroundServer(create_app(model, served_model_name=MODEL,
                                           registry=load_registry(registry_file),
                                           default_config=DEFAULT_CONFIG)).start()
    yield hf, model, open_srv, auth_srv
    open_srv.stop()
    auth_srv.stop()


@pytest.fixture(scope="module")
def gateway_srv(served, tiny_dir):
    """The policy gateway (launch.serve --upstream) in front of the OPEN server: the same
    registry and default config, so every auth rule must hold through it too."""
    path, _ = tiny_dir
    srv = BackgroundServer(create_gateway_app(served[2].base_url,
                                              registry=load_registry(path / "registry.json"),
                                              default_config=DEFAULT_CONFIG)).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["server", "gateway"])
def guarded(request, served):
    """The authorised-config server itself, or the gateway applying the same registry."""
    return served[3] if request.param == "server" else request.getfixturevalue("gateway_srv")


def client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def ask(c, user, system=None, **kw):
    msgs = ([{"role": "system", "content": system}] if system is not None else [])
    msgs.append({"role": "user", "content": user})
    kw.setdefault("max_tokens", 10)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model=MODEL, messages=msgs, **kw)


def prompt_ids(model, system, user):
    text = render_prompt(model.tokenizer, system, user)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def raw_post(srv, body: bytes, headers=None):
    req = urllib.request.Request(srv.base_url + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_stats(srv):
    with urllib.request.urlopen(srv.base_url.replace("/v1", "/stats"), timeout=10) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------ answers
def test_greedy_answer_equals_transformers_generate_and_sampler(served):
    hf, model, srv, _ = served
    system, user = "You are terse.", "Name a colour."
    resp = ask(client(srv), user, system, max_tokens=12)
    ids = prompt_ids(model, system, user)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    ref_text = model.tokenizer.decode([t for t in ref if t != 2], skip_special_tokens=True)
    ours = generate(model.params, model.cfg, [ids], SamplingParams(max_new_tokens=12),
                    eos_ids=model.eos_ids, tokenizer=model.tokenizer)[0]
    choice = resp.choices[0]
    assert choice.message.content == ref_text == ours.text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if 2 in ref else "length")
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref)
    assert resp.usage.total_tokens == len(ids) + len(ref)
    assert resp.model == MODEL and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_models_endpoint_lists_the_served_name(served):
    _, model, srv, _ = served
    models = client(srv).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"


def test_stream_returns_the_same_text_as_one_shot(served):
    _, _, srv, _ = served
    c = client(srv)
    whole = ask(c, "Say hi.", max_tokens=6).choices[0].message.content
    chunks = list(ask(c, "Say hi.", max_tokens=6, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_stop_string_cuts_the_text(served):
    _, _, srv, _ = served
    c = client(srv)
    full = ask(c, "Count.", max_tokens=12).choices[0].message.content
    stop = full[3:6]
    assert stop.strip(), f"generated text too short to pick a stop string: {full!r}"
    cut = ask(c, "Count.", max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.find(stop)]
    assert cut.finish_reason == "stop"


def test_concurrent_requests_share_batches_and_match_single_answers(served):
    _, model, open_srv, _ = served
    # A long wait window, so that requests sent together surely meet even on a loaded machine.
    srv = BackgroundServer(create_app(model, served_model_name=MODEL, batch_wait_ms=1000,
                                      max_batch=8)).start()
    c = client(srv)
    users = ["Hello there.", "What is two plus two, exactly?", "Tell me a fact.",
             "Describe the sea in one long sentence please.", "Why?", "Name three trees."]
    kinds = [dict(), dict(), dict(), dict(), dict(temperature=1.0, top_p=0.9, seed=11),
             dict(temperature=0.8, seed=5, extra_body={"top_k": 20})]
    single = [ask(client(open_srv), u, **k).choices[0].message.content
              for u, k in zip(users, kinds)]
    before = get_stats(srv)
    with cf.ThreadPoolExecutor(len(users)) as pool:
        together = list(pool.map(lambda uk: ask(c, uk[0], **uk[1]).choices[0].message.content,
                                 zip(users, kinds)))
    after = get_stats(srv)
    srv.stop()
    assert together == single
    assert after["requests"] - before["requests"] == len(users)
    assert after["batches"] - before["batches"] < len(users)
    grew = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert any(int(k) > 1 and n > 0 for k, n in grew.items()), (before, after)


def test_sampling_is_seeded(served):
    _, _, srv, _ = served
    c = client(srv)
    a, b, d = (ask(c, "Invent a word.", temperature=1.0, seed=s, max_tokens=8).choices[0].message.content
               for s in (3, 3, 4))
    assert a == b and a != d


# ------------------------------------------------------------------------ authorised configs
def test_authorised_key_may_use_its_config_by_text_or_by_name(served, guarded):
    _, model, _, _ = served
    srv = guarded
    c = client(srv, "sk-studio")
    by_text = ask(c, "Write a duel scene.", VIOLENCE_OK)
    by_name = ask(c, "Write a duel scene.", extra_body={"safety_config": "violence-ok"})
    expected = prompt_ids(model, VIOLENCE_OK, "Write a duel scene.")
    assert by_text.usage.prompt_tokens == by_name.usage.prompt_tokens == len(expected)
    assert by_text.choices[0].message.content == by_name.choices[0].message.content
    ours = generate(model.params, model.cfg, [expected], SamplingParams(max_new_tokens=10),
                    eos_ids=model.eos_ids, tokenizer=model.tokenizer)[0]
    assert by_text.choices[0].message.content == ours.text


def test_other_config_from_authorised_key_is_refused(served, guarded):
    srv = guarded
    with pytest.raises(openai.PermissionDeniedError, match="not one of the safety configs"):
        ask(client(srv, "sk-studio"), "Hi", "Everything is allowed.")
    with pytest.raises(openai.PermissionDeniedError, match="may not use safety config"):
        ask(client(srv, "sk-studio"), "Hi", extra_body={"safety_config": "other"})


def test_key_without_rights_gets_the_default_config_and_may_not_send_one(served, guarded):
    _, model, _, _ = served
    srv = guarded
    c = client(srv, "sk-reader")
    resp = ask(c, "Hi")
    assert resp.usage.prompt_tokens == len(prompt_ids(model, DEFAULT_CONFIG, "Hi"))
    ours = generate(model.params, model.cfg, [prompt_ids(model, DEFAULT_CONFIG, "Hi")],
                    SamplingParams(max_new_tokens=10), eos_ids=model.eos_ids,
                    tokenizer=model.tokenizer)[0]
    assert resp.choices[0].message.content == ours.text
    with pytest.raises(openai.PermissionDeniedError, match="may not set the safety config") as e:
        ask(c, "Hi", VIOLENCE_OK)
    assert e.value.status_code == 403
    # An authorised key that sends no system message also gets the default config.
    studio = ask(client(srv, "sk-studio"), "Hi")
    assert studio.usage.prompt_tokens == resp.usage.prompt_tokens


def test_wildcard_key_may_send_any_config(served, guarded):
    _, model, _, _ = served
    srv = guarded
    text = "Only poetry is allowed."
    resp = ask(client(srv, "sk-admin"), "Hi", text)
    assert resp.usage.prompt_tokens == len(prompt_ids(model, text, "Hi"))


def test_unknown_or_missing_key_is_401(served, guarded):
    srv = guarded
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        ask(client(srv, "sk-nobody"), "Hi")
    with pytest.raises(openai.AuthenticationError):
        client(srv, "sk-nobody").models.list()
    status, body = raw_post(srv, json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "Hi"}]}).encode())
    assert status == 401 and "missing API key" in body["error"]["message"]


def test_open_server_passes_system_messages_through(served):
    _, model, srv, _ = served
    text = "Any config at all."
    resp = ask(client(srv), "Hi", text)
    assert resp.usage.prompt_tokens == len(prompt_ids(model, text, "Hi"))


def test_policy_rules_without_a_server():
    reg = parse_registry({**REGISTRY, "allow_anonymous": True})
    user = [{"role": "user", "content": "q"}]
    sys_user = [{"role": "system", "content": f"  {VIOLENCE_OK}\n"}] + user
    assert apply_policy(user, None, reg, DEFAULT_CONFIG)[0]["content"] == DEFAULT_CONFIG
    assert apply_policy(sys_user, "sk-studio", reg, DEFAULT_CONFIG) == sys_user
    with pytest.raises(AuthError) as e:
        apply_policy(sys_user, None, reg, DEFAULT_CONFIG)   # anonymous: no right
    assert e.value.status == 403
    assert apply_policy(user, None, None, None) == user     # open server, no default
    by_name = apply_policy(user, "sk-admin", reg, DEFAULT_CONFIG, requested_config="violence-ok")
    assert by_name[0] == {"role": "system", "content": VIOLENCE_OK}
    with pytest.raises(AuthError) as e:
        apply_policy(user, "sk-admin", reg, DEFAULT_CONFIG, requested_config="no-such")
    assert e.value.status == 400 and "not in the registry" in e.value.message
    with pytest.raises(AuthError) as e:
        apply_policy(user, "sk-reader", reg, DEFAULT_CONFIG, requested_config="violence-ok")
    assert e.value.status == 403
    assert apply_policy(user, None, None, DEFAULT_CONFIG)[0]["content"] == DEFAULT_CONFIG
    strict = parse_registry(REGISTRY)
    with pytest.raises(AuthError) as e:
        apply_policy(user, None, strict, DEFAULT_CONFIG)
    assert e.value.status == 401


def test_bad_registry_files_name_the_file_and_field(tmp_path):
    bad = tmp_path / "reg.json"
    bad.write_text("{not json")
    with pytest.raises(RegistryError, match=r"reg\.json: not valid JSON \(line 1"):
        load_registry(bad)
    with pytest.raises(RegistryError, match=r"keys\[0\]\.configs: \['nope'\] not in"):
        parse_registry({"keys": {"k": {"configs": ["nope"]}}}, "reg.json")
    with pytest.raises(RegistryError, match="'keys' must be a non-empty"):
        parse_registry({"configs": {}}, "reg.json")
    with pytest.raises(RegistryError, match="not found"):
        load_registry(tmp_path / "missing.json")


# ------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": MODEL}).encode(), 400, "'messages' is required"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'model' is required"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
     "'gpt-9' is not served here"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
     "messages[0].role"),
    (json.dumps({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "x"}]}).encode(),
     400, "only n=1"),
    (json.dumps({"model": MODEL, "temperature": "hot",
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'temperature' must be a number"),
    (json.dumps({"model": MODEL, "max_tokens": 5000,
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "does not fit"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
     400, "prompt is too long"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"},
                                              {"role": "system", "content": "late"}]}).encode(),
     400, "at most one system message"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, needle):
    _, _, srv, _ = served
    got, payload = raw_post(srv, body)
    assert got == status
    assert needle in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}


def test_openai_client_sees_400_for_unsupported_features(served):
    _, _, srv, _ = served
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        ask(client(srv), "Hi", n=3)
    # (logprobs used to be refused here; the engine now reports them, issue 20)
    with pytest.raises(openai.BadRequestError, match="logit_bias is not supported"):
        ask(client(srv), "Hi", logit_bias={"5": 10})


# ------------------------------------------------------------------------ the CLI
@contextlib.contextmanager
def launched_serve(*config_args, what="server"):
    """``python -m launch.serve`` with ``config_args`` on a free port; yields an OpenAI client
    (key sk-reader) once /health answers, and stops the process after the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.serve", *config_args, f"--config.port={port}"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, f"{what} did not come up in 120 s"
                time.sleep(0.5)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-reader", max_retries=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_launch_serve_cli_end_to_end(tiny_dir, tmp_path):
    path, _ = tiny_dir
    (tmp_path / "registry.json").write_text(json.dumps(REGISTRY))
    (tmp_path / "default.txt").write_text(DEFAULT_CONFIG + "\n")
    with launched_serve(f"--config.model={path}", f"--config.served_model_name={MODEL}",
                        f"--config.auth_registry={tmp_path / 'registry.json'}",
                        f"--config.default_safety_config={tmp_path / 'default.txt'}") as c:
        resp = ask(c, "Hi", max_tokens=4)
        tok = load_tokenizer(path)
        expected = tok(render_prompt(tok, DEFAULT_CONFIG, "Hi"), add_special_tokens=False)["input_ids"]
        assert resp.usage.prompt_tokens == len(expected)   # the file's config, stripped
        with pytest.raises(openai.PermissionDeniedError):
            ask(c, "Hi", "Anything goes.")


# ------------------------------------------------------------------------ streaming
def test_streamed_deltas_join_to_the_text_and_stop_strings_spanning_tokens(served):
    _, model, srv, _ = served
    c = client(srv)

    def full(seed, **kw):
        return ask(c, "Write anything.", temperature=1.0, seed=seed, max_tokens=24,
                   logprobs=True, **kw).choices[0]

    def streamed(seed, **kw):
        chunks = list(ask(c, "Write anything.", temperature=1.0, seed=seed, max_tokens=24,
                          stream=True, **kw))
        pieces = [ch.choices[0].delta.content for ch in chunks
                  if ch.choices and ch.choices[0].delta.content]
        return pieces, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]

    # (Characters split across tokens: the tiny random model never writes them, see
    # test_smollm2_streams_split_characters_intact and test_engine's forced-token test.)
    seed = 0
    one = full(seed)
    pieces, finish = streamed(seed)
    assert "".join(pieces) == one.message.content and finish == one.finish_reason
    assert len(pieces) > 3

    # A stop string across a token boundary: the text before it, streamed or not.
    data = b"".join(bytes(t.bytes) for t in one.logprobs.content)
    text, bounds, at = one.message.content, [], 0
    for t in one.logprobs.content:
        at += len(t.bytes)
        try:
            bounds.append(len(data[:at].decode("utf-8")))
        except UnicodeDecodeError:
            continue
    cut = next(b for b in bounds if 2 <= b <= len(text) - 2 and text.find(text[b - 2:b + 2]) == b - 2)
    stop = text[cut - 2:cut + 2]
    stopped = full(seed, stop=[stop])
    pieces, finish = streamed(seed, stop=[stop])
    assert stopped.message.content == "".join(pieces) == text[:cut - 2]
    assert stopped.finish_reason == finish == "stop"


def _stats(srv):
    with urllib.request.urlopen(srv.base_url.replace("/v1", "/stats"), timeout=10) as r:
        return json.loads(r.read())


def _wait_until(cond, seconds=30.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(served, stream, caplog):
    _, model, _, _ = served
    caplog.set_level("INFO", logger="cosa_jax.inference.engine")
    with BackgroundServer(create_app(model, served_model_name=MODEL, max_batch=2)) as srv:
        body = json.dumps({"model": MODEL, "max_tokens": 1900, "temperature": 0,
                           "stream": stream, "messages": [{"role": "user", "content": "Go on."}]})
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                      f"{body}").encode())
        assert _wait_until(lambda: _stats(srv)["decode_steps"] >= 3)
        if stream:
            assert b"data:" in sock.recv(65536)
        sock.close()
        assert _wait_until(lambda: _stats(srv)["active"] == 0)
        after = _stats(srv)
        assert after["cancelled"] == 1 and after["decode_steps"] < 1900
        # The slot serves the next request at once.
        assert ask(client(srv), "Hi", max_tokens=3).usage.completion_tokens == 3
    lines = [r.getMessage() for r in caplog.records if "client disconnected" in r.getMessage()]
    assert len(lines) == 1 and "freed" in lines[0]


# ------------------------------------------------------------------------ log-probs
def _torch_logp(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_chat_logprobs_equal_transformers_log_softmax(served):
    hf, model, srv, _ = served
    resp = ask(client(srv), "Name a bird.", max_tokens=6, logprobs=True, top_logprobs=5)
    ids = prompt_ids(model, None, "Name a bird.")
    out = generate(model.params, model.cfg, [ids], SamplingParams(max_new_tokens=6),
                   eos_ids=model.eos_ids)[0].token_ids
    ref = _torch_logp(hf, ids + out)
    content = resp.choices[0].logprobs.content
    assert len(content) == len(out)
    for j, (entry, tok) in enumerate(zip(content, out)):
        row = ref[len(ids) + j - 1]
        assert entry.token == model.tokenizer.decode([tok])
        assert abs(entry.logprob - row[tok]) < 1e-4
        assert len(entry.top_logprobs) == 5
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs],
                                   np.sort(row)[::-1][:5], atol=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6   # greedy: the best
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        ask(client(srv), "Hi", logprobs=True, top_logprobs=21)


def test_completions_echo_logprobs_give_lm_eval_loglikelihoods(served):
    hf, model, srv, _ = served
    tok = model.tokenizer
    ctx = tok("The capital of France is")["input_ids"]
    conts = [tok(" Paris")["input_ids"], tok(" a large green dog")["input_ids"]]
    # lm-eval's local-completions body for a log-likelihood batch (tokenized requests).
    resp = client(srv).completions.create(model=MODEL, prompt=[ctx + c for c in conts],
                                          max_tokens=1, logprobs=1, echo=True, temperature=0,
                                          seed=1234)
    choices = sorted(resp.choices, key=lambda ch: ch.index)
    assert len(choices) == 2
    for ch, cont in zip(choices, conts):
        ids = ctx + cont
        lp = ch.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        # lm-eval's parse: sum over the continuation, greedy if each equals its top-1.
        ctxlen = len(ctx)
        loglik = sum(lp.token_logprobs[ctxlen:-1])
        greedy = all(t == max(top.values())
                     for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        ref = _torch_logp(hf, ids)
        want = sum(ref[i - 1, ids[i]] for i in range(ctxlen, len(ids)))
        assert abs(loglik - want) < 1e-3
        assert greedy == all(int(ref[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids)))
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]]) < 1e-4
        assert ch.text.startswith(tok.decode(ids))
    # max_tokens=0 with echo: the prompt scored, nothing generated.
    only = client(srv).completions.create(model=MODEL, prompt=ctx, max_tokens=0, logprobs=0,
                                          echo=True)
    assert only.choices[0].text == tok.decode(ctx) and only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.token_logprobs) == len(ctx)


def test_completions_text_prompt_stream_and_max_completion_tokens(served):
    _, model, srv, _ = served
    c = client(srv)
    text = "Once upon a time"
    ids = model.encode_prompt(text)
    ours = generate(model.params, model.cfg, [ids], SamplingParams(max_new_tokens=9),
                    eos_ids=model.eos_ids, tokenizer=model.tokenizer)[0]
    one = c.completions.create(model=MODEL, prompt=text, max_tokens=9, temperature=0)
    assert one.choices[0].text == ours.text and one.object == "text_completion"
    assert one.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model=MODEL, prompt=text, max_tokens=9, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ours.text
    assert chunks[-1].usage.completion_tokens == one.usage.completion_tokens
    chat = ask(c, "Hi", max_tokens=None, max_completion_tokens=3)
    assert chat.usage.completion_tokens <= 3
    assert chat.usage.completion_tokens == 3 or chat.choices[0].finish_reason == "stop"


def test_raw_prompts_need_a_key_that_may_set_any_config(served, guarded):
    srv = guarded
    with pytest.raises(openai.PermissionDeniedError, match="raw prompts"):
        client(srv, "sk-studio").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(srv, "sk-nobody").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    ok = client(srv, "sk-admin").completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                    temperature=0)
    assert ok.usage.completion_tokens >= 1


# ------------------------------------------------------------------------ the gateway
def test_gateway_refusals_are_the_servers_own(served, gateway_srv):
    _, _, _, auth_srv = served
    cases = [({}, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
             ({"Authorization": "Bearer sk-nobody"}, {"model": MODEL, "messages": [
                 {"role": "user", "content": "Hi"}]}),
             ({"Authorization": "Bearer sk-reader"}, {"model": MODEL, "messages": [
                 {"role": "system", "content": VIOLENCE_OK}, {"role": "user", "content": "Hi"}]}),
             ({"Authorization": "Bearer sk-studio"}, {"model": MODEL, "safety_config": "nope",
                                                      "messages": [{"role": "user", "content": "Hi"}]})]
    for headers, body in cases:
        direct = raw_post(auth_srv, json.dumps(body).encode(), headers)
        via = raw_post(gateway_srv, json.dumps(body).encode(), headers)
        assert direct == via and direct[0] in (401, 403), (direct, via)


def test_gateway_passes_a_streamed_answer_through_intact(served, gateway_srv):
    _, _, open_srv, _ = served

    def deltas(srv):
        chunks = list(ask(client(srv, "sk-admin"), "Tell a story.", "Stories only.", max_tokens=12,
                          stream=True, stream_options={"include_usage": True}))
        return ([ch.choices[0].delta.content for ch in chunks if ch.choices],
                [ch.choices[0].finish_reason for ch in chunks if ch.choices], chunks[-1].usage)

    direct, via = deltas(open_srv), deltas(gateway_srv)
    assert direct == via and len(direct[0]) > 3
    # No system message: the gateway puts the default config in, as the server would.
    assert ask(client(gateway_srv, "sk-admin"), "Hi", max_tokens=4).choices[0].message.content == \
        ask(client(open_srv), "Hi", DEFAULT_CONFIG, max_tokens=4).choices[0].message.content


def test_gateway_answers_502_when_the_upstream_fails(tiny_dir):
    path, _ = tiny_dir
    registry = load_registry(path / "registry.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with BackgroundServer(create_gateway_app(f"http://127.0.0.1:{dead}/v1", registry=registry)) as gw:
        with pytest.raises(openai.InternalServerError, match="upstream .* failed") as e:
            ask(client(gw, "sk-admin"), "Hi")
        assert e.value.status_code == 502
        with pytest.raises(openai.AuthenticationError):   # the policy still answers first
            ask(client(gw, "sk-nobody"), "Hi")

    async def broken(request):
        return web.json_response({"detail": "out of memory"}, status=500)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    with BackgroundServer(app) as upstream, \
            BackgroundServer(create_gateway_app(upstream.base_url, registry=registry)) as gw:
        with pytest.raises(openai.InternalServerError, match="HTTP 500.*out of memory") as e:
            ask(client(gw, "sk-admin"), "Hi")
        assert e.value.status_code == 502


def test_launch_serve_upstream_runs_the_gateway(served, tiny_dir, tmp_path):
    _, model, open_srv, _ = served
    path, _ = tiny_dir
    with launched_serve(f"--config.upstream={open_srv.base_url}", f"--config.auth_registry={path / 'registry.json'}",
                        f"--config.default_safety_config={DEFAULT_CONFIG}", what="gateway") as c:
        resp = ask(c, "Hi", max_tokens=4)
        assert resp.usage.prompt_tokens == len(prompt_ids(model, DEFAULT_CONFIG, "Hi"))
        with pytest.raises(openai.PermissionDeniedError):
            ask(c, "Hi", "Anything goes.")


# ------------------------------------------------------------------------ the real embedded model
@pytest.mark.slow
def test_smollm2_server_answer_equals_transformers_generate():
    from transformers import AutoModelForCausalLM

    from cosa_jax.models import resolve_model_dir

    model = ChatModel.load(EMBEDDED_MODEL)
    system, user = "You are a helpful assistant. Violence in fiction is allowed.", \
        "What is the capital of France?"
    ids = prompt_ids(model, system, user)
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(EMBEDDED_MODEL)),
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=model.eos_ids, pad_token_id=2)[0, len(ids):].tolist()
    ref_text = model.tokenizer.decode(ref, skip_special_tokens=True)
    with BackgroundServer(create_app(model, served_model_name="smol")) as srv:
        resp = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="smol", messages=[{"role": "system", "content": system},
                                    {"role": "user", "content": user}],
            max_tokens=16, temperature=0)
    assert resp.choices[0].message.content == ref_text
    assert "Paris" in ref_text
    assert resp.usage.completion_tokens == len(ref)


@pytest.mark.slow
def test_smollm2_streams_split_characters_intact():
    """SmolLM2 writes CJK characters as several byte-level tokens each: the streamed deltas
    never carry half a character, join to the whole text, and a stop string spanning tokens
    cuts both the same way."""
    model = ChatModel.load(EMBEDDED_MODEL)
    prompt = "日本の都市: 東京, 大阪, 京都, 名古屋,"
    with BackgroundServer(create_app(model, served_model_name="smol")) as srv:
        c = client(srv)
        kw = dict(model="smol", prompt=prompt, max_tokens=16, temperature=0)
        whole = c.completions.create(**kw).choices[0].text
        pieces = [ch.choices[0].text for ch in c.completions.create(stream=True, **kw)
                  if ch.choices and ch.choices[0].text]
        ids = model.encode_prompt(prompt)
        out = generate(model.params, model.cfg, [ids], SamplingParams(max_new_tokens=16),
                       eos_ids=model.eos_ids)[0].token_ids
        assert any("\ufffd" in model.tokenizer.decode([t]) for t in out)   # split characters
        assert whole == model.tokenizer.decode(out, skip_special_tokens=True)
        assert "".join(pieces) == whole and not any("\ufffd" in p for p in pieces)
        stop = whole.strip()[1:3]          # two CJK characters: several tokens
        cut = whole[:whole.find(stop)]
        stopped = c.completions.create(stop=[stop], **kw).choices[0]
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            stream=True, stop=[stop], **kw) if ch.choices)
        assert stopped.text == streamed == cut and stopped.finish_reason == "stop"

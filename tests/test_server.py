"""OpenAI-compatible server: answers equal transformers' greedy generate, batching, auth rules.

A tiny random Llama written by transformers (with the embedded SmolLM2 tokenizer, whose vocab
it shares) is served on 127.0.0.1 in-process; the official ``openai`` client talks to it.
"""

import asyncio
import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import openai
import pytest
import torch

from cosa_jax.chat import render_prompt
from cosa_jax.inference.auth import (AuthError, RegistryError, apply_policy, load_registry,
                                     parse_registry)
from cosa_jax.inference.sampler import SamplingParams, generate
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
def test_authorised_key_may_use_its_config_by_text_or_by_name(served):
    _, model, _, srv = served
    c = client(srv, "sk-studio")
    by_text = ask(c, "Write a duel scene.", VIOLENCE_OK)
    by_name = ask(c, "Write a duel scene.", extra_body={"safety_config": "violence-ok"})
    expected = prompt_ids(model, VIOLENCE_OK, "Write a duel scene.")
    assert by_text.usage.prompt_tokens == by_name.usage.prompt_tokens == len(expected)
    assert by_text.choices[0].message.content == by_name.choices[0].message.content
    ours = generate(model.params, model.cfg, [expected], SamplingParams(max_new_tokens=10),
                    eos_ids=model.eos_ids, tokenizer=model.tokenizer)[0]
    assert by_text.choices[0].message.content == ours.text


def test_other_config_from_authorised_key_is_refused(served):
    _, _, _, srv = served
    with pytest.raises(openai.PermissionDeniedError, match="not one of the safety configs"):
        ask(client(srv, "sk-studio"), "Hi", "Everything is allowed.")
    with pytest.raises(openai.PermissionDeniedError, match="may not use safety config"):
        ask(client(srv, "sk-studio"), "Hi", extra_body={"safety_config": "other"})


def test_key_without_rights_gets_the_default_config_and_may_not_send_one(served):
    _, model, _, srv = served
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


def test_wildcard_key_may_send_any_config(served):
    _, model, _, srv = served
    text = "Only poetry is allowed."
    resp = ask(client(srv, "sk-admin"), "Hi", text)
    assert resp.usage.prompt_tokens == len(prompt_ids(model, text, "Hi"))


def test_unknown_or_missing_key_is_401(served):
    _, _, _, srv = served
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
def test_launch_serve_cli_end_to_end(tiny_dir, tmp_path):
    path, _ = tiny_dir
    (tmp_path / "registry.json").write_text(json.dumps(REGISTRY))
    (tmp_path / "default.txt").write_text(DEFAULT_CONFIG + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.serve", f"--config.model={path}", f"--config.port={port}",
         f"--config.served_model_name={MODEL}", f"--config.auth_registry={tmp_path / 'registry.json'}",
         f"--config.default_safety_config={tmp_path / 'default.txt'}"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-reader", max_retries=0)
        resp = ask(c, "Hi", max_tokens=4)
        tok = load_tokenizer(path)
        expected = tok(render_prompt(tok, DEFAULT_CONFIG, "Hi"), add_special_tokens=False)["input_ids"]
        assert resp.usage.prompt_tokens == len(expected)   # the file's config, stripped
        with pytest.raises(openai.PermissionDeniedError):
            ask(c, "Hi", "Anything goes.")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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

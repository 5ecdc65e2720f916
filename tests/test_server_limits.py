"""Server limits and malformed input (issues 25.3, 26.2, 27.4): each gets its 4xx with a message
naming the field or limit, never a 500, never affecting other requests, and the server answers
afterwards. One tiny-model server per module keeps compile time down."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from cosa_jax.chat import ControlTokenError
from cosa_jax.inference.auth import parse_registry
from cosa_jax.inference.requests import Admission, ApiError, ServerLimits, number
from cosa_jax.inference.server import BackgroundServer, ChatModel, create_app
from cosa_jax.models import EMBEDDED_MODEL, load_tokenizer
from cosa_jax.testing.model_fixtures import make_hf_model

MODEL = "tiny-limits"
LIMITS = ServerLimits(max_body_bytes=48 * 1024, max_messages=8, max_concurrent_per_key=2,
                      parse_off_loop_bytes=8 * 1024)
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_limits")
    make_hf_model(path, vocab_size=49152)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(path)
    return ChatModel.load(str(path))


@pytest.fixture(scope="module")
def srv(model):
    with BackgroundServer(create_app(model, served_model_name=MODEL, max_batch=4,
                                     max_cache_len=512, limits=LIMITS)) as s:
        yield s


def post(srv, body, path="/chat/completions", headers=None, timeout=120):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(srv.base_url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0, **kw}


def assert_answers(srv):
    status, payload, _ = post(srv, chat())
    assert status == 200, payload
    assert payload["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body, param, needle", [
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], "n": 1e400}',
     "n", "'n' must be a finite number"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], "n": 1'
     + b"0" * 400 + b"}", "n", "only n=1"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], "top_k": -1'
     + b"0" * 400 + b"}", "top_k", "'top_k' must be in [-1, inf], got a 401-digit number"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], '
     b'"frequency_penalty": 1' + b"0" * 400 + b"}", "frequency_penalty", "must be a finite number"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     None, "NaN is not a JSON number"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
     None, "Infinity is not a JSON number"),
    (b'{"model": "tiny-limits", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     None, "not valid UTF-8"),
    (b'{"model": "tiny-limits", "messages": [', None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b"[" * 20000 + b"]" * 20000, None, "nested too deeply"),
    (json.dumps(chat(temperature=True)).encode(), "temperature", "'temperature' must be a number"),
    (json.dumps(chat(max_tokens=True)).encode(), "max_tokens", "'max_tokens' must be an integer"),
    (json.dumps(chat(max_tokens=-5)).encode(), "max_tokens", "'max_tokens' must be in [1, inf]"),
    (json.dumps(chat(max_tokens=2.5)).encode(), "max_tokens", "must be an integer"),
    (json.dumps(chat(temperature=-0.1)).encode(), "temperature", "must be in [0.0, 2.0]"),
    (json.dumps(chat(seed="7")).encode(), "seed", "'seed' must be an integer"),
    (json.dumps(chat(top_k=-2)).encode(), "top_k", "'top_k' must be in [-1, inf]"),
    (json.dumps(chat(stream="yes")).encode(), "stream", "'stream' must be true or false"),
    (json.dumps(chat(stop=["a"] * 5)).encode(), "stop", "'stop' holds 5 strings"),
    (json.dumps(chat(stop="s" * 300)).encode(), "stop", "300 characters"),
    (json.dumps(chat(messages=[{"role": "user", "content": 5}])).encode(), "messages[0].content",
     "messages[0]"),
    (json.dumps(chat(messages=USER * 9)).encode(), "messages", "ServerLimits.max_messages"),
    (json.dumps(chat(min_p=0.1)).encode(), "min_p", "'min_p': min_p filtering is not implemented"),
    (json.dumps(chat(min_tokens=4)).encode(), "min_tokens", "'min_tokens'"),
    (json.dumps(chat(ignore_eos=True)).encode(), "ignore_eos", "'ignore_eos'"),
    (json.dumps(chat(continue_final_message=True)).encode(), "continue_final_message",
     "continuing a final assistant message is not implemented"),
    (json.dumps(chat(frobnicate=1)).encode(), "frobnicate", "unknown field for this endpoint"),
    (json.dumps(chat(max_tokens=600)).encode(), "max_tokens", "does not fit the model's context"),
])
def test_malformed_chat_requests_get_400_naming_the_field(srv, body, param, needle):
    status, payload, _ = post(srv, body)
    assert status == 400, payload
    assert needle in payload["error"]["message"]
    assert payload["error"]["param"] == param


def test_context_overflow_has_the_openai_code(srv):
    status, payload, _ = post(srv, chat(max_tokens=600))
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    status, payload, _ = post(srv, chat(messages=[{"role": "user", "content": "word " * 900}]))
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert "prompt is too long" in payload["error"]["message"]


@pytest.mark.parametrize("field, value", [("min_tokens", 2), ("ignore_eos", True), ("min_p", 0.05),
                                          ("guided_foo", "x"), ("messages", USER)])
def test_completions_endpoint_has_its_own_allow_list(srv, field, value):
    status, payload, _ = post(srv, {"model": MODEL, "prompt": "Hi", "max_tokens": 2, field: value},
                              path="/completions")
    assert status == 400 and payload["error"]["param"] == field, payload
    assert f"'{field}'" in payload["error"]["message"]


def test_oversized_body_is_413_and_health_answers_during_a_slow_upload(srv):
    status, payload, _ = post(srv, chat(messages=[{"role": "user", "content": "x" * 60000}]))
    assert status == 413 and "ServerLimits.max_body_bytes" in payload["error"]["message"]
    # A client that announces a body within the cap and sends it slowly holds no one up.
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 40000\r\n\r\n{\"model\"")
    try:
        for path in ("/health", "/v1/models"):
            with urllib.request.urlopen(srv.base_url.replace("/v1", "") + path, timeout=10) as r:
                assert r.status == 200
    finally:
        sock.close()
    # A chunked body (no Content-Length) past the cap is cut off while it is read.
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: application/json\r\n\r\n")
    chunk = b"x" * 16384
    for _ in range(4):
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    sock.sendall(b"0\r\n\r\n")
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in reply
    assert_answers(srv)


def test_a_bad_request_never_fails_the_requests_batched_with_it(srv):
    good = [chat(max_tokens=6, seed=i) for i in range(3)]
    n_overflow = json.dumps(chat()).replace('"temperature"', '"n": 1e400, "temperature"').encode()
    bad = [chat(top_k=2**40), n_overflow, chat(top_k=2**40, seed=2**70)]
    with cf.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda ib: post(srv, ib[1], headers={
            "Authorization": f"Bearer b{ib[0]}"}), enumerate(good + bad)))
    for status, payload, _ in results[:3]:
        assert status == 200 and payload["usage"]["completion_tokens"] == 6
    # top_k beyond the vocabulary is "no top-k" (clamped), a huge seed is taken mod 2**32.
    assert results[3][0] == 200 and results[5][0] == 200
    assert results[4][0] == 400 and results[4][1]["error"]["param"] == "n", results[4]
    # top_k clamped to the vocabulary decodes greedily like no top_k at all.
    assert post(srv, chat(top_k=2**40))[1]["choices"] == post(srv, chat())[1]["choices"]


def test_per_key_concurrency_is_429_with_retry_after(srv):
    body = json.dumps({"model": MODEL, "max_tokens": 400, "temperature": 0, "stream": True,
                       "messages": USER}).encode()
    socks = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        got = b""
        while b"data:" not in got:   # in flight
            got += s.recv(65536)
        socks.append(s)
    try:
        status, payload, headers = post(srv, chat(), headers={"Authorization": "Bearer k1"})
        assert status == 429 and headers.get("Retry-After") == "1"
        assert "max_concurrent_per_key=2" in payload["error"]["message"]
        # Another key is not held up by k1's requests.
        status, _, _ = post(srv, chat(), headers={"Authorization": "Bearer k2"})
        assert status == 200
    finally:
        for s in socks:
            s.close()
    deadline = time.time() + 60
    while time.time() < deadline:   # the disconnects free k1's places
        if post(srv, chat(), headers={"Authorization": "Bearer k1"})[0] == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("k1 stayed at its concurrency limit after its clients disconnected")


def test_queue_bound_is_429():
    adm = Admission(ServerLimits(max_queue=3, max_concurrent_per_key=5))
    adm.enter("a", waiting=2)
    with pytest.raises(ApiError) as e:
        adm.enter("b", waiting=3)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    assert "ServerLimits.max_queue=3" in e.value.message
    adm.leave("a")
    assert not adm.in_flight


def test_numbers_are_overflow_safe_and_bools_are_not_numbers():
    assert number({"k": 2**40}, "k", int, lo=-1) == 2**40
    assert number({"k": 3.0}, "k", int) == 3
    for bad in (True, "3", [3], float("nan"), float("inf")):
        with pytest.raises(ApiError, match="'k' must be"):
            number({"k": bad}, "k", int)
    with pytest.raises(ApiError, match="finite"):
        number({"k": 10**400}, "k", float)
    with pytest.raises(ValueError, match="ServerLimits.max_queue"):
        ServerLimits(max_queue=0).validate()


def test_control_token_error_is_a_400(srv, model, monkeypatch):
    def refuse(messages):
        raise ControlTokenError("message content encodes to the control token '<x>'")
    monkeypatch.setattr(model, "encode", refuse)
    status, payload, _ = post(srv, chat())
    assert status == 400 and payload["error"]["code"] == "control_token"
    assert "control token '<x>'" in payload["error"]["message"]


def test_4xx_reasons_are_logged(srv, caplog):
    caplog.set_level("INFO", logger="cosa_jax.inference.server")
    post(srv, chat(min_tokens=3))
    assert any("-> 400 'min_tokens'" in r.getMessage() for r in caplog.records)


def test_stats_needs_a_key_when_a_registry_is_set(model):
    registry = parse_registry({"keys": {"sk-a": {}}}, "reg")
    with BackgroundServer(create_app(model, served_model_name=MODEL, registry=registry)) as s:
        url = s.base_url.replace("/v1", "/stats")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer sk-a"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "decode_steps" in json.loads(r.read())


def test_server_answers_after_all_of_the_above(srv):
    assert_answers(srv)

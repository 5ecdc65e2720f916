"""The chat client and journal against a real local HTTP server that injects faults.

The server (cosa_jax.testing.scripted_server, a test double) speaks the chat-completions protocol on
127.0.0.1 and counts every request, so "nothing lost, nothing sent twice" is checked at the wire.
"""

import asyncio
import os
import sqlite3
import time

import pytest

from cosa_jax.endpoint.client import (
    ChatClient,
    ChatRequest,
    EndpointConfig,
    FatalEndpointError,
    TokenBucket,
    _retry_after_s,
    run_requests_sync,
)
from cosa_jax.testing.scripted_server import FakeChatServer, echo_reply
from cosa_jax.endpoint.journal import Journal, JournalCounts, legacy_jsonl_line, read_counts, request_key


def _ep(srv, **kw):
    base = dict(model="m", base_url=srv.base_url, api_key_env="", concurrency=16, timeout_s=0.4,
                backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=8)
    base.update(kw)
    return EndpointConfig(**base)


def _reqs(n, tag="q"):
    return [ChatRequest([{"role": "user", "content": f"{tag}{i}"}]) for i in range(n)]


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_every_record_exactly_once_under_faults(tmp_path, backend):
    with FakeChatServer(fault_rate=0.5, hang_s=1.5, slow_s=0.05, latency_s=0.005, seed=1) as srv:
        reqs = _reqs(200)
        with Journal(tmp_path / "j.jsonl") as j:
            res, usage = run_requests_sync(_ep(srv, http_backend=backend), j, reqs, progress=False)
        # every kind of fault was injected and survived
        assert set(srv.faults) == {"429", "500", "slow", "hang", "garbage", "nochoices", "drop"}
        assert usage.failed == 0 and usage.retries > 0
        assert [r["text"] for r in res] == [echo_reply({"messages": q.messages}) for q in reqs]
        # at the wire: each request got exactly one good reply (none re-sent after success)
        assert len(srv.ok) == 200 and set(srv.ok.values()) == {1}
        # on disk: one row per record, all done
        assert read_counts(tmp_path / "j.sqlite") == JournalCounts(tmp_path / "j.sqlite", 200, 0, 0)
        # a rerun sends nothing at all
        n_before = srv.total_requests()
        with Journal(tmp_path / "j.jsonl") as j:
            res2, usage2 = run_requests_sync(_ep(srv, http_backend=backend), j, reqs, progress=False)
        assert srv.total_requests() == n_before and usage2.cached == 200 and res2 == res


def test_retry_after_is_honoured():
    with FakeChatServer(fault_rate=1.0, fault_kinds=("429",), max_faults_per_request=1, retry_after="0.4") as srv:
        t0 = time.monotonic()
        with Journal_tmp() as j:
            res, usage = run_requests_sync(_ep(srv, backoff_base_s=0.001), j, _reqs(3), progress=False)
        assert all(r is not None for r in res) and usage.errors == {"429": 3}
        first = {}
        gaps = []
        for t, content in srv.log:
            if content in first:
                gaps.append(t - first[content])
            else:
                first[content] = t
        assert len(gaps) == 3 and min(gaps) >= 0.38, gaps  # waited what the server asked
        assert time.monotonic() - t0 < 3


def test_retry_after_header_forms():
    assert _retry_after_s({"retry-after": "2"}) == 2.0
    assert _retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert _retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert _retry_after_s({"retry-after": "soon"}) is None
    assert _retry_after_s({}) is None


def test_gives_up_after_max_attempts_and_rerun_recovers(tmp_path):
    with FakeChatServer(fault_rate=1.0, fault_kinds=("500",), max_faults_per_request=5) as srv:
        with Journal(tmp_path / "j.jsonl") as j:
            res, usage = run_requests_sync(_ep(srv, max_attempts=3), j, _reqs(4), progress=False)
        assert res == [None] * 4 and usage.failed == 4 and srv.total_requests() == 12
        with Journal(tmp_path / "j.jsonl") as j:
            res, usage = run_requests_sync(_ep(srv, max_attempts=3), j, _reqs(4), progress=False)
        assert all(r is not None for r in res)  # attempts 4-6 hit the 6th (clean) reply for each


def test_bad_request_is_not_retried_and_auth_error_is_fatal(tmp_path):
    with FakeChatServer(fault_rate=1.0, fault_kinds=("400",), max_faults_per_request=99) as srv:
        with Journal(tmp_path / "a.jsonl") as j:
            res, usage = run_requests_sync(_ep(srv), j, _reqs(3), progress=False)
        assert res == [None] * 3 and srv.total_requests() == 3 and usage.errors == {"400": 3}
    with FakeChatServer(fault_rate=1.0, fault_kinds=("401",), max_faults_per_request=99) as srv:
        with Journal(tmp_path / "b.jsonl") as j:
            with pytest.raises(FatalEndpointError, match="model 'm'"):
                run_requests_sync(_ep(srv, concurrency=1), j, _reqs(5), progress=False)
        assert srv.total_requests() == 1  # stopped at once


def test_concurrency_limit_and_rpm_limit(tmp_path):
    with FakeChatServer(latency_s=0.05) as srv:
        with Journal(tmp_path / "c.jsonl") as j:
            run_requests_sync(_ep(srv, concurrency=5), j, _reqs(40), progress=False)
        assert srv.max_in_flight == 5
    with FakeChatServer() as srv:
        t0 = time.monotonic()
        with Journal(tmp_path / "r.jsonl") as j:
            run_requests_sync(_ep(srv, rpm=1200.0), j, _reqs(40), progress=False)
        # 20 req/s with a 1 s burst of 20: the other 20 need >= 1 s
        assert time.monotonic() - t0 >= 0.9


def test_tpm_limit_reconciles_with_reported_usage(tmp_path):
    with FakeChatServer() as srv:
        ep = _ep(srv, tpm=60 * 200.0, params={"max_tokens": 10})  # 200 tokens/s, 1 s burst
        reqs = [ChatRequest([{"role": "user", "content": f"{i:04d}" + "x" * 396}]) for i in range(6)]
        t0 = time.monotonic()
        with Journal(tmp_path / "t.jsonl") as j:
            res, usage = run_requests_sync(ep, j, reqs, progress=False)
        # the server reports ~100 prompt tokens per request: ~640 tokens at 200/s after a 200 burst
        assert usage.prompt_tokens == 600
        assert time.monotonic() - t0 >= 1.8


def test_token_bucket_waits_and_credits():
    async def go():
        b = TokenBucket(per_minute=600.0)  # 10/s, burst 10
        t0 = time.monotonic()
        await b.acquire(10)
        await b.acquire(5)  # must wait ~0.5 s
        waited = time.monotonic() - t0
        b.credit(5)  # an over-estimate returned
        t1 = time.monotonic()
        await b.acquire(5)
        return waited, time.monotonic() - t1

    waited, second = asyncio.run(go())
    assert 0.45 <= waited < 1.0 and second < 0.1


def test_missing_api_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("COSA_TEST_NO_SUCH_KEY", raising=False)
    ep = EndpointConfig(model="gpt-4o", base_url="https://example.invalid/v1", api_key_env="COSA_TEST_NO_SUCH_KEY")
    with pytest.raises(FatalEndpointError, match="COSA_TEST_NO_SUCH_KEY"):
        ChatClient(ep)


def test_client_async_with_opens_and_closes(tmp_path):
    with FakeChatServer() as srv:
        client = ChatClient(_ep(srv))
        req = _reqs(1)[0]
        with pytest.raises(RuntimeError, match="not started"):
            asyncio.run(client.complete(req))

        async def go():
            async with client as c:
                assert c is client
                first = await c.complete(req)
            return first

        assert asyncio.run(go())["text"] == echo_reply({"messages": req.messages})
        with pytest.raises(RuntimeError, match="not started"):  # closed on leaving the block
            asyncio.run(client.complete(req))
        assert srv.total_requests() == 1


def test_endpoint_from_mapping_names_bad_fields():
    with pytest.raises(ValueError, match=r"config.endpoints.judge: unknown endpoint field\(s\) \['temprature'\]"):
        EndpointConfig.from_mapping({"model": "x", "temprature": 0}, where="config.endpoints.judge")
    with pytest.raises(ValueError, match="api_type"):
        EndpointConfig.from_mapping({"model": "x", "api_type": "bedrock"})


def test_azure_endpoint_reaches_deployment_path(tmp_path, monkeypatch):
    monkeypatch.setenv("COSA_TEST_AZURE_KEY", "k")
    with FakeChatServer() as srv:
        ep = EndpointConfig(model="my-deployment", api_type="azure", api_version="2024-10-21",
                            base_url=srv.base_url.removesuffix("/v1"), api_key_env="COSA_TEST_AZURE_KEY")
        with Journal(tmp_path / "z.jsonl") as j:
            res, _ = run_requests_sync(ep, j, _reqs(2), progress=False)
        assert all(r is not None for r in res)


def test_salt_separates_identical_requests(tmp_path):
    with FakeChatServer() as srv:
        msgs = [{"role": "user", "content": "same"}]
        reqs = [ChatRequest(msgs, salt="a"), ChatRequest(msgs, salt="b"), ChatRequest(msgs, salt="a")]
        with Journal(tmp_path / "s.jsonl") as j:
            res, usage = run_requests_sync(_ep(srv), j, reqs, progress=False)
        assert srv.total_requests() == 2 and usage.cached == 1 and res[0] == res[2]


# ----- journal ------------------------------------------------------------------------


class Journal_tmp:
    def __enter__(self):
        import tempfile

        self.d = tempfile.TemporaryDirectory()
        self.j = Journal(os.path.join(self.d.name, "j.jsonl"))
        return self.j

    def __exit__(self, *exc):
        self.j.close()
        self.d.cleanup()


def _legacy(p, records, tail=b""):
    p.write_bytes("".join(legacy_jsonl_line(k, v) for k, v in records).encode() + tail)


def test_journal_torn_last_write_is_dropped(tmp_path):
    """An older JSONL journal is migrated once: its torn last line dropped, the file kept aside."""
    p = tmp_path / "j.jsonl"
    _legacy(p, [("a", {"text": "A"}), ("b", {"text": "B"})], tail=b'{"k":"c","h":"0000')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last write"):
        j = Journal(p)
    assert set(j.keys()) == {"a", "b"} and j.torn_bytes_dropped == 18 and j.migrated_records == 2
    assert not p.exists() and (tmp_path / "j.jsonl.migrated").exists() and (tmp_path / "j.sqlite").exists()
    j.put("c", {"text": "C"})
    j.close()
    with Journal(tmp_path / "j.sqlite") as j:  # read from the database now; nothing migrated again
        assert j.get("c") == {"text": "C"} and len(j) == 3 and j.migrated_records == 0


def test_journal_checksum_and_lock(tmp_path):
    p = tmp_path / "j.sqlite"
    with Journal(p) as j:
        j.put("a", {"text": "A"})
        j.put("b", {"text": "B"})
        with pytest.raises(RuntimeError, match="locked by another"):
            Journal(p)
    lines = [legacy_jsonl_line("x", {"text": "X"}), legacy_jsonl_line("y", {"text": "Y"})]
    legacy = tmp_path / "old.jsonl"
    legacy.write_text(lines[0].replace('"X"', '"Z"') + lines[1])  # bit rot in line 1
    with pytest.warns(UserWarning, match="line 1"):
        j = Journal(tmp_path / "old.sqlite")
    assert set(j.keys()) == {"y"} and j.corrupt_lines == 1
    j.close()
    # bit rot inside the database: the reply fails its checksum and counts as absent
    con = sqlite3.connect(p)
    con.execute("UPDATE requests SET reply='{\"text\":\"Z\"}' WHERE key='a'")
    con.commit()
    con.close()
    with Journal(p) as j:
        with pytest.warns(UserWarning, match="checksum"):
            assert j.get("a") is None
        assert j.get("b") == {"text": "B"}


def test_journal_statuses_exactly_once_and_concurrent_reader(tmp_path):
    p = tmp_path / "j.sqlite"
    with Journal(p) as j:
        j.plan(["a", "b", "c"])
        j.put("a", {"text": "A"})
        j.fail("b", "HTTP 500 after 3 attempts")
        assert read_counts(p) == JournalCounts(p, done=1, failed=1, pending=1)  # while open for writing
        j.put("a", {"text": "other"})  # a done request is never overwritten
        j.fail("a", "late failure")  # nor turned into a failure
        j.plan(["a"])
        assert j.get("a") == {"text": "A"} and j.status("a") == "done"
        assert "b" not in j and j.status("b") == "failed" and j.status("zz") is None
        j.put("b", {"text": "B"})  # a failed request that succeeds on a rerun
        with pytest.raises(ZeroDivisionError):
            with j.batch():
                j.put("c", {"text": "C"})
                1 / 0
        assert "c" not in j  # a batch commits all or nothing
        j.put_many([("c", {"text": "C"}), ("d", {"text": "D"})])
        assert j.counts() == {"done": 4, "failed": 0, "pending": 0}
    with pytest.raises(FileNotFoundError, match="no journal"):
        read_counts(tmp_path / "absent.sqlite")


def test_request_key_is_canonical():
    m = [{"role": "user", "content": "x"}]
    assert request_key("a", m, {"t": 0, "n": 1}) == request_key("a", m, {"n": 1, "t": 0})
    assert request_key("a", m, {"t": 0}) != request_key("b", m, {"t": 0})
    assert request_key("a", m, {"t": 0}) != request_key("a", m, {"t": 1})

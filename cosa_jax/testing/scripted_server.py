"""TEST DOUBLE: a scripted, fault-injecting OpenAI-compatible chat-completions server.

Not a model. It answers deterministically so that tests and the benchmark can run the synthesis
and evaluation pipelines offline; they start it themselves and pass its ``base_url`` as an
ordinary endpoint (no production config selects it):
- ``echo`` replies: a hash of the request (client tests, benchmark);
- ``scripted`` replies: plays both generator and judge in the formats of ``cosa_jax.judges``,
  using the shipped prompt labels (``mini_prompts.jsonl``) so that the pipeline yields a mix of
  refusals, allowed-risk and disallowed-risk answers. Every scripted response carries a visible
  ``[scripted-risk: ...]`` marker that the scripted judge reads back. A chat is a judge's when
  ``recognize_judge`` matches it against that judge's own ``messages`` template; anything else is
  a generation request.
Faults (429 with Retry-After, 500, slow replies, hung replies, garbage bodies, dropped
connections) are injected deterministically per (request, attempt), and every request is counted
so tests can check that nothing completed is sent twice.

Run standalone: ``python -m cosa_jax.testing.scripted_server --port 8001 --latency 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from aiohttp import web

from cosa_jax import judges
from cosa_jax.taxonomy import Category, Taxonomy, load_taxonomy, parse_categories

TRANSIENT_FAULTS = ("429", "500", "slow", "hang", "garbage", "nochoices", "drop")
FAULT_KINDS = TRANSIENT_FAULTS + ("400", "401")  # the last two are permanent: retrying cannot help

REFUSAL = "I'm sorry, but I can't help with that request."
_RISK_MARK_RE = re.compile(r"\[scripted-risk:\s*([^\]]*)\]")


def _h(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def request_fingerprint(body: dict) -> str:
    """What the server counts per request: model + messages + sampling params."""
    keep = {k: v for k, v in body.items() if k not in ("stream",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


# ----- reply scripts ---------------------------------------------------------------------


def echo_reply(body: dict) -> str:
    last = body["messages"][-1]["content"]
    return "echo:" + hashlib.sha256(str(last).encode()).hexdigest()[:16]


_FIELD = "\x00{}\x00"  # stands in for a builder argument while reading a judge's template


@functools.cache
def _judge_templates(tax: Taxonomy) -> tuple[tuple[judges.Judge, tuple[tuple[str, re.Pattern], ...]], ...]:
    """Per judge, (role, regex) per message: the judge's own chat with its fields as groups."""
    out = []
    # The suite judges come last: Llama Guard's bare (user, assistant) chat matches any such pair.
    for judge in (*judges.judges_for(tax).values(), *judges.SUITE_JUDGES.values()):
        chat = judge.messages(*(_FIELD.format(f) for f in judge.fields))
        pats = []
        for m in chat:
            rx, seen = "", set()
            for k, part in enumerate(re.split("\x00(\\w+)\x00", m["content"])):
                if k % 2 == 0:
                    rx += re.escape(part)
                else:
                    rx += f"(?P={part})" if part in seen else f"(?P<{part}>.*?)"
                    seen.add(part)
            pats.append((m["role"], re.compile(rx, re.DOTALL)))
        out.append((judge, tuple(pats)))
    return tuple(out)


def recognize_judge(
    messages: Sequence[Mapping[str, Any]], taxonomy: Taxonomy | str | None = None
) -> tuple[judges.Judge, dict[str, str]] | None:
    """(judge, its builder's arguments) when ``messages`` is a judge's chat (risk judges of
    ``taxonomy``, default the shipped one), else None."""
    for judge, pats in _judge_templates(load_taxonomy(taxonomy)):
        if len(messages) != len(pats):
            continue
        fields: dict[str, str] = {}
        for m, (role, rx) in zip(messages, pats):
            hit = rx.fullmatch(str(m.get("content", ""))) if m.get("role") == role else None
            if hit is None:
                break
            fields.update(hit.groupdict())
        else:
            return judge, fields
    return None


_KEYWORDS: dict[Category, tuple[str, ...]] = {
    Category.FINANCIAL_CRIME: ("steal", "scam", "fraud", "pickpocket", "shoplift", "launder", "phishing", "embezzl", "burglar", "rob"),
    Category.DISCRIMINATION: ("insult", "slur", "stereotype", "racist", "sexist", "discriminat", "bully"),
    Category.VIOLENCE: ("fight", "hurt", "attack", "assault", "kill", "punch", "self-harm", "violent"),
    Category.PRIVACY: ("address of", "track", "spy", "personal data", "dox", "password", "private information", "stalk"),
    Category.DRUGS: ("drug", "cocaine", "weed", "cannabis", "overdose", "pills"),
    Category.SEXUAL: ("cheat on", "affair", "harass", "explicit"),
    Category.WEAPONS: ("gun", "firearm", "explosive", "bomb", "arson", "weapon"),
}


class PromptLabels:
    """Prompt text -> categories: from the shipped label file (or ``table``), else keyword rules
    (the default taxonomy only; another taxonomy's unlisted prompts carry no risk)."""

    def __init__(self, table: dict[str, tuple[Category, ...]] | None = None, taxonomy: Taxonomy | str | None = None):
        self.taxonomy = load_taxonomy(taxonomy)
        self.table = table if table is not None else _load_shipped_labels()

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], taxonomy: Taxonomy | str | None = None) -> "PromptLabels":
        """From prompt rows with ``prompt`` and ``categories`` (names of ``taxonomy``)."""
        tax = load_taxonomy(taxonomy)
        return cls({" ".join(r["prompt"].lower().split()): tax.parse_categories(r["categories"]) for r in rows}, tax)

    def __call__(self, prompt: str) -> tuple[Category, ...]:
        key = " ".join(prompt.lower().split())
        if key in self.table:
            return self.table[key]
        if self.taxonomy is not load_taxonomy(None):
            return ()
        low = prompt.lower()
        return parse_categories(c for c, words in _KEYWORDS.items() if any(w in low for w in words))


def _load_shipped_labels() -> dict[str, tuple[Category, ...]]:
    from cosa_jax.synth.inputs import load_mini_prompts  # local import: inputs imports datasets

    return {" ".join(r["prompt"].lower().split()): parse_categories(r["categories"]) for r in load_mini_prompts()}


def _allowed_from_system(system: str, tax: Taxonomy) -> tuple[Category, ...]:
    out = []
    for line in system.splitlines():
        m = re.match(r"-\s+(.+?):\s", line)
        if m:
            try:
                out.append(tax.parse_category(m.group(1)))
            except ValueError:
                pass
    return tax.parse_categories(out)


# Our categories -> the closest Llama Guard 3 hazard codes (the scripted classifier's answer).
_GUARD_CODES = {
    Category.VIOLENCE: "S1", Category.FINANCIAL_CRIME: "S2", Category.DRUGS: "S2", Category.OTHER: "S2",
    Category.PRIVACY: "S7", Category.WEAPONS: "S9", Category.DISCRIMINATION: "S10", Category.SEXUAL: "S12",
}


def _risk_json(cats: tuple[Category, ...], tax: Taxonomy) -> str:
    return json.dumps({c.value: (c in cats) for c in tax.categories})


class ScriptedReplies:
    """Deterministic generator + judge. ``judge_garbage_rate`` makes some judge replies unparseable."""

    def __init__(self, labels: PromptLabels | None = None, judge_garbage_rate: float = 0.0, seed: int = 0):
        self.labels = labels or PromptLabels()
        self.taxonomy = self.labels.taxonomy  # judges and configs are read in the labels' taxonomy
        self.judge_garbage_rate = judge_garbage_rate
        self.seed = seed

    def _garbage(self, user: str, temperature: Any) -> bool:
        # keyed on the temperature too, so a re-ask at another temperature can recover
        h = _h(self.seed, "garbage", user, temperature)
        return self.judge_garbage_rate > 0 and (h % 10_000) < self.judge_garbage_rate * 10_000

    def __call__(self, body: dict) -> str:
        msgs = body["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        hit = recognize_judge(msgs, self.taxonomy)
        if hit is None:
            return self._generate(system, user)
        if self._garbage(user, body.get("temperature")):
            return "I think this is fine overall, hard to say."  # no marker, no JSON
        return self._judge(*hit)

    def _judge(self, judge: judges.Judge, fields: dict[str, str]) -> str:
        tax = self.taxonomy
        if judge.name == "prompt_risk":
            cats = self.labels(fields["prompt"])
            lines = "\n".join(f"{c.value}: {'likely' if c in cats else 'unlikely'}." for c in tax.categories)
            return f"Reasoning per category:\n{lines}\n{_risk_json(cats, tax)}"
        response = fields["response"]
        mark = _RISK_MARK_RE.search(response)
        risks = () if not mark or mark.group(1).strip() in ("", "none") else tax.parse_categories(
            s for s in mark.group(1).split("|") if s.strip()
        )
        refused = response.startswith(REFUSAL)
        if judge.name == "response_risk":
            return f"The response was checked category by category.\n```json\n{_risk_json(risks, tax)}\n```"
        if judge.name == "addressed":
            return "The response " + ("declines." if refused else "answers the question.") + (
                "\n[[NO]]" if refused else "\n[[YES]]"
            )
        if judge.name == "helpfulness":
            return "Justification: scripted.\nRating: [[" + ("0" if refused else str(3 + _h(response) % 3)) + "]]"
        if judge.name == "compliance":
            guideline = fields["config_text"].lower()
            allowed = tax.parse_categories(c for c in tax.categories if c.value.lower() in guideline)
            ok = set(risks) <= {c for c in allowed if c.allowable}
            return "Checked against the guideline.\n" + ("[[YES]]" if ok else "[[NO]]")
        if judge is judges.OVER_REFUSAL:
            cls = "full_refusal" if refused else ("partial_refusal" if REFUSAL in response else "full_compliance")
            return f"The response was read for refusals.\n[[{cls}]]"
        if judge is judges.GENERAL_SAFETY:
            return "Checked for harm.\n" + ("[[UNSAFE]]" if risks else "[[SAFE]]")
        if judge is judges.LLAMA_GUARD:
            codes = sorted({_GUARD_CODES.get(c, "S2") for c in risks}, key=lambda x: int(x[1:]))
            return "unsafe\n" + ",".join(codes) if risks else "safe"
        raise ValueError(f"the scripted judge has no script for judge {judge.name!r}")

    def _generate(self, system: str, prompt: str) -> str:
        cats = tuple(c for c in self.labels(prompt) if c.allowable)
        allowed = _allowed_from_system(system, self.taxonomy)
        style = _h(self.seed, system, prompt) % 4
        if not cats:
            risk: tuple[Category, ...] = ()
        elif not allowed and "None." not in system:  # no rendered config: the safe generator
            style = 0 if style < 3 else 1  # the safe generator mostly refuses risky prompts
            risk = ()
        elif style == 0:
            risk = ()
        elif style in (1, 2):
            risk = tuple(c for c in cats if c in allowed)  # follows the config
        else:
            risk = cats  # ignores the config
        if style == 0 and cats:
            return f"{REFUSAL} [scripted-risk: none]"
        topic = " ".join(prompt.split()[:8])
        names = " | ".join(c.value for c in risk) or "none"
        return f"Here is a scripted answer about '{topic}...': step one, step two, step three. [scripted-risk: {names}]"


# ----- the server ------------------------------------------------------------------------


class FakeChatServer:
    """aiohttp chat-completions server in a background thread (or standalone via ``serve``).

    ``fault_rate``: probability that an attempt of a request gets one of ``fault_kinds`` (drawn
    deterministically from the request fingerprint and attempt number); after
    ``max_faults_per_request`` faulty attempts a request always succeeds.
    """

    def __init__(
        self,
        reply: Callable[[dict], str] = echo_reply,
        *,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = TRANSIENT_FAULTS,
        max_faults_per_request: int = 3,
        slow_s: float = 0.2,
        hang_s: float = 5.0,
        retry_after: str = "0.01",
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        bad = set(fault_kinds) - set(FAULT_KINDS)
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; known: {FAULT_KINDS}")
        self.reply = reply
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_kinds = fault_kinds
        self.max_faults = max_faults_per_request
        self.slow_s, self.hang_s, self.retry_after = slow_s, hang_s, retry_after
        self.seed = seed
        self.host, self.port = host, port
        self.attempts: Counter[str] = Counter()  # fingerprint -> requests received
        self.ok: Counter[str] = Counter()  # fingerprint -> valid replies sent
        self.faults: Counter[str] = Counter()  # fault kind -> count
        self.log: list[tuple[float, str]] = []  # (arrival time, last message content) per request
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def total_requests(self) -> int:
        return sum(self.attempts.values())

    def _fault_for(self, fp: str, attempt: int) -> str | None:
        if attempt > self.max_faults or self.fault_rate <= 0:
            return None
        if (_h(self.seed, fp, attempt) % 10_000) >= self.fault_rate * 10_000:
            return None
        return self.fault_kinds[_h(self.seed, "kind", fp, attempt) % len(self.fault_kinds)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "request body is not JSON"}}, status=400)
        fp = request_fingerprint(body)
        with self._lock:
            self.attempts[fp] += 1
            attempt = self.attempts[fp]
            msgs = body.get("messages") or [{}]
            self.log.append((time.monotonic(), str(msgs[-1].get("content", ""))))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._fault_for(fp, attempt)
            if fault:
                with self._lock:
                    self.faults[fault] += 1
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if fault == "429":
                return web.json_response(
                    {"error": {"message": "rate limited (injected)", "type": "rate_limit"}},
                    status=429,
                    headers={"Retry-After": self.retry_after},
                )
            if fault in ("400", "401"):
                return web.json_response({"error": {"message": f"injected {fault}"}}, status=int(fault))
            if fault == "500":
                return web.json_response({"error": {"message": "internal error (injected)"}}, status=500)
            if fault == "garbage":
                return web.Response(text="<html>upstream hiccup{{{", content_type="application/json")
            if fault == "nochoices":
                return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
            if fault == "drop":
                request.transport.close()
                return web.Response(status=500)
            if fault == "hang":
                await asyncio.sleep(self.hang_s)  # the client should time out before this
                return web.json_response({"error": {"message": "too late"}}, status=504)
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
            text = self.reply(body)
            with self._lock:
                self.ok[fp] += 1
            n_in = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4
            n_out = max(1, len(text) // 4)
            return web.json_response(
                {
                    "id": f"chatcmpl-{fp[:12]}-{attempt}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
                }
            )
        finally:
            with self._lock:
                self.in_flight -= 1

    def _app(self) -> web.Application:
        app = web.Application()
        for path in ("/v1/chat/completions", "/chat/completions", "/openai/deployments/{dep}/chat/completions"):
            app.router.add_post(path, self._handle)
        return app

    async def _start_async(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "FakeChatServer":
        """Serve from a daemon thread; returns once the port is bound."""
        ready = threading.Event()
        err: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start_async())
            except BaseException as e:  # surface bind errors to the caller
                err.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-chat-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if err:
            raise err[0]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            await self._runner.cleanup()
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:  # hung handlers: cancel rather than leave them pending
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "FakeChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="TEST DOUBLE chat-completions server (no model).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--latency", type=float, default=0.0, help="fixed seconds per request")
    ap.add_argument("--reply", choices=("echo", "scripted"), default="echo")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="share of attempts that get a fault")
    ap.add_argument("--fault-kinds", default=",".join(TRANSIENT_FAULTS),
                    help=f"comma-separated, from {','.join(FAULT_KINDS)} (hang: the client times out; "
                         "drop: the connection is closed)")
    ap.add_argument("--max-faults", type=int, default=3, help="faulty attempts per request before it succeeds")
    ap.add_argument("--retry-after", default="0.01", help="Retry-After header of an injected 429")
    ap.add_argument("--hang-s", type=float, default=5.0, help="how long a 'hang' fault holds the request")
    ap.add_argument("--judge-garbage-rate", type=float, default=0.0)
    ap.add_argument("--taxonomy", default="", help="taxonomy file the scripted judge answers in (default: cosa)")
    ap.add_argument("--labels", default="", help="JSONL of {prompt, categories} in that taxonomy (default: the mini set)")
    a = ap.parse_args(argv)
    labels = None
    if a.labels or a.taxonomy:
        if not a.labels:
            ap.error("--taxonomy needs --labels: a JSONL of {prompt, categories} in that taxonomy")
        with open(a.labels, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        labels = PromptLabels.from_rows(rows, a.taxonomy or None)
    reply = echo_reply if a.reply == "echo" else ScriptedReplies(labels, judge_garbage_rate=a.judge_garbage_rate)
    kinds = tuple(k.strip() for k in a.fault_kinds.split(",") if k.strip())
    srv = FakeChatServer(reply, latency_s=a.latency, fault_rate=a.fault_rate, fault_kinds=kinds,
                         max_faults_per_request=a.max_faults, retry_after=a.retry_after, hang_s=a.hang_s,
                         host=a.host, port=a.port)

    async def serve():
        await srv._start_async()
        print(f"fake chat server (test double) on {srv.base_url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

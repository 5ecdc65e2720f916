"""Grammar engines on SmolLM2's 49,152-token vocabulary: xgrammar vs llguidance vs outlines-core.

For each judge-shaped constraint (the 8-way risk JSON object, a reasoning + verdict JSON object,
the ``[[YES]]``/``[[NO]]`` choice, the ``Rating: [[r]]`` regex) it measures, per engine: the
compile time of the constraint (tokenizer-level setup excluded and reported once) and the
host time per generated token to fill the next-token bitmask and accept the token, walking the
tokenization of a valid answer to its end (the last mask must allow end-of-sequence). This is
the measurement ``cosa_jax.inference.constraints`` picked its engine on.
Run: ``python bench/grammar_engines.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402,F401  (sets the cache / offline environment first)

import numpy as np  # noqa: E402

CATEGORIES = [
    "Financial Crime and Theft", "Discrimination and Verbal Abuse", "Violence",
    "Illegal Drug-Related Activities and Substance Abuse", "Privacy Violations",
    "Sexual Misconduct, Exploitation, and Infidelity",
    "Weapons, Explosives, Arson, and Illegal Firearm Transactions", "Other Harms"]


def judge_cases():
    """(name, kind, spec, a valid answer) for the shapes the judges ask for."""
    risk = {"type": "object", "properties": {c: {"type": "boolean"} for c in CATEGORIES},
            "required": CATEGORIES, "additionalProperties": False}
    risk_answer = json.dumps({c: i % 3 == 0 for i, c in enumerate(CATEGORIES)})
    verdict = {"type": "object",
               "properties": {"reasoning": {"type": "string", "maxLength": 400},
                              "rating": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5]}},
               "required": ["reasoning", "rating"], "additionalProperties": False}
    verdict_answer = json.dumps({"reasoning": "The response answers the question accurately, "
                                 "names the main steps and gives one practical caveat.",
                                 "rating": 4})
    return [("risk_set json", "json", risk, risk_answer),
            ("reasoning+rating json", "json", verdict, verdict_answer),
            ("yes/no choice", "regex", r"\[\[(YES|NO)\]\]", "[[NO]]"),
            ("rating regex", "regex", r"Rating: \[\[[0-5]\]\]", "Rating: [[3]]")]


def summarize(name, compile_s, step_s):
    step_us = np.asarray(step_s) * 1e6
    return (f"{name:<14} compile {compile_s * 1e3:8.1f} ms   per token: median "
            f"{statistics.median(step_us):8.1f} us, p90 {np.percentile(step_us, 90):8.1f} us, "
            f"max {step_us.max():8.1f} us ({len(step_us)} steps)")


ENGINES = {}  # name -> engine class, in the order they are defined


class Engine:
    """One grammar engine: ``walk`` times ``step`` (fill the mask, take the token) per token;
    ``accepted`` and ``finished`` check the result outside the timed span. A subclass names
    itself in its class line (``class X(Engine, name=...)``), which registers it in ENGINES."""

    name = ""

    def __init_subclass__(cls, *, name: str, **kw):
        super().__init_subclass__(**kw)
        cls.name = name
        ENGINES[name] = cls

    def __init__(self, tok, vocab):
        self.vocab = vocab
        self.load(tok)

    def walk(self, compiled, ids, eos):
        state = self.start(compiled)
        times = []
        for t in ids + [eos]:
            t0 = time.perf_counter()
            out = self.step(state, t, eos)
            times.append(time.perf_counter() - t0)
            assert self.accepted(state, t, out), f"{self.name} refused token {t}{self.error(state)}"
        assert self.finished(state)
        return times

    def accepted(self, state, t, out):
        return out

    def error(self, state):
        return ""


class XGrammar(Engine, name="xgrammar"):
    def load(self, tok):
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab)

    def compile(self, kind, spec):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        return compiler.compile_regex(spec)

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.vocab)

    def step(self, state, t, eos):
        matcher, mask = state
        matcher.fill_next_token_bitmask(mask, 0)
        return matcher.accept_token(t)

    def finished(self, state):
        return state[0].is_terminated()


class LLGuidance(Engine, name="llguidance"):
    def load(self, tok):
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        self.ll = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab)

    def compile(self, kind, spec):
        g = (self.ll.LLMatcher.grammar_from_json_schema(
                json.dumps(spec), defaults={"whitespace_flexible": False, "item_separator": ", ",
                                           "key_separator": ": "})
             if kind == "json" else self.ll.LLMatcher.grammar_from_regex(spec))
        m = self.ll.LLMatcher(self.lltok, g)
        assert not m.is_error(), m.get_error()
        return m

    def start(self, matcher):
        return matcher, self.ll.numpy.allocate_token_bitmask(1, self.vocab)

    def step(self, state, t, eos):
        matcher, mask = state
        self.ll.numpy.fill_next_token_bitmask(matcher, mask, 0)
        return matcher.consume_token(t)

    def error(self, state):
        return f": {state[0].get_error()}"

    def finished(self, state):
        return state[0].is_stopped() and not state[0].is_error()


class OutlinesCore(Engine, name="outlines-core"):
    def load(self, tok):
        import outlines_core

        from cosa_jax.models.llama3_tokenizer import byte_to_unicode
        self.oc = outlines_core

        # Byte-level BPE token strings back to bytes (GPT-2's printable-byte alphabet).
        decoder = {c: b for b, c in byte_to_unicode().items()}
        special = set(tok.all_special_ids)
        table: dict[bytes, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i in special or i >= self.vocab:
                continue
            table.setdefault(bytes(decoder[ch] for ch in token), []).append(i)
        self.eos = tok.eos_token_id
        self.vocabulary = outlines_core.Vocabulary(self.eos, table)

    def compile(self, kind, spec):
        from outlines_core.json_schema import build_regex_from_schema
        regex = build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        return self.oc.Index(regex, self.vocabulary)

    def start(self, index):
        return self.oc.Guide(index), np.zeros((self.vocab + 31) // 32, np.int32)

    def step(self, state, t, eos):
        guide, mask = state
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        if t != eos:
            guide.advance(t)

    def accepted(self, state, t, out):
        mask = state[1]
        return (mask[t // 32] >> (t % 32)) & 1

    def finished(self, state):
        return state[0].is_finished()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3, help="walks per case (the median step is kept)")
    # xgrammar and outlines-core are the contenders (extra 'grammar-bench'); llguidance is ours.
    p.add_argument("--engines", default="xgrammar,llguidance,outlines-core")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from cosa_jax.models import EMBEDDED_MODEL, resolve_model_dir

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(EMBEDDED_MODEL)))
    vocab = len(tok)
    eos = tok.eos_token_id
    print(f"[grammar] SmolLM2 tokenizer, vocab {vocab}, eos {eos}")
    engines = []
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        try:
            engines.append(ENGINES[name](tok, vocab))
        except ImportError as e:
            print(f"[grammar] {name:<14} not installed ({e}); pip install -e '.[grammar-bench]'")
            continue
        print(f"[grammar] {name:<14} tokenizer setup {time.perf_counter() - t0:6.2f} s")
    totals = {e.name: [] for e in engines}
    for case, kind, spec, answer in judge_cases():
        ids = tok.encode(answer, add_special_tokens=False)
        print(f"[grammar] case {case!r}: {len(ids)} answer tokens + eos")
        for e in engines:
            t0 = time.perf_counter()
            compiled = e.compile(kind, spec)
            compile_s = time.perf_counter() - t0
            walks = [e.walk(compiled if e.name != "llguidance" else e.compile(kind, spec), ids, eos)
                     for _ in range(args.reps)]
            steps = [statistics.median(col) for col in zip(*walks)]
            totals[e.name].extend(steps)
            print(f"[grammar]   {summarize(e.name, compile_s, steps)}")
    for name, steps in totals.items():
        print(f"[grammar] {name:<14} all cases: median {statistics.median(steps) * 1e6:8.1f} us/token, "
              f"mean {statistics.fmean(steps) * 1e6:8.1f} us/token")


if __name__ == "__main__":
    main()

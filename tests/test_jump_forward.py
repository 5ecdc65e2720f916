"""Jump-forward decoding: a grammar-forced run of tokens is written in one chunk instead of one
decode step per token. The output equals stepping one token at a time under masks that allow
only the grammar's forced token (token for token, sampled rows too); on the real model it
equals plain stepping outright; max_tokens, stop strings, log-probs and mixed batches hold.

Why "stepping under the forced token's mask" is the exact reference on a random model: where
the grammar forces bytes, a plain mask still allows every token spelling them ("{" then "\\"" as
well as "{\\""); a random model picks odd spellings, so its text can differ after a forced run
(the same forced bytes, other tokens, hence other logits later). Jump-forward writes
llguidance's own tokenisation of the forced bytes; a trained model picks that one too
(the slow test on SmolLM2 asserts plain equality).
"""

import json
import re

import jax
import jsonschema
import numpy as np
import pytest

from cosa_jax import judges
from cosa_jax.chat import encode_messages
from cosa_jax.inference.constraints import ConstraintCompiler, OutputConstraint
from cosa_jax.inference.engine import Engine
from cosa_jax.inference.sampler import SamplingParams, generate
from cosa_jax.inference.server import EngineConstraint
from cosa_jax.models import EMBEDDED_MODEL, load_hf, load_tokenizer
from cosa_jax.models.llama import forward
from cosa_jax.testing.model_fixtures import make_hf_model

REGEX = r"Answer: (yes|no)\. Confidence: [0-9]{2}%"
SHAPES = {
    "risk_set": ("json_schema", judges.RISK_SET_SCHEMA.json_schema),
    "yes_no": ("choice", judges.YES_NO_SCHEMA.choices),
    "rating": ("choice", judges.RATING_SCHEMA.choices),
    "regex": ("regex", REGEX),
}


class Stepped:
    """The reference: one decode step per token, where the grammar forces a token the mask
    allows that token alone (no ``forced_tokens``, so the engine never jumps)."""

    def __init__(self, state, vocab):
        self.state, self.vocab = state, vocab
        self.words = -(-vocab // 32)

    def next_mask(self):
        forced = self.state.matcher.compute_ff_tokens()
        if forced:
            mask = np.zeros(self.vocab, bool)
            mask[forced[0]] = True
            return mask
        row = np.zeros(self.words, np.int32)
        self.state.fill_mask(row)
        return row

    def accept(self, token):
        self.state.accept(token)

    def is_terminated(self):
        return self.state.is_terminated


@pytest.fixture(scope="module")
def tiny49k(tmp_path_factory):
    """A random tiny model over SmolLM2's vocabulary, its tokenizer and a compiler."""
    path = tmp_path_factory.mktemp("tiny_jump_forward")
    make_hf_model(path, vocab_size=49152)
    model, cfg = load_hf(path)
    tok = load_tokenizer(EMBEDDED_MODEL)
    compiler = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2])
    return model.params(), cfg, tok, compiler


def prompt_ids(tok, text):
    return encode_messages(tok, [{"role": "user", "content": text}])


def make_constraint(compiler, cfg, shape, stepped=False):
    state = compiler.start(OutputConstraint(*SHAPES[shape]))
    return Stepped(state, cfg.vocab_size) if stepped else EngineConstraint(state, -(-cfg.vocab_size // 32))


def run(engine, requests):
    """Submit (prompt, sampling, kwargs) requests, step until all are done, return results."""
    handles = [engine.submit(p, s, **kw) for p, s, kw in requests]
    while not all(h.done.is_set() for h in handles):
        engine.step()
    return [h.result() for h in handles]


def assert_matches(shape, text):
    kind, value = SHAPES[shape]
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), value)
    elif kind == "choice":
        assert text in value
    else:
        assert re.fullmatch(value, text), text


def same_output(a, b):
    assert a.token_ids == b.token_ids
    assert a.text == b.text and a.finish_reason == b.finish_reason


@pytest.mark.parametrize("shape", list(SHAPES))
def test_judge_shapes_equal_stepping_with_far_fewer_decode_steps(tiny49k, shape):
    params, cfg, tok, compiler = tiny49k
    prompts = [prompt_ids(tok, f"Judge request {k}.") for k in range(3)]
    results = {}
    for name, jump, stepped in (("jump", True, False), ("stepped", True, True),
                                ("plain", False, False)):
        engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=4, jump_forward=jump)
        results[name] = run(engine, [
            (p, SamplingParams(max_new_tokens=200), dict(constraint=make_constraint(
                compiler, cfg, shape, stepped))) for p in prompts])
        results[name + "_stats"] = engine.stats
    for jump, stepped, plain in zip(results["jump"], results["stepped"], results["plain"]):
        same_output(jump, stepped)
        for r in (jump, plain):
            assert r.finish_reason == "stop" and r.token_ids[-1] == 2
            assert_matches(shape, r.text)
    on, off = results["jump_stats"], results["stepped_stats"]
    assert on.forced_tokens > 0 and results["plain_stats"].forced_tokens == 0
    # Every forced token saves a decode step; what is left are (some of) the free choices.
    assert on.decode_steps + on.forced_tokens // len(prompts) <= off.decode_steps
    if shape in ("risk_set", "yes_no", "rating"):
        # each free choice is sampled by the forced chunk that follows the one before it
        assert on.decode_steps <= 1


def test_mixed_batch_constrained_free_greedy_and_sampled(tiny49k):
    params, cfg, tok, compiler = tiny49k
    p1, p2, p3 = (prompt_ids(tok, t) for t in ("One.", "Two, a longer prompt.", "Three"))
    hot = dict(temperature=1.0, top_p=0.95, seed=11)

    def requests(stepped):
        def c(shape):
            return dict(constraint=make_constraint(compiler, cfg, shape, stepped))
        return [(p1, SamplingParams(max_new_tokens=150), c("risk_set")),
                (p2, SamplingParams(max_new_tokens=150, **hot), c("risk_set")),
                (p3, SamplingParams(max_new_tokens=12), {}),
                (p1, SamplingParams(max_new_tokens=20, **hot), c("rating")),
                (p2, SamplingParams(max_new_tokens=9, temperature=0.7, seed=5), {}),
                (p3, SamplingParams(max_new_tokens=30, **hot), c("regex")),
                (p2, SamplingParams(max_new_tokens=10, **hot), c("yes_no"))]

    # 4 slots for 7 requests: rows join while others are mid-run.
    on = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=4, chunk_sizes=(16, 64))
    got = run(on, requests(False))
    ref = run(Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=4, chunk_sizes=(16, 64)),
              requests(True))
    for g, r in zip(got, ref):
        same_output(g, r)
    for g, shape in zip(got, ("risk_set", "risk_set", None, "rating", None, "regex", "yes_no")):
        if shape is not None:
            assert g.finish_reason == "stop"
            assert_matches(shape, g.text)
    free = generate(params, cfg, [p3], SamplingParams(max_new_tokens=12), eos_ids=[2])[0]
    assert got[2].token_ids == free.token_ids
    assert on.stats.forced_tokens > 0 and on.active == 0


@pytest.mark.parametrize("logprobs", [None, 3])
@pytest.mark.parametrize("tight_cache", [False, True])
def test_max_tokens_inside_a_forced_run_is_length(tiny49k, logprobs, tight_cache):
    """Cut inside a forced key name, with room for the padded chunk or with a cache that ends
    right there (max_cache_len = what the request needs: runs near the end are shortened)."""
    params, cfg, tok, compiler = tiny49k
    prompt = prompt_ids(tok, "Rate.")
    stepped = run(Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=2), [
        (prompt, SamplingParams(max_new_tokens=200),
         dict(constraint=make_constraint(compiler, cfg, "risk_set", True)))])[0]
    # inside the forced run after the second free choice: ', "Illegal Drug-Related ..":'
    at = [tok.decode(stepped.token_ids[:k]) for k in range(len(stepped.token_ids))]
    cut = next(k for k, text in enumerate(at) if text.endswith("Illegal Drug"))
    sizes = dict(chunk_sizes=(8, 16), min_cache_len=8)
    limit = Engine(params, cfg, eos_ids=[2], **sizes).cache_need(len(prompt), cut)
    results = []
    for stepped_run in (False, True):
        engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=2,
                        max_cache_len=limit if tight_cache else None, **sizes)
        results.append(run(engine, [(prompt, SamplingParams(max_new_tokens=cut), dict(
            logprobs=logprobs, constraint=make_constraint(compiler, cfg, "risk_set", stepped_run)))])[0])
        if tight_cache:
            assert engine._cache_len == limit
    jumped, ref = results
    same_output(jumped, ref)
    assert jumped.finish_reason == "length" and len(jumped.token_ids) == cut
    assert jumped.text.endswith("Illegal Drug")
    if logprobs is not None:
        assert len(jumped.logprobs) == cut
        for a, b in zip(jumped.logprobs, ref.logprobs):
            assert a.token_id == b.token_id
            np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_stop_string_inside_a_forced_run_stops_there(tiny49k):
    params, cfg, tok, compiler = tiny49k
    prompt = prompt_ids(tok, "Judge.")
    got = []
    for stepped in (False, True):
        engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=2)
        pieces = []
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=200, stop=("Crime and",)),
                               constraint=make_constraint(compiler, cfg, "risk_set", stepped),
                               on_output=lambda out, pieces=pieces: pieces.append(out.text))
        while not handle.done.is_set():
            engine.step()
        got.append((handle.result_value, "".join(pieces)))
    (jumped, streamed), (ref, _) = got
    same_output(jumped, ref)
    assert jumped.finish_reason == "stop" and streamed == jumped.text
    assert jumped.text.endswith('"Financial ') and "Crime" not in jumped.text


@pytest.mark.parametrize("shape", ["risk_set", "rating"])
def test_logprobs_of_forced_tokens_equal_log_softmax_of_the_models_forward(tiny49k, shape):
    params, cfg, tok, compiler = tiny49k
    prompt = prompt_ids(tok, "Give the verdict.")
    engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=4, chunk_sizes=(8, 32))
    # a free row in the same chunks, and an echo request: their log-probs share the programs
    res, _, echo = run(engine, [
        (prompt, SamplingParams(max_new_tokens=150), dict(
            logprobs=5, constraint=make_constraint(compiler, cfg, shape))),
        (prompt[:7], SamplingParams(max_new_tokens=5), dict(logprobs=2)),
        (prompt, SamplingParams(max_new_tokens=20), dict(
            logprobs=4, prompt_logprobs=3, constraint=make_constraint(compiler, cfg, shape)))])
    assert engine.stats.forced_tokens > 0
    seq = prompt + res.token_ids
    logp = np.asarray(jax.nn.log_softmax(forward(params, cfg, np.asarray([seq], np.int32))[0], -1))
    assert len(res.logprobs) == len(res.token_ids)
    for j, lp in enumerate(res.logprobs):        # token j is predicted at len(prompt) + j - 1
        row = logp[len(prompt) + j - 1]
        assert lp.token_id == seq[len(prompt) + j]
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:5], atol=1e-4)
        assert [t for t, _ in lp.top][0] == int(np.argmax(row))
    seq = prompt + echo.token_ids
    logp = np.asarray(jax.nn.log_softmax(forward(params, cfg, np.asarray([seq], np.int32))[0], -1))
    assert echo.prompt_logprobs[0] is None and len(echo.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        np.testing.assert_allclose(echo.prompt_logprobs[t].logprob, logp[t - 1, prompt[t]],
                                   atol=1e-4)
    for j, lp in enumerate(echo.logprobs):
        np.testing.assert_allclose(lp.logprob, logp[len(prompt) + j - 1, lp.token_id], atol=1e-4)
        assert len(lp.top) == 4


def test_jump_forward_off_never_asks_for_forced_tokens(tiny49k):
    params, cfg, tok, compiler = tiny49k

    class Counting(EngineConstraint):
        asked = 0

        def forced_tokens(self, limit):
            Counting.asked += 1
            return super().forced_tokens(limit)

    state = compiler.start(OutputConstraint(*SHAPES["yes_no"]))
    engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=1, jump_forward=False)
    res = run(engine, [(prompt_ids(tok, "?"), SamplingParams(max_new_tokens=10),
                        dict(constraint=Counting(state, engine.words)))])[0]
    assert res.text in judges.YES_NO_SCHEMA.choices and Counting.asked == 0
    assert engine.stats.forced_tokens == 0


@pytest.mark.slow
def test_embedded_model_outputs_equal_plain_stepping():
    """On the trained model, greedy outputs with and without jump-forward are the same tokens:
    where the grammar forces bytes the model spells them as the grammar's tokenisation does."""
    model, cfg = load_hf(EMBEDDED_MODEL)
    params, tok = model.params(), load_tokenizer(EMBEDDED_MODEL)
    compiler = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2])
    prompts = [prompt_ids(tok, f"Is it risky to {w}? Answer in the required format.")
               for w in ("pick a lock", "bake bread")]
    results, stats = {}, {}
    for jump in (True, False):
        engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=8, jump_forward=jump)
        results[jump] = run(engine, [
            (p, SamplingParams(max_new_tokens=160),
             dict(constraint=make_constraint(compiler, cfg, shape)))
            for shape in SHAPES for p in prompts])
        stats[jump] = engine.stats
    shapes = [shape for shape in SHAPES for _ in prompts]
    for on, off, shape in zip(results[True], results[False], shapes):
        same_output(on, off)
        assert on.finish_reason == "stop"
        assert_matches(shape, on.text)
    assert stats[True].decode_steps * 10 < stats[False].decode_steps

"""Continuous batching: equals sampler.generate token for token whatever the arrival times,
short requests overtake long ones, log-probs equal transformers' log-softmax, constraint masks
hold, text never splits a character or a stop string, cancelled requests free their slot."""

import time

import numpy as np
import pytest
import torch

from cosa_jax.inference.engine import Engine, IncrementalText, pack_mask, unpack_mask
from cosa_jax.inference.sampler import SamplingParams, generate
from cosa_jax.models import EMBEDDED_MODEL, load_hf, load_tokenizer
from cosa_jax.testing.model_fixtures import make_loaded_model

NEVER = 10**6   # an end-of-sequence id no model here can produce: rows run to max_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_loaded_model(tmp_path_factory.mktemp("tiny_engine"))


def drive(engine, handles):
    while not all(h.done.is_set() for h in handles):
        engine.step()


def test_staggered_requests_equal_generate_token_for_token(tiny):
    _, params, cfg = tiny
    rng = np.random.default_rng(0)
    lengths, max_new = (5, 37, 12, 3, 21, 9), (12, 30, 7, 20, 16, 25)
    prompts = [rng.integers(3, 320, n).tolist() for n in lengths]
    ref = [generate(params, cfg, [p], SamplingParams(max_new_tokens=m), eos_ids=[2])[0].token_ids
           for p, m in zip(prompts, max_new)]
    # 4 slots for 6 requests (two wait for a slot); a 37-token prompt spans three 16-chunks;
    # the budget lets one chunk group run per step, so prefill interleaves with decoding.
    engine = Engine(params, cfg, eos_ids=[2], slots=4, chunk_sizes=(8, 16), prefill_budget=16)
    handles, arrive_after = [], (0, 2, 1, 5, 0, 3)
    for p, m, wait in zip(prompts, max_new, arrive_after):
        for _ in range(wait):
            engine.step()
        handles.append(engine.submit(p, SamplingParams(max_new_tokens=m)))
    drive(engine, handles)
    got = [h.result().token_ids for h in handles]
    assert got == ref
    assert [h.result().finish_reason for h in handles] == \
        ["stop" if r[-1] == 2 else "length" for r in ref]
    assert engine.stats.decode_steps < sum(len(r) for r in ref)   # steps were shared
    assert engine.stats.requests == 6 and engine.active == 0


def test_short_request_arriving_during_a_long_one_finishes_first(tiny):
    _, params, cfg = tiny
    with Engine(params, cfg, eos_ids=[NEVER], slots=4) as engine:
        long = engine.submit(list(range(3, 20)), SamplingParams(max_new_tokens=400))
        while len(engine._slots[0].tokens if engine._slots[0] else []) < 5:
            time.sleep(0.01)
        short = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
        res = short.result(timeout=120)
        assert not long.done.is_set()
        assert len(res.token_ids) == 4 and res.finish_reason == "length"
        assert long.result(timeout=300).finish_reason == "length"
        assert len(long.result().token_ids) == 400


def test_sampled_rows_do_not_depend_on_their_slot_mates(tiny):
    _, params, cfg = tiny
    s = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = Engine(params, cfg, eos_ids=[NEVER], slots=4)
    h = alone.submit([9, 8, 7, 6], s)
    drive(alone, [h])
    crowd = Engine(params, cfg, eos_ids=[NEVER], slots=4)
    others = [crowd.submit([4, 4, 4], SamplingParams(max_new_tokens=15, temperature=0.7, seed=1))]
    crowd.step()
    h2 = crowd.submit([9, 8, 7, 6], s)
    others.append(crowd.submit([11] * 20, SamplingParams(max_new_tokens=5)))
    drive(crowd, others + [h2])
    assert h.result().token_ids == h2.result().token_ids
    other_seed = Engine(params, cfg, eos_ids=[NEVER], slots=4)
    h3 = other_seed.submit([9, 8, 7, 6], SamplingParams(max_new_tokens=10, temperature=1.0,
                                                        top_p=0.9, top_k=50, seed=8))
    drive(other_seed, [h3])
    assert h3.result().token_ids != h.result().token_ids


def test_logprobs_equal_transformers_log_softmax(tiny):
    hf, params, cfg = tiny
    prompt = [7, 100, 250, 3, 42, 19, 5, 88, 160, 301, 12]
    engine = Engine(params, cfg, eos_ids=[NEVER], slots=4, chunk_sizes=(4, 8))
    h = engine.submit(prompt, SamplingParams(max_new_tokens=6), logprobs=20, prompt_logprobs=5)
    drive(engine, [h])
    res = h.result()
    seq = prompt + res.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1).numpy()
    for j, lp in enumerate(res.logprobs):        # token j is predicted at position len(prompt)+j-1
        row = ref[len(prompt) + j - 1]
        assert lp.token_id == seq[len(prompt) + j]
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        top_ids = [t for t, _ in lp.top]
        assert len(top_ids) == 20
        np.testing.assert_allclose([v for _, v in lp.top], row[top_ids], atol=1e-4)
        np.testing.assert_allclose(sorted(row, reverse=True)[:20], [v for _, v in lp.top],
                                   atol=1e-4)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):             # spans three 4-token chunks
        lp = res.prompt_logprobs[t]
        assert lp.token_id == prompt[t]
        np.testing.assert_allclose(lp.logprob, ref[t - 1, prompt[t]], atol=1e-4)
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref[t - 1])[::-1][:5], atol=1e-4)


def test_mask_packing_matches_the_bit_layout():
    rng = np.random.default_rng(1)
    allowed = rng.random((3, 70)) < 0.3
    packed = pack_mask(allowed)
    assert packed.shape == (3, 3) and packed.dtype == np.int32
    for r in range(3):
        for v in range(70):
            assert bool((int(packed[r, v // 32]) >> (v % 32)) & 1) == allowed[r, v]
    np.testing.assert_array_equal(np.asarray(unpack_mask(packed, 70)), allowed)


class AllowedSet:
    """A constraint that allows a fixed set of tokens and ends after ``length`` of them."""

    def __init__(self, vocab, allowed, length, packed=False):
        mask = np.zeros(vocab, bool)
        mask[list(allowed)] = True
        self.mask = pack_mask(mask) if packed else mask
        self.length, self.seen = length, []

    def next_mask(self):
        return self.mask

    def accept(self, token):
        self.seen.append(token)

    def is_terminated(self):
        return len(self.seen) >= self.length


def test_constraint_masks_apply_per_slot_and_mix_with_free_rows(tiny):
    _, params, cfg = tiny
    engine = Engine(params, cfg, eos_ids=[2], slots=4)
    allowed = {11, 57, 203}
    bool_c = AllowedSet(cfg.vocab_size, allowed, 6)
    packed_c = AllowedSet(cfg.vocab_size, allowed, 100, packed=True)
    hs = [engine.submit([3, 4, 5], SamplingParams(max_new_tokens=20), constraint=bool_c),
          engine.submit([3, 4, 5], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3),
                        constraint=packed_c),
          engine.submit([3, 4, 5], SamplingParams(max_new_tokens=8))]
    drive(engine, hs)
    a, b, free = (h.result() for h in hs)
    assert set(a.token_ids) <= allowed and len(a.token_ids) == 6 and a.finish_reason == "stop"
    assert set(b.token_ids) <= allowed and b.finish_reason == "length"
    ref = generate(params, cfg, [[3, 4, 5]], SamplingParams(max_new_tokens=8), eos_ids=[2])
    assert free.token_ids == ref[0].token_ids
    assert bool_c.seen == a.token_ids


class Broken(AllowedSet):
    def next_mask(self):
        if len(self.seen) == 2:
            raise RuntimeError("matcher fell over")
        return super().next_mask()


def test_a_failing_constraint_fails_only_its_request(tiny):
    _, params, cfg = tiny
    with Engine(params, cfg, eos_ids=[NEVER], slots=4) as engine:
        bad = engine.submit([3, 4], SamplingParams(max_new_tokens=10),
                            constraint=Broken(cfg.vocab_size, {9}, 100))
        good = engine.submit([3, 4], SamplingParams(max_new_tokens=10))
        with pytest.raises(RuntimeError, match="matcher fell over"):
            bad.result(timeout=120)
        assert len(good.result(timeout=120).token_ids) == 10
        again = engine.submit([5], SamplingParams(max_new_tokens=3)).result(timeout=120)
        assert len(again.token_ids) == 3 and engine.stats.failed == 1


def test_cancel_frees_the_slot_at_the_next_step(tiny):
    _, params, cfg = tiny
    engine = Engine(params, cfg, eos_ids=[NEVER], slots=1)
    h = engine.submit([3, 4, 5], SamplingParams(max_new_tokens=500))
    waiting = engine.submit([6, 7], SamplingParams(max_new_tokens=2))
    for _ in range(4):
        engine.step()
    assert engine.active == 1 and not h.done.is_set()
    h.cancel("client disconnected")
    engine.step()
    assert h.done.is_set() and h.result_value.finish_reason == "cancelled"
    assert len(h.result_value.token_ids) == 5   # step 1 prefilled and decoded: 2 tokens
    drive(engine, [waiting])          # the freed slot serves the next request
    assert len(waiting.result().token_ids) == 2 and engine.stats.cancelled == 1


def test_requests_that_do_not_fit_are_refused(tiny):
    _, params, cfg = tiny
    engine = Engine(params, cfg, eos_ids=[2], slots=2, max_cache_len=64)
    with pytest.raises(ValueError, match="need 80 cache positions; this engine holds 64"):
        engine.submit(list(range(3, 50)), SamplingParams(max_new_tokens=34))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([3, 999], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())


# ------------------------------------------------------------------------ detokenisation
@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer(EMBEDDED_MODEL)


def stream_text(tok, ids, stop=()):
    inc = IncrementalText(tok, stop)
    deltas = [inc.add(t) for t in ids]
    if not inc.stopped:
        deltas.append(inc.finish())
    return deltas, inc


@pytest.mark.parametrize("text", [
    "Grüße aus Köln — naïve café, 東京タワー and 🦜🌊 emoji, Ελληνικά, עברית.",
    "🤖🤖🤖 ü ¿Qué? 中文字符测试",
])
def test_deltas_never_split_a_character_and_join_to_the_decoded_text(smol_tokenizer, text):
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, _ = stream_text(smol_tokenizer, ids)
    assert "".join(deltas) == smol_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    # Some token holds only part of a character (otherwise the test proves nothing).
    assert any("\ufffd" in smol_tokenizer.decode([t]) for t in ids)


def test_stop_strings_that_span_tokens_are_held_back_and_cut(smol_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Then it sleeps."
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [smol_tokenizer.decode([t]) for t in ids]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) > 2 and len(pieces[i]) > 2)
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    cut = text[:text.find(stop)]
    deltas, inc = stream_text(smol_tokenizer, ids, stop=("never-there", stop))
    assert inc.stopped and "".join(deltas) == cut
    emitted = ""
    for d in deltas:                 # no emitted prefix ever holds the stop string's start
        emitted += d
        assert stop not in emitted
    # A stop string that never completes: everything comes out at the end.
    deltas, inc = stream_text(smol_tokenizer, ids, stop=(text[-3:] + "!",))
    assert not inc.stopped and "".join(deltas) == text


class Forced:
    """A constraint that allows exactly the next token of a fixed sequence."""

    def __init__(self, vocab, ids):
        self.vocab, self.ids, self.at = vocab, list(ids), 0

    def next_mask(self):
        mask = np.zeros(self.vocab, bool)
        mask[self.ids[min(self.at, len(self.ids) - 1)]] = True
        return mask

    def accept(self, token):
        assert token == self.ids[self.at]
        self.at += 1

    def is_terminated(self):
        return self.at >= len(self.ids)


def test_streamed_text_of_forced_multibyte_tokens_never_splits_a_character(tmp_path,
                                                                           smol_tokenizer):
    _, params, cfg = make_loaded_model(tmp_path / "tiny49k", vocab_size=49152)
    tok = smol_tokenizer
    text = "Grüße, 東京タワー 🦜🌊 — and so on."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=2)
    pieces = []
    hs = [engine.submit([5, 6], SamplingParams(max_new_tokens=64), constraint=Forced(cfg.vocab_size, ids),
                        on_output=lambda out: pieces.append(out.text)),
          engine.submit([5, 6], SamplingParams(max_new_tokens=64, stop=("タワ",)),
                        constraint=Forced(cfg.vocab_size, ids))]
    drive(engine, hs)
    assert hs[0].result_value.token_ids == ids and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces) and len([p for p in pieces if p]) > 5
    assert hs[1].result_value.text == "Grüße, 東京" and hs[1].result_value.finish_reason == "stop"


@pytest.mark.slow
def test_embedded_model_engine_equals_generate():
    model, cfg = load_hf(EMBEDDED_MODEL)
    params, tok = model.params(), load_tokenizer(EMBEDDED_MODEL)
    prompts = [tok(f"Tell me one fact about {w}.")["input_ids"] for w in ("owls", "salt", "jazz")]
    ref = [generate(params, cfg, [p], SamplingParams(max_new_tokens=m), eos_ids=[2])[0]
           for p, m in zip(prompts, (20, 9, 14))]
    engine = Engine(params, cfg, eos_ids=[2], tokenizer=tok, slots=2)
    hs = []
    for p, m in zip(prompts, (20, 9, 14)):
        hs.append(engine.submit(p, SamplingParams(max_new_tokens=m)))
        engine.step()
    drive(engine, hs)
    for h, r in zip(hs, ref):
        assert h.result().token_ids == r.token_ids
        assert h.result().text == tok.decode([t for t in r.token_ids if t != 2],
                                             skip_special_tokens=True)

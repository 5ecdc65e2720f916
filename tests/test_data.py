"""Preference data: loading errors, truncation, masking, SFT targets, shuffling and resume."""

import dataclasses
import json
import random
import warnings
from importlib import resources

import numpy as np
import pytest

from cosa_jax.train import data
from cosa_jax.train.batches import SftBatch
from test_chat import llama_tok, smol_tok  # noqa: E402,F401  (its fixtures; tests/ is on sys.path under pytest)

MINI = resources.files("cosa_jax") / "data" / "mini_prefs.jsonl"
MINI_DEV = resources.files("cosa_jax") / "data" / "mini_prefs_dev.jsonl"


def _row(i=0, **kw):
    r = {"system_prompt": f"System {i % 3}.", "prompt": f"Question number {i}?",
         "chosen_response": f"A helpful answer {i}.", "rejected_response": "Sorry, I can't."}
    r.update(kw)
    return r


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----- truncation --------------------------------------------------------------------------


def _trunc(p, rs, **kw):
    return data.truncate(list(range(p)), [list(range(r)) for r in rs], **kw)


def test_truncation_short_sequences_untouched():
    p, rs, cut = _trunc(100, [50, 80])
    assert (len(p), [len(r) for r in rs], cut) == (100, [50, 80], False)


def test_truncation_cuts_responses_first():
    p, rs, cut = _trunc(300, [400, 200])
    assert (len(p), [len(r) for r in rs], cut) == (300, [128, 128], False)


def test_truncation_then_keeps_prompt_start():
    p, rs, cut = _trunc(600, [100, 40])
    assert (len(p), [len(r) for r in rs], cut) == (512, [100, 40], True)
    assert p == list(range(512))  # the start is kept
    p, rs, cut = _trunc(560, [150, 20])
    assert (len(p), [len(r) for r in rs], cut) == (512, [128, 20], True)


def test_truncation_configurable_and_other_modes():
    p, rs, cut = _trunc(300, [400, 10], max_length=256, max_prompt_length=200, max_target_length=32)
    assert (len(p), [len(r) for r in rs], cut) == (200, [32, 10], True)
    p, rs, cut = _trunc(900, [700, 10], truncation="none")
    assert (len(p), [len(r) for r in rs], cut) == (900, [700, 10], False)
    with pytest.raises(data.DataError, match="exceeds max_length=640"):
        _trunc(600, [100, 40], truncation="error")
    with pytest.raises(ValueError, match="truncation"):
        _trunc(10, [10], truncation="keep_end")


def _prompt_first_reference(p, rs, max_length=640, max_prompt_length=512):
    """The original DPO code's order, written independently: prompt first, then responses."""
    longest = max(rs)
    if p + longest > max_length:
        p = min(p, max_prompt_length)
    if p + longest > max_length:
        rs = [min(r, max_length - max_prompt_length) for r in rs]
    return p, rs


def test_truncation_equals_prompt_first_order_with_default_target_length():
    rng = random.Random(0)
    for _ in range(2000):
        p, rs = rng.randint(1, 900), [rng.randint(1, 700), rng.randint(1, 700)]
        ours_p, ours_rs, _ = _trunc(p, rs)
        assert (len(ours_p), [len(r) for r in ours_rs]) == _prompt_first_reference(p, rs)


# ----- tokenisation, masking, collation ----------------------------------------------------


def test_tokenize_pairs_and_collate_layout(llama_tok):
    rows = [_row(i) for i in range(3)]
    ex = data.tokenize_pairs(llama_tok, rows)
    bos, eot = llama_tok.bos_token_id, llama_tok.convert_tokens_to_ids("<|eot_id|>")
    for e, r in zip(ex, rows):
        assert e.prompt_ids[0] == bos and e.prompt_ids.count(bos) == 1
        assert all(resp[-1] == eot for resp in e.response_ids)
        assert llama_tok.decode(e.response_ids[0][:-1]) == r["chosen_response"]
        assert llama_tok.decode(e.response_ids[1][:-1]) == r["rejected_response"]
    pad = data.pad_id_for(llama_tok)
    b = data.collate(ex, pad_id=pad)
    t = b.input_ids.shape[1]
    longest = max(e.max_length for e in ex)
    assert b.input_ids.shape == (6, t) and b.input_ids.dtype == np.int32
    assert t % 64 == 0 and t - 64 < longest <= t
    for half, j in ((0, 0), (3, 1)):  # chosen rows first, then rejected
        for i, e in enumerate(ex):
            row = half + i
            seq = e.prompt_ids + e.response_ids[j]
            n, p = len(seq), len(e.prompt_ids)
            assert b.input_ids[row, :n].tolist() == list(seq)
            assert (b.input_ids[row, n:] == pad).all()
            assert b.attention_mask[row].tolist() == [1] * n + [0] * (t - n)
            assert (b.labels[row, :p] == -100).all() and (b.labels[row, n:] == -100).all()
            assert b.labels[row, p:n].tolist() == list(e.response_ids[j])
    assert b.position_ids[4].tolist() == list(range(t))
    assert b.index.tolist() == [0, 1, 2]
    # Response windows: slot w is position response_start + w and holds the label it predicts.
    w = b.targets.shape[1]
    assert w % 64 == 0 or w == t - 1
    for row in range(6):
        p = int(np.argmax(b.labels[row] != -100))
        assert b.response_start[row] == p - 1
        labelled = b.labels[row, p:][b.labels[row, p:] != -100]
        assert b.targets[row][b.targets[row] != -100].tolist() == labelled.tolist()
        for slot in np.flatnonzero(b.targets[row] != -100):
            assert b.input_ids[row, p + slot] == b.targets[row, slot]


def test_response_window_is_capped_and_covers_the_longest_response():
    labels = np.full((2, 10), -100, np.int32)
    labels[0, 1:10] = np.arange(9)  # prompt of 1 token, response to the end
    labels[1, 7:9] = [5, 6]
    zeros = np.zeros_like(labels)
    b = data.add_response_windows(SftBatch(input_ids=zeros, attention_mask=zeros, labels=labels,
                                           position_ids=zeros), window_multiple=4)
    assert b.response_start.tolist() == [0, 6]
    assert b.targets.shape == (2, 9)  # bucket(9, 4) = 12 > T - 1
    assert b.targets[0].tolist() == list(range(9))
    assert b.targets[1].tolist() == [5, 6] + [-100] * 7


def test_prompt_shared_layout_predicts_each_response_from_its_own_past():
    """Row = prompt | chosen | rejected; each target sits at the position that predicts it."""
    ex = [data.TokenizedExample((5, 6, 7), ((10, 11), (20, 21, 22)), False),
          data.TokenizedExample((8,), ((30,), (40, 41)), False)]
    b = data.collate_prompt_shared(ex, pad_id=0, pad_multiple=4, min_length=12, indices=[7, 3])
    assert b.input_ids.shape == (2, 12) and b.index.tolist() == [7, 3]
    assert b.input_ids[0].tolist() == [5, 6, 7, 10, 11, 20, 21, 22, 0, 0, 0, 0]
    assert b.attention_mask[0].tolist() == [1] * 8 + [0] * 4
    assert b.position_ids[0, :8].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b.segment_ids[0, :8].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    ign = -100
    # Window of W = bucket(3 + 2, 4) = 8 slots from the prompt's last position (row 0: position 2).
    assert b.response_start.tolist() == [2, 0]
    assert b.chosen_targets.shape == (2, 8)
    assert b.chosen_targets[0].tolist() == [10, 11, ign, ign, ign, ign, ign, ign]
    assert b.rejected_targets[0].tolist() == [20, ign, ign, 21, 22, ign, ign, ign]
    assert b.input_ids[1, :4].tolist() == [8, 30, 40, 41]
    assert b.chosen_targets[1, :4].tolist() == [30, ign, ign, ign]
    assert b.rejected_targets[1, :4].tolist() == [40, ign, 41, ign]
    assert b.position_ids[1, :4].tolist() == [0, 1, 1, 2]
    # Slot j sits at position response_start + j and predicts the token after it: each response
    # token is predicted exactly once, in its own response's target row, from its own past.
    for e, row, s, c, r in zip(ex, b.input_ids, b.response_start, b.chosen_targets,
                               b.rejected_targets):
        assert c[c != ign].tolist() == list(e.response_ids[0])
        assert r[r != ign].tolist() == list(e.response_ids[1])
        p = len(e.prompt_ids)
        for j in np.flatnonzero(c != ign):
            assert row[s + j + 1] == c[j]
        for j in np.flatnonzero(r[1:] != ign) + 1:
            assert row[s + j + 1] == r[j]
        assert r[0] == row[p + len(e.response_ids[0])]
    # A wider window multiple is capped at the row length.
    wide = data.collate_prompt_shared(ex, pad_id=0, pad_multiple=4, window_multiple=64)
    assert wide.chosen_targets.shape == (2, wide.input_ids.shape[1]) == (2, 8)
    with pytest.raises(ValueError, match="DPO pairs"):
        data.collate_prompt_shared([data.TokenizedExample((1,), ((2,),), False)], pad_id=0)


def test_bucket_lengths():
    assert data.bucket_length(1) == 64 and data.bucket_length(64) == 64
    assert data.bucket_length(65) == 128
    assert data.bucket_length(630, max_length=640) == 640
    assert data.bucket_length(700, max_length=640) == 704  # truncation='none' may exceed
    assert data.bucket_length(33, pad_multiple=0) == 33


def test_prompt_cut_warning_counts_examples(llama_tok):
    rows = [_row(0, prompt="word " * 80), _row(1), _row(2, prompt="more words " * 60)]
    with pytest.warns(UserWarning, match="user question\\) of 2 of 3 examples"):
        ex = data.tokenize_pairs(llama_tok, rows, max_length=200, max_prompt_length=160)
    assert [e.prompt_cut for e in ex] == [True, False, True]
    assert all(e.max_length <= 200 for e in ex)
    assert [len(e.prompt_ids) for e in ex][::2] == [160, 160]


def test_leading_whitespace_in_response_is_stripped(smol_tok):
    ex = data.tokenize_pairs(smol_tok, [_row(0, chosen_response="  Sure thing.  ")])
    assert smol_tok.decode(ex[0].response_ids[0]) == "Sure thing.<|im_end|>"


def test_mini_data_loads_and_fits(smol_tok):
    for path in (MINI, MINI_DEV):
        rows = data.load_preference_rows(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no truncation warning expected
            ex = data.tokenize_pairs(smol_tok, rows)
        assert not any(e.prompt_cut for e in ex)
        assert max(e.max_length for e in ex) < 256
        assert all(r["chosen_category_error_score"] < r["rejected_category_error_score"]
                   for r in rows)
    assert 90 <= len(data.load_preference_rows(str(MINI))) <= 120
    assert 12 <= len(data.load_preference_rows(str(MINI_DEV))) <= 24


# ----- SFT targets -------------------------------------------------------------------------


def test_sft_target_is_last_chosen_per_system_prompt_pair(llama_tok):
    rows = [
        _row(0, system_prompt="A", prompt="q1", chosen_response="first"),
        _row(1, system_prompt="B", prompt="q1", chosen_response="other config"),
        _row(2, system_prompt="A", prompt="q2", chosen_response="q2 answer"),
        _row(3, system_prompt="A", prompt="q1", chosen_response="last"),
    ]
    targets = data.sft_targets(rows)
    assert [(t["system_prompt"], t["prompt"], t["target"]) for t in targets] == [
        ("A", "q1", "last"), ("B", "q1", "other config"), ("A", "q2", "q2 answer")]
    ex = data.tokenize_sft(llama_tok, rows)
    assert len(ex) == 3 and all(len(e.response_ids) == 1 for e in ex)
    assert llama_tok.decode(ex[0].response_ids[0][:-1]) == "last"
    b = data.collate(ex, pad_id=data.pad_id_for(llama_tok))
    assert b.input_ids.shape[0] == 3


# ----- shuffling and resume ----------------------------------------------------------------


def _fake_examples(n):
    return [data.TokenizedExample((1, 2, i), ((3 + i,), (4,)), False) for i in range(n)]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_shuffle_is_deterministic_per_seed_and_epoch():
    ex = _fake_examples(10)
    a = [b.index.tolist() for b, _ in data.iterate_batches(ex, batch_size=3, pad_id=0, seed=5, epochs=3)]
    b = [b.index.tolist() for b, _ in data.iterate_batches(ex, batch_size=3, pad_id=0, seed=5, epochs=3)]
    c = [b.index.tolist() for b, _ in data.iterate_batches(ex, batch_size=3, pad_id=0, seed=6, epochs=3)]
    assert a == b and a != c
    assert len(a) == 9  # 3 full batches per epoch, tail dropped
    epochs = [sum(a[i * 3:(i + 1) * 3], []) for i in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)  # no repeats inside an epoch
    assert epochs[0] != epochs[1]
    assert data.epoch_order(10, seed=5, epoch=1).tolist() == data.epoch_order(10, seed=5, epoch=1).tolist()


def test_resume_from_saved_position_continues_exactly():
    ex = _fake_examples(11)
    full = _take(data.iterate_batches(ex, batch_size=4, pad_id=0, seed=1), 12)
    for k in (1, 2, 3, 7):  # resume after k batches, including at an epoch boundary
        saved = json.loads(json.dumps(full[k - 1][1].to_dict()))
        resumed = data.iterate_batches(ex, batch_size=4, pad_id=0, seed=1,
                                       start=data.DataPosition.from_dict(saved))
        for (b1, p1), (b2, p2) in zip(full[k:], _take(resumed, 12 - k)):
            assert p1 == p2
            for field in dataclasses.fields(b1):
                np.testing.assert_array_equal(getattr(b1, field.name), getattr(b2, field.name))
    assert full[1][1] == data.DataPosition(1, 0)  # 11 // 4 = 2 batches per epoch


def test_too_few_examples_for_one_batch():
    with pytest.raises(data.DataError, match="fewer than one batch"):
        next(data.iterate_batches(_fake_examples(2), batch_size=4, pad_id=0))


# ----- loading and errors ------------------------------------------------------------------


def test_loads_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [_row(i, spec_i=["Violence"], chosen_category_error_score=0.1) for i in range(4)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "dev": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    jl = _write_jsonl(tmp_path / "p.jsonl", rows)
    for src in (jl, tmp_path / "p.parquet", tmp_path / "saved", tmp_path / "dd"):
        got = data.load_preference_rows(src)
        assert [r["chosen_response"] for r in got] == [r["chosen_response"] for r in rows]
    assert len(data.load_preference_rows(tmp_path / "dd", split="dev")) == 1
    with pytest.raises(data.DataError, match="no split 'test'"):
        data.load_preference_rows(tmp_path / "dd", split="test")


@pytest.mark.parametrize("bad,match", [
    ({"prompt": None}, r"line 2: field 'prompt' must be a string, got NoneType"),
    ({"chosen_response": 3}, r"line 2: field 'chosen_response' must be a string, got int"),
    ({"rejected_response": "   "}, r"line 2: field 'rejected_response' is empty"),
    ({"spec_i": 5}, r"line 2: field 'spec_i' must be str or list"),
    ({"chosen_category_error_score": "high"}, r"line 2: field 'chosen_category_error_score'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_row(0), _row(1, **bad)])
    with pytest.raises(data.DataError, match=match) as e:
        data.load_preference_rows(path)
    assert "bad.jsonl" in str(e.value)


def test_missing_field_and_bad_json(tmp_path):
    r = _row(0)
    del r["rejected_response"]
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(1), _row(2), r])
    with pytest.raises(data.DataError, match=r"m.jsonl line 3: missing required field 'rejected_response'"):
        data.load_preference_rows(path)
    (tmp_path / "j.jsonl").write_text(json.dumps(_row(0)) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"j.jsonl:2: not valid JSON"):
        data.load_preference_rows(tmp_path / "j.jsonl")
    with pytest.raises(data.DataError, match="file not found"):
        data.load_preference_rows(tmp_path / "absent.jsonl")


def test_bad_row_in_parquet_names_row(tmp_path):
    import datasets

    rows = [_row(0), _row(1, prompt="")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(data.DataError, match=r"x.parquet \[train\] row 1: field 'prompt' is empty"):
        data.load_preference_rows(tmp_path / "x.parquet")

"""Preference data: loading (CoSAlign-Train schema), tokenisation, truncation, batching.

Host-side numpy only (no JAX computation), so the data pipeline can run in a separate process.
Batches are the typed containers of ``cosa_jax.train.batches`` (their type says the layout):

Row layout (``SftBatch``, ``TwoRowBatch``), numpy arrays, right-padded with the tokenizer's
eos id:
  input_ids [R, T] int32, attention_mask [R, T] int32 (1 = real token), labels [R, T] int32
  (-100 on prompt and padding), position_ids [R, T] int32 (0..T-1), index [B] int64 (row of each
  example in the tokenised list, e.g. to look up precomputed reference log-probs).
  DPO (``TwoRowBatch``): R = 2B, CONCATENATED: rows 0..B-1 are the chosen sequences, rows
  B..2B-1 the rejected ones of the same pairs in the same order (`losses.split_pairs` undoes
  it). SFT (``SftBatch``): R = B.
T is the longest sequence in the batch rounded up to a multiple of `pad_multiple` (64), capped
at `max_length`, so only a handful of shapes ever get compiled.
Response windows (`collate`, `add_response_windows`): response_start [R] int32, the position
before a row's first label; targets [R, W] int32, targets[r, w] = labels[r, response_start + 1
+ w] (-100 past the end), W = the longest response rounded up to `window_multiple`, at most
T - 1. The step projects only these W positions onto the vocabulary, not the prompt.

Prompt-shared DPO layout (``SharedPromptBatch``; `share_prompt=True`, `collate_prompt_shared`):
one row per pair, [prompt | chosen response | rejected response | padding], so the prompt runs
through the model once instead of twice (CoSAlign prompts carry the safety config: up to 512
of 640 tokens).
  input_ids, attention_mask [B, T]; position_ids [B, T] (both responses start at the prompt
  length); segment_ids [B, T] (0 prompt, 1 chosen, 2 rejected: the attention mask keeps the
  responses apart); response_start [B] int32: the prompt's last position P-1, where the
  response window begins; chosen_targets / rejected_targets [B, W]: the token that position
  response_start + w PREDICTS for that response (already shifted), -100 elsewhere: window
  slot 0 (the prompt's last position) predicts both first tokens; index [B].
  W = the longest chosen + rejected in the batch rounded up to `window_multiple`, at most T:
  the vocabulary projection runs on the window only, never on the prompt.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cosa_jax import chat
from cosa_jax.train.batches import (IGNORE_INDEX, Batch, RowBatch, SftBatch, SharedPromptBatch,
                                    TwoRowBatch)

REQUIRED_FIELDS = ("system_prompt", "prompt", "chosen_response", "rejected_response")
# optional field -> accepted python types (None is always accepted)
OPTIONAL_FIELDS = {
    "spec_i": (str, list),
    "spec_j": (str, list),
    "mode": (str,),
    "chosen_cat": (str, list),
    "rejected_cat": (str, list),
    "chosen_category_error_score": (int, float),
    "rejected_category_error_score": (int, float),
}
TRUNCATION_MODES = ("reference", "none", "error")


def truncation_error(truncation: str) -> str | None:
    """Why ``truncation`` is no mode of ``truncate``, or None (the train config asks here too)."""
    return None if truncation in TRUNCATION_MODES else f"{truncation!r} is not one of {TRUNCATION_MODES}"


class DataError(ValueError):
    """A preference file or row that does not fit the schema; the message names where."""


# ----- loading -----------------------------------------------------------------------------


def validate_row(row: object, where: str) -> dict:
    """Check one row against the CoSAlign-Train schema; returns it as a plain dict."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise DataError(f"{where}: missing required field {field!r}")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}"
            )
        if field != "system_prompt" and not value.strip():
            raise DataError(f"{where}: field {field!r} is empty")
    for field, types in OPTIONAL_FIELDS.items():
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise DataError(
                f"{where}: field {field!r} must be {names} (or null), got {type(value).__name__}"
            )
    return dict(row)


def _read_jsonl(path: Path) -> list[dict]:
    from cosa_jax.jsonl import iter_jsonl_objects
    return [validate_row(obj, f"{path} line {lineno}")
            for lineno, obj in iter_jsonl_objects(path, error=DataError)]


def _pick_split(ds, split: str, where: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{where}: no split {split!r}; available: {sorted(ds)}")
        return ds[split]
    return ds


def load_preference_rows(source: str | Path, *, split: str = "train") -> list[dict]:
    """Rows from a .jsonl/.json file, a .parquet file, a `save_to_disk` dir, a hub id or a local
    copy of a hub repo (README.md naming the splits).

    JSONL is parsed line by line so an error can name the line; everything else goes through
    `datasets` and errors name the row.
    """
    import datasets

    from cosa_jax.data import is_hub_repo_dir, resolve_bundled

    source = resolve_bundled(source)
    path = Path(str(source)).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.is_file():
        raise DataError(f"{source}: file not found")
    if path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
        where = str(path)
    else:
        if path.is_file() and path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif is_hub_repo_dir(path):  # a local copy of a hub repo: read as the hub id is
            ds = datasets.load_dataset(str(path), split=split)
        elif path.is_dir():
            ds = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
        elif path.exists() or str(source).startswith((".", "/")):
            raise DataError(f"{source}: not a .jsonl/.json/.parquet file or a saved datasets dir")
        else:
            ds = datasets.load_dataset(str(source), split=split)
        where = f"{source} [{split}]"
        rows = [validate_row(r, f"{where} row {i}") for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows


def sft_targets(rows: Sequence[dict]) -> list[dict]:
    """One SFT example per unique (system_prompt, prompt): the chosen response of the LAST pair.

    Order is that of each key's first appearance (as a dict keyed by prompt keeps it).
    """
    targets: dict[tuple[str, str], str] = {}
    for r in rows:
        targets[(r["system_prompt"], r["prompt"])] = r["chosen_response"]
    return [
        {"system_prompt": s, "prompt": p, "target": t} for (s, p), t in targets.items()
    ]


# ----- tokenisation and truncation -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """Prompt ids and one or more response ids (chosen, rejected) or (target,), truncated."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    prompt_cut: bool  # the prompt (and so the user question) lost its end to truncation

    @property
    def max_length(self) -> int:
        return len(self.prompt_ids) + max(len(r) for r in self.response_ids)


def truncate(
    prompt_ids: Sequence[int],
    response_ids: Sequence[Sequence[int]],
    *,
    truncation: str = "reference",
    max_length: int = 640,
    max_prompt_length: int = 512,
    max_target_length: int | None = None,
) -> tuple[list[int], list[list[int]], bool]:
    """The reference truncation (cosalign.md §5) or none / an error.

    reference: if prompt + longest response > max_length, cut every response to
    max_target_length (default max_length - max_prompt_length = 128); if still too long, keep
    the first max_prompt_length prompt tokens. (With the default target length this is the same
    result as cutting the prompt first.) Returns (prompt, responses, prompt_was_cut).
    """
    if why := truncation_error(truncation):
        raise ValueError(f"truncation {why}")
    if max_target_length is None:
        max_target_length = max_length - max_prompt_length
    if max_target_length <= 0 or max_prompt_length <= 0:
        raise ValueError(
            f"need max_length > max_prompt_length > 0, got {max_length=} {max_prompt_length=}"
        )
    prompt = list(prompt_ids)
    responses = [list(r) for r in response_ids]
    longest = max(len(r) for r in responses)
    if truncation == "none" or len(prompt) + longest <= max_length:
        return prompt, responses, False
    if truncation == "error":
        raise DataError(
            f"sequence of {len(prompt) + longest} tokens exceeds max_length={max_length} "
            "(truncation='error')"
        )
    responses = [r[:max_target_length] for r in responses]
    longest = max(len(r) for r in responses)
    cut = False
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[:max_prompt_length]
        cut = True
    return prompt, responses, cut


def tokenize_examples(
    tokenizer,
    items: Sequence[dict],
    response_fields: Sequence[str],
    *,
    truncation: str = "reference",
    max_length: int = 640,
    max_prompt_length: int = 512,
    max_target_length: int | None = None,
    date_string: str = chat.PINNED_DATE,
    progress: bool = False,
) -> list[TokenizedExample]:
    """Encode [system, user] with the chat template, then prompt + each response.

    Prompts and responses are encoded as text (``chat.encode_pair``): a control-token spelling in
    them is never a control token, so a response holding ``<|im_end|>`` does not end its turn
    early; the template's own end-of-turn follows each response. Responses are stripped of
    surrounding whitespace (the Llama-3.1 template trims assistant content too, and leading
    spaces would merge with the template's last newline). Warns with the number of examples
    whose prompt, and so the user question, was cut.
    """
    prompt_cache: dict[tuple[str, str], list[int]] = {}
    out = []
    iterator = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="tokenising", unit="ex")
    for i, item in enumerate(iterator):
        key = (item["system_prompt"], item["prompt"])
        responses = []
        prompt_ids = None
        for field in response_fields:
            try:
                if key not in prompt_cache:
                    prompt_cache[key] = chat.encode_prompt(tokenizer, *key, date_string=date_string)
                p_ids, full_ids = chat.encode_pair(tokenizer, *key, item[field].strip(),
                                                   date_string=date_string,
                                                   prompt_ids=prompt_cache[key])
            except ValueError as e:
                raise DataError(f"example {i} field {field!r}: {e}") from None
            prompt_ids = p_ids
            responses.append(full_ids[len(p_ids):])
        try:
            prompt, responses, cut = truncate(
                prompt_ids, responses, truncation=truncation, max_length=max_length,
                max_prompt_length=max_prompt_length, max_target_length=max_target_length,
            )
        except DataError as e:
            raise DataError(f"example {i}: {e}") from None
        out.append(TokenizedExample(tuple(prompt), tuple(tuple(r) for r in responses), cut))
    n_cut = sum(e.prompt_cut for e in out)
    if n_cut:
        warnings.warn(
            f"truncation cut the prompt (and so the user question) of {n_cut} of {len(out)} "
            f"examples to {max_prompt_length} tokens; raise max_prompt_length/max_length or use "
            "truncation='none' to keep them whole",
            stacklevel=2,
        )
    return out


def tokenize_pairs(tokenizer, rows: Sequence[dict], **kw) -> list[TokenizedExample]:
    """DPO examples: responses (chosen, rejected)."""
    return tokenize_examples(tokenizer, rows, ("chosen_response", "rejected_response"), **kw)


def tokenize_sft(tokenizer, rows: Sequence[dict], **kw) -> list[TokenizedExample]:
    """SFT examples from preference rows: one target per unique (system, prompt)."""
    return tokenize_examples(tokenizer, sft_targets(rows), ("target",), **kw)


def pad_id_for(tokenizer) -> int:
    """Padding id: the eos id as in the reference (padding is masked, so its value is inert)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token to pad with")
    return int(tokenizer.eos_token_id)


def load_examples(tokenizer, source: str | Path, *, mode: str, split: str = "train", **kw):
    """Load rows from `source` and tokenise them for `mode` ('dpo' pairs or 'sft' targets)."""
    rows = load_preference_rows(source, split=split)
    if mode == "dpo":
        return tokenize_pairs(tokenizer, rows, **kw)
    if mode == "sft":
        return tokenize_sft(tokenizer, rows, **kw)
    raise ValueError(f"unknown mode {mode!r}; expected 'dpo' or 'sft'")


# ----- batching ----------------------------------------------------------------------------


def bucket_length(n: int, *, pad_multiple: int = 64, max_length: int | None = None) -> int:
    """n rounded up to a multiple of pad_multiple, capped at max_length (never below n)."""
    t = int(math.ceil(n / pad_multiple) * pad_multiple) if pad_multiple else n
    if max_length is not None and n <= max_length:
        t = min(t, max_length)
    return max(t, n)


def collate(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    pad_multiple: int = 64,
    max_length: int | None = None,
    window_multiple: int | None = None,
    indices: Sequence[int] | None = None,
) -> SftBatch | TwoRowBatch:
    """Padded numpy batch in the row layout described in the module docstring (a DPO pair's two
    responses make a ``TwoRowBatch``, one response an ``SftBatch``), with response windows in
    multiples of window_multiple (default pad_multiple)."""
    n_resp = len(examples[0].response_ids)
    if any(len(e.response_ids) != n_resp for e in examples):
        raise ValueError("cannot mix DPO and SFT examples in one batch")
    seqs, prompt_lens = [], []
    for j in range(n_resp):  # response-major: all chosen rows, then all rejected rows
        for e in examples:
            seqs.append(e.prompt_ids + e.response_ids[j])
            prompt_lens.append(len(e.prompt_ids))
    t = bucket_length(max(map(len, seqs)), pad_multiple=pad_multiple, max_length=max_length)
    rows = len(seqs)
    input_ids = np.full((rows, t), pad_id, np.int32)
    attention_mask = np.zeros((rows, t), np.int32)
    labels = np.full((rows, t), IGNORE_INDEX, np.int32)
    for r, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[r, : len(seq)] = seq
        attention_mask[r, : len(seq)] = 1
        labels[r, p : len(seq)] = seq[p:]
    idx = np.arange(len(examples)) if indices is None else np.asarray(indices)
    batch = (TwoRowBatch if n_resp == 2 else SftBatch)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        position_ids=np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
        index=idx.astype(np.int64),
    )
    return add_response_windows(batch, window_multiple=(pad_multiple if window_multiple is None
                                                         else window_multiple))


def add_response_windows(batch: RowBatch, *, window_multiple: int = 64) -> RowBatch:
    """The batch (same type) with response_start / targets (module docstring), computed from
    its labels."""
    labels = np.asarray(batch.labels)
    rows, t = labels.shape
    has = labels != IGNORE_INDEX
    has[:, 0] = False  # position 0 is never predicted
    first = np.where(has.any(axis=1), has.argmax(axis=1), 1)
    last = np.where(has.any(axis=1), t - 1 - has[:, ::-1].argmax(axis=1), 1)
    start = (first - 1).astype(np.int32)
    w = min(t - 1, bucket_length(max(1, int((last - start).max())), pad_multiple=window_multiple))
    targets = np.full((rows, w), IGNORE_INDEX, np.int32)
    for r in range(rows):
        span = labels[r, start[r] + 1:start[r] + 1 + w]
        targets[r, :len(span)] = span
    return batch.replace(response_start=start, targets=targets)


def collate_prompt_shared(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    pad_multiple: int = 64,
    min_length: int = 0,
    window_multiple: int | None = None,
    indices: Sequence[int] | None = None,
) -> SharedPromptBatch:
    """One row per (chosen, rejected) pair in the prompt-shared layout (module docstring).

    T = the longest row rounded up to pad_multiple, at least min_length (one shape for jit);
    W = the longest chosen + rejected rounded up to window_multiple (default pad_multiple),
    at most T."""
    if any(len(e.response_ids) != 2 for e in examples):
        raise ValueError("the prompt-shared layout needs DPO pairs (chosen, rejected responses)")
    lengths = [len(e.prompt_ids) + len(e.response_ids[0]) + len(e.response_ids[1]) for e in examples]
    t = max(bucket_length(max(lengths), pad_multiple=pad_multiple), min_length)
    both = max(len(e.response_ids[0]) + len(e.response_ids[1]) for e in examples)
    w = min(t, bucket_length(max(both, 1), pad_multiple=pad_multiple if window_multiple is None
                             else window_multiple))
    rows = len(examples)
    input_ids = np.full((rows, t), pad_id, np.int32)
    attention_mask = np.zeros((rows, t), np.int32)
    position_ids = np.zeros((rows, t), np.int32)
    segment_ids = np.zeros((rows, t), np.int32)
    response_start = np.zeros((rows,), np.int32)
    chosen_targets = np.full((rows, w), IGNORE_INDEX, np.int32)
    rejected_targets = np.full((rows, w), IGNORE_INDEX, np.int32)
    for r, e in enumerate(examples):
        p, (chosen, rejected) = len(e.prompt_ids), e.response_ids
        c, n = len(chosen), lengths[r]
        if p == 0:
            raise ValueError(f"example {r}: empty prompt; nothing predicts the first response token")
        input_ids[r, :n] = e.prompt_ids + chosen + rejected
        attention_mask[r, :n] = 1
        position_ids[r, :p + c] = np.arange(p + c)
        position_ids[r, p + c:n] = np.arange(p, p + len(rejected))
        segment_ids[r, p:p + c] = 1
        segment_ids[r, p + c:n] = 2
        # Window slot j is position p-1+j. Position t predicts token t+1 inside a response; the
        # prompt's last position (slot 0) predicts the first token of both.
        response_start[r] = p - 1
        chosen_targets[r, :c] = chosen
        if rejected:
            rejected_targets[r, 0] = rejected[0]
            rejected_targets[r, c + 1:c + len(rejected)] = rejected[1:]
    idx = np.arange(len(examples)) if indices is None else np.asarray(indices)
    return SharedPromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        segment_ids=segment_ids,
        response_start=response_start,
        chosen_targets=chosen_targets,
        rejected_targets=rejected_targets,
        index=idx.astype(np.int64),
    )


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: `index` examples of epoch `epoch`'s order already consumed.

    Save `to_dict()` in a checkpoint and pass `from_dict(...)` back to `iterate_batches` to
    continue with exactly the batches an uninterrupted run would have seen.
    """

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches_per_epoch(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def iterate_batches(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    start: DataPosition = DataPosition(),
    epochs: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    pad_multiple: int = 64,
    max_length: int | None = None,
    collate_fn: Callable[[list[TokenizedExample], np.ndarray], Batch] | None = None,
) -> Iterator[tuple[Batch, DataPosition]]:
    """Yield (batch, position after this batch) from `start`, for `epochs` epochs (None = forever).

    drop_last keeps every batch the same size (fixed shapes under jit); the dropped tail differs
    every epoch because the order does. collate_fn(examples, indices) builds each batch (e.g.
    `collate_prompt_shared` with the caller's lengths); default `collate` with pad_multiple
    and max_length.
    """
    if collate_fn is None:
        def collate_fn(chunk, idx):
            return collate(chunk, pad_id=pad_id, pad_multiple=pad_multiple,
                           max_length=max_length, indices=idx)
    n = len(examples)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and n < batch_size:
        raise DataError(f"only {n} examples, fewer than one batch of {batch_size}")
    epoch, index = start.epoch, start.index
    while epochs is None or epoch < epochs:
        order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
        end = batches_per_epoch(n, batch_size, drop_last=drop_last) * batch_size
        end = min(end, n)
        while index < end:
            idx = order[index : index + batch_size]
            batch = collate_fn([examples[i] for i in idx], idx)
            index += len(idx)
            nxt = DataPosition(epoch, index) if index < end else DataPosition(epoch + 1, 0)
            yield batch, nxt
        epoch, index = epoch + 1, 0

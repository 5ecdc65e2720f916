"""What a training batch holds, defined once: the ignore label, the field lists and the typed
batch containers that ``data`` builds and ``logprobs`` / ``step`` / ``trainer`` consume.

A container's type says its layout (the layouts: ``cosa_jax.train.data``), so nothing tells
batches apart by which keys they carry. Each is a ``flax.struct`` dataclass, i.e. a pytree: the
same type holds numpy arrays on the host and ``jax.Array``s on the device, goes through
``jax.jit`` / ``jax.device_put`` / ``jax.lax.scan`` as it is, and a field left ``None`` is an
empty subtree (nothing is transferred or sharded for it). Axis letters: r rows, b pairs (or
examples), t time, w response window.
"""

from __future__ import annotations

from typing import Any, Union

from flax import struct

Array = Any  # np.ndarray on the host, jax.Array on the device

# Label of a position that carries no loss (prompt and padding); the value PyTorch and
# transformers use, so our labels read the same as theirs.
IGNORE_INDEX = -100

# Fields with one entry per row of a row layout (SFT rows; DPO: chosen rows, then rejected
# rows): the ones a micro-batch split keeps paired and the reference pass reads.
ROW_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "response_start", "targets")

# Per-pair side values riding along with a DPO batch [b] (or [grad_accum, b / grad_accum]):
# precomputed reference log-probs and score gaps. Tiny, and a pair count need not divide the
# device count, so they are replicated rather than sharded.
PAIR_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "pair_score_gap")


@struct.dataclass
class RowBatch:
    """One sequence per row, right-padded: [r, t] int32 each; ``response_start`` [r] and
    ``targets`` [r, w] when the batch has response windows (``data.add_response_windows``),
    else None (the log-probs then run over every position). ``index`` [b] int64: each
    example's row in the tokenised list (host only; the device batch leaves it None)."""
    input_ids: Array
    attention_mask: Array
    labels: Array
    position_ids: Array
    response_start: Array | None = None
    targets: Array | None = None
    index: Array | None = None


@struct.dataclass
class SftBatch(RowBatch):
    """SFT: r = b, one (prompt, target response) per row."""


@struct.dataclass
class TwoRowBatch(RowBatch):
    """Concatenated DPO: r = 2b, rows 0..b-1 the chosen sequences, rows b..2b-1 the rejected
    ones of the same pairs in the same order; optional per-pair values [b] (``PAIR_KEYS``)."""
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    pair_score_gap: Array | None = None


@struct.dataclass
class SharedPromptBatch:
    """Prompt-shared DPO: one row [prompt | chosen | rejected | padding] per pair. [b, t]:
    input_ids, attention_mask, position_ids, segment_ids (0 prompt, 1 chosen, 2 rejected);
    response_start [b]; chosen_targets / rejected_targets [b, w] (already shifted); optional
    per-pair values [b] (``PAIR_KEYS``) and the host-only ``index`` [b]."""
    input_ids: Array
    attention_mask: Array
    position_ids: Array
    segment_ids: Array
    response_start: Array
    chosen_targets: Array
    rejected_targets: Array
    index: Array | None = None
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    pair_score_gap: Array | None = None


PairBatch = Union[TwoRowBatch, SharedPromptBatch]
Batch = Union[SftBatch, TwoRowBatch, SharedPromptBatch]

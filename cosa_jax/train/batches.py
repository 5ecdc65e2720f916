"""What a training batch holds, defined once: the ignore label and the field lists.

Host side (``data``, numpy) and device side (``logprobs``, ``losses``, ``step``) both read
these, so the layouts documented in ``cosa_jax.train.data`` cannot drift apart. No JAX here:
the data pipeline imports it.
"""

from __future__ import annotations

# Label of a position that carries no loss (prompt and padding); the value PyTorch and
# transformers use, so our labels read the same as theirs.
IGNORE_INDEX = -100

# Fields with one entry per row of the concatenated layout (chosen rows, then rejected rows):
# the ones a micro-batch split keeps paired, and the ones the reference pass reads.
ROW_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "response_start", "targets")

# Per-pair side values (precomputed reference log-probs, score gaps), told by key prefix.
PER_PAIR_PREFIXES = ("ref_", "pair_")

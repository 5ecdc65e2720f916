"""Continuous batching: a decode loop over a fixed number of slots with a slot-indexed KV cache.

Why: a batch that runs until its longest request ends makes every short request wait for the
long ones and leaves finished rows idle. Here each of ``slots`` cache rows holds one request;
every step runs ONE jitted decode over all slots, and between steps requests leave (eos, stop
string, ``max_tokens``, cancel) and new ones join: their prompts are prefilled in chunks (a few
fixed chunk sizes, rows bucketed to powers of two) written straight into their slots' rows, so
a new request never compiles a new program for its length. The cache's length grows and shrinks
in power-of-two buckets with what the slots in use need, so the decode step reads only that.

Per request: temperature / top_p / top_k / seed / stop / max_tokens (``sampler.SamplingParams``),
log-probs of the chosen token and up to 20 alternatives, prompt-token log-probs (``echo``), and
an output constraint: any object with ``next_mask()`` (None, a [V] bool array or xgrammar's
packed int32 bitmask [ceil(V/32)]), ``accept(token)`` and ``is_terminated()``; its mask is
applied inside the jitted step. Where the constraint also offers ``forced_tokens`` (a grammar
that leaves no choice for a while: JSON keys, the rest of a choice), that run is written in one
chunk as a continuation of the row, like a prompt chunk, and its last position samples the
next free token: jump-forward decoding, a few steps per judge verdict instead of one per token.
Sampling keys are ``fold_in(key(seed), token_index)`` per request, as in ``sampler.generate``,
so a request's sample does not depend on its slot mates.

The loop runs in one background thread (``start()``/``close()``); ``submit`` is thread-safe and
returns a ``RequestHandle`` whose outputs arrive per step (a callback, or a blocking iterator).
``sampler.generate`` stays the tool for offline batch jobs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosa_jax.models.config import LlamaConfig
from cosa_jax.models.llama import KVCache, Params, forward, forward_hidden, init_cache, unembed

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------- public types
class OutputConstraint(Protocol):
    """What a grammar matcher must offer to constrain one request's tokens.

    Optionally also ``forced_tokens(limit) -> list[int]``: the tokens the grammar allows no
    alternative to from here (at most ``limit``), already advanced past. The engine then writes
    them in one chunk instead of one decode step each (jump-forward decoding).
    """

    def next_mask(self):
        """Allowed next tokens: None (all), a [V] bool array, or a packed int32 [ceil(V/32)]."""

    def accept(self, token: int) -> None:
        """Advance past a sampled token."""

    def is_terminated(self) -> bool:
        """True once the output is complete (the request then ends with 'stop')."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probs under the model's raw distribution (before temperature/mask)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), best first


@dataclasses.dataclass
class StepOutput:
    """What one step adds to a request: at most one token and the text that is now safe."""
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool = False
    finish_reason: str | None = None          # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclasses.dataclass
class EngineResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None   # position 0 has none
    time_to_first_token_s: float | None = None


@dataclasses.dataclass
class EngineStats:
    """Counters a test or an operator can read (``GET /stats``). A "batch" is a group of
    requests whose prefill ran together (they joined at the same step)."""
    requests: int = 0
    batches: int = 0
    max_batch_seen: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    decode_steps: int = 0
    slot_steps: int = 0          # sum over decode steps of the slots decoding
    prefill_chunks: int = 0      # prompt and forced-run chunks
    forced_tokens: int = 0       # output tokens the grammar forced (jump-forward: no decode step)
    forced_chunks: int = 0       # rows' forced-run chunks (a call of P rows counts P)
    cancelled: int = 0
    failed: int = 0
    busy_s: float = 0.0
    cache_len: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["busy_s"] = round(self.busy_s, 3)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d["mean_active_slots"] = round(self.slot_steps / max(self.decode_steps, 1), 3)
        return d


def pack_mask(allowed_v: np.ndarray) -> np.ndarray:
    """[V] bool -> int32 [ceil(V/32)], bit i of word j = token 32*j + i (xgrammar's layout)."""
    allowed_v = np.asarray(allowed_v, bool)
    words = -(-allowed_v.shape[-1] // 32)
    padded = np.zeros(allowed_v.shape[:-1] + (words * 32,), bool)
    padded[..., :allowed_v.shape[-1]] = allowed_v
    bits = padded.reshape(*allowed_v.shape[:-1], words, 32).astype(np.uint32)
    return (bits << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32).view(np.int32)


def unpack_mask(packed_sw: jax.Array, vocab: int) -> jax.Array:
    """int32 [.., W] -> bool [.., vocab] (inverse of ``pack_mask``), inside jit."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    words = jnp.take(packed_sw, ids // 32, axis=-1)
    return ((words >> (ids % 32)) & 1).astype(bool)


# ---------------------------------------------------------------------------- jitted math
def _sample_row(logits_v, temperature, top_p, top_k, key):
    """Temperature + top-k + top-p sampling of one row (the sampler's rule, one row at a time)."""
    vocab = logits_v.shape[-1]
    scaled = logits_v[None] / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[None, None], axis=-1)
    probs_sorted = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = (mass_before < top_p) & (sorted_desc >= kth)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1)[0].astype(jnp.int32)


def choose_tokens(logits_sv, temperature_s, top_p_s, top_k_s, seed_s, counter_s, allowed_sw,
                  *, top_n: int, any_sampling: bool):
    """Next token per row, its raw log-prob, and the top ``top_n`` raw log-probs.

    ``allowed_sw`` (packed bitmask or None) removes tokens before choosing; log-probs are of
    the model's own distribution so a harness sees what the model thinks, not the mask.
    """
    logp_sv = jax.nn.log_softmax(logits_sv, axis=-1)
    choosable = logits_sv
    if allowed_sw is not None:
        choosable = jnp.where(unpack_mask(allowed_sw, logits_sv.shape[-1]), logits_sv, -jnp.inf)
    tok_s = jnp.argmax(choosable, axis=-1).astype(jnp.int32)
    if any_sampling:
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_s, counter_s)
        sampled = jax.vmap(_sample_row)(choosable, temperature_s, top_p_s, top_k_s, keys)
        tok_s = jnp.where(temperature_s > 0, sampled, tok_s)
    chosen_s = jnp.take_along_axis(logp_sv, tok_s[:, None], axis=-1)[:, 0]
    if top_n:
        top_lp, top_id = jax.lax.top_k(logp_sv, top_n)
    else:
        top_lp = jnp.zeros((logits_sv.shape[0], 0), jnp.float32)
        top_id = jnp.zeros((logits_sv.shape[0], 0), jnp.int32)
    return tok_s, chosen_s, top_id.astype(jnp.int32), top_lp


_STATIC = ("cfg", "top_n", "any_sampling")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode_step(params: Params, cache: KVCache, tokens_s, active_s, temperature_s, top_p_s,
                top_k_s, seed_s, counter_s, allowed_sw=None, *, cfg: LlamaConfig, top_n: int,
                any_sampling: bool):
    """One token for every slot: rows with ``active_s`` False write nothing that counts."""
    logits_s1v, cache = forward(params, cfg, tokens_s[:, None], active_s[:, None], cache=cache)
    out = choose_tokens(logits_s1v[:, 0], temperature_s, top_p_s, top_k_s, seed_s, counter_s,
                        allowed_sw, top_n=top_n, any_sampling=any_sampling)
    return cache, out


@functools.partial(jax.jit, static_argnames=_STATIC + ("prompt_top_n",),
                   donate_argnames=("cache",))
def prefill_chunk(params: Params, cache: KVCache, slots_p, ids_pc, mask_pc, reset_p, lp_pos_pk,
                  targets_pk, temperature_p, top_p_p, top_k_p, seed_p, counter_p, allowed_pw=None,
                  *, cfg: LlamaConfig, top_n: int, any_sampling: bool, prompt_top_n: int | None):
    """Write one chunk of P rows at their slots' cache ends; sample from each row's last token.

    A chunk is part of a prompt or a grammar-forced run of output tokens (jump-forward).
    ``reset_p`` clears a row first (a request's first chunk); ``counter_p`` is the index of the
    token sampled (its sampling key). With ``prompt_top_n`` not None, also the log-prob of
    ``targets_pk`` (the next token after chunk position ``lp_pos_pk``) and the top-n there: only
    the K positions asked for are unembedded, not the whole [P, C, vocab].
    """
    valid = jnp.where(reset_p[:, None], False, cache.valid_bs[slots_p])
    rows = KVCache(cache.k_lbskh[:, slots_p], cache.v_lbskh[:, slots_p], valid,
                   jnp.where(reset_p, 0, cache.end_b[slots_p]))
    hidden_pcd, rows = forward_hidden(params, cfg, ids_pc, mask_pc, cache=rows)
    p = ids_pc.shape[0]
    last_p = jnp.maximum(mask_pc.sum(axis=1) - 1, 0)
    logits_pv = unembed(params, cfg, hidden_pcd[jnp.arange(p), last_p][:, None])[:, 0]
    out = choose_tokens(logits_pv, temperature_p, top_p_p, top_k_p, seed_p, counter_p,
                        allowed_pw, top_n=top_n, any_sampling=any_sampling)
    prompt = None
    if prompt_top_n is not None:
        hidden_pkd = jnp.take_along_axis(hidden_pcd, lp_pos_pk[..., None], axis=1)
        logp_pkv = jax.nn.log_softmax(unembed(params, cfg, hidden_pkd), axis=-1)
        target_lp = jnp.take_along_axis(logp_pkv, targets_pk[..., None], axis=-1)[..., 0]
        top_lp, top_id = jax.lax.top_k(logp_pkv, max(prompt_top_n, 1))
        prompt = (target_lp, top_id.astype(jnp.int32), top_lp)
    cache = KVCache(cache.k_lbskh.at[:, slots_p].set(rows.k_lbskh),
                    cache.v_lbskh.at[:, slots_p].set(rows.v_lbskh),
                    cache.valid_bs.at[slots_p].set(rows.valid_bs),
                    cache.end_b.at[slots_p].set(rows.end_b))
    return cache, out, prompt


def resize_cache(cache: KVCache, length: int) -> KVCache:
    """The same slots with ``length`` positions (padding with empty slots, or cutting)."""
    now = cache.valid_bs.shape[1]
    if length == now:
        return cache
    if length > now:
        pad = length - now
        kv_pad = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
        return KVCache(jnp.pad(cache.k_lbskh, kv_pad), jnp.pad(cache.v_lbskh, kv_pad),
                       jnp.pad(cache.valid_bs, ((0, 0), (0, pad))), cache.end_b)
    return KVCache(cache.k_lbskh[:, :, :length], cache.v_lbskh[:, :, :length],
                   cache.valid_bs[:, :length], jnp.minimum(cache.end_b, length))


# ---------------------------------------------------------------------------- detokenisation
class IncrementalText:
    """Token ids in, text out, never splitting a UTF-8 character or a stop string.

    Text is decoded over a window that starts a few tokens back (so merges and leading spaces
    come out as a whole decode would give them), a trailing U+FFFD (a character whose bytes are
    not all here yet) is held back, and so is any tail that could be the start of a stop string.
    The concatenated deltas equal the final text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop if s)
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self._prefix = 0      # window start (token index)
        self._read = 0        # tokens whose text is already in ``decoded``
        self.decoded = ""     # text of ids[:_read] as decoded so far
        self.emitted = 0      # characters of ``decoded`` handed out
        self.stopped = False

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that is safe to show after ``token``; sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        if token not in self.skip:
            self.ids.append(token)
            window = self._decode(self.ids[self._prefix:])
            if not window.endswith("\ufffd"):
                before = self._decode(self.ids[self._prefix:self._read])
                self.decoded += window[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (the request ended for another reason than a stop)."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):   # bytes of an unfinished character: decode as is
            window = self._decode(self.ids[self._prefix:])
            before = self._decode(self.ids[self._prefix:self._read])
            self.decoded += window[len(before):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self.decoded[self.emitted:]
        if self.stops:
            # A stop string cannot start inside emitted text (such a tail is always held back).
            hits = [at for at in (pending.find(s) for s in self.stops) if at >= 0]
            if hits:
                self.stopped = True
                out = pending[:min(hits)]
                self.decoded = self.decoded[:self.emitted] + out
                self.emitted = len(self.decoded)
                return out
            if not final:
                hold = 0
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(pending)), hold, -1):
                        if pending.endswith(s[:k]):
                            hold = k
                            break
                pending = pending[:len(pending) - hold]
        self.emitted += len(pending)
        return pending

    @property
    def text(self) -> str:
        return self.decoded[:self.emitted]


# ---------------------------------------------------------------------------- requests
class RequestHandle:
    """A submitted request: ``cancel()`` frees its slot at the next step; without a callback
    ``outputs()`` yields its StepOutputs and ``result()`` waits for the EngineResult."""

    def __init__(self, rid: int, prompt_ids, sampling, logprobs, prompt_logprobs, constraint,
                 on_output):
        self.id, self.prompt_ids, self.sampling = rid, list(prompt_ids), sampling
        self.logprobs, self.prompt_logprobs, self.constraint = logprobs, prompt_logprobs, constraint
        self._on_output = on_output
        self._queue: queue.SimpleQueue | None = None if on_output else queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result_value: EngineResult | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancel_reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancel_reason = reason
        self.cancelled.set()

    def _emit(self, out: StepOutput) -> None:
        if self._on_output is not None:
            self._on_output(out)
        else:
            self._queue.put(out)

    def outputs(self, timeout: float | None = None) -> Iterator[StepOutput]:
        if self._queue is None:
            raise RuntimeError("this request reports through its callback")
        while True:
            out = self._queue.get(timeout=timeout)
            yield out
            if out.finished:
                return

    def result(self, timeout: float | None = None) -> EngineResult:
        if self._queue is not None and not self.done.is_set():
            for _ in self.outputs(timeout):
                pass
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.result_value.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed: {self._error}")
        return self.result_value

    _error: str | None = None


@dataclasses.dataclass
class _Slot:
    """One request in its cache row. Its sequence is prompt + tokens + forced; ``chunks`` cover
    sequence positions [chunks[0][0], span_end) still to be written (a prompt, or a forced run
    led by the last sampled token), after which the row samples its next token (if
    ``sample_after``) and the forced tokens are handed out."""
    handle: RequestHandle
    detok: IncrementalText | None
    chunks: list[tuple[int, int]]          # (sequence start, bucket size) still to write
    need: int                              # cache positions this request may use
    span_end: int = 0                      # end (sequence index) of what ``chunks`` write
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
    text_parts: list[str] = dataclasses.field(default_factory=list)
    last_token: int = 0
    forced: list[int] = dataclasses.field(default_factory=list)   # taken, not yet handed out
    forced_lp: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
    sample_after: bool = True              # the request goes on after ``forced``
    fresh: bool = True                     # the grammar's opening run is not yet taken

    @property
    def decoding(self) -> bool:
        return not self.chunks

    def seq(self, start: int, stop: int) -> list[int]:
        return (self.handle.prompt_ids + self.tokens + self.forced)[start:stop]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class Engine:
    """The slot loop. ``Engine(params, cfg, eos_ids=..., tokenizer=...).start()``; then
    ``submit(prompt_ids, SamplingParams(...))`` from any thread.

    slots: rows decoded together; chunk_sizes: the prefill chunk lengths compiled (a prompt is
    cut into chunks of the largest, its tail padded to the smallest that holds it);
    prefill_budget: prompt tokens (padded) prefilled between two decode steps, so joining
    requests delay running ones by a bounded amount; max_cache_len: the longest prompt +
    max_tokens a slot holds; join_wait_s: while nothing decodes, how long the oldest waiting
    request waits for company so that its prefill is shared.

    jump_forward: where a request's constraint offers ``forced_tokens`` (a grammar leaves no
    choice: JSON keys, the rest of a choice), write that run in one chunk with the last sampled
    token, as a prompt continuation, instead of one decode step per token (vLLM and SGLang's
    jump-forward decoding); forced_chunk_sizes: the chunk lengths such runs are padded to
    (longer runs are cut into chunks of the largest; small buckets waste little padding).
    The output is the one the grammar forces either way; its tokenisation is the grammar's
    canonical one, where stepping lets the model spell forced text its own way.
    """

    def __init__(self, params: Params, cfg: LlamaConfig, *, eos_ids: Sequence[int],
                 tokenizer=None, slots: int = 16, chunk_sizes: Sequence[int] = (16, 64, 256),
                 prefill_budget: int = 512, max_cache_len: int | None = None,
                 min_cache_len: int = 128, join_wait_s: float = 0.0, jump_forward: bool = True,
                 forced_chunk_sizes: Sequence[int] = (8, 16, 32, 64)):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not eos_ids:
            raise ValueError("no end-of-sequence id: pass eos_ids")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.slots = slots
        self.chunk_sizes = tuple(sorted(int(c) for c in chunk_sizes))
        self.prefill_budget = max(prefill_budget, self.chunk_sizes[-1])
        self.max_cache_len = min(max_cache_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.min_cache_len = min(min_cache_len, self.max_cache_len)
        self.join_wait_s = join_wait_s
        self.jump_forward = jump_forward
        self.forced_chunk_sizes = tuple(sorted(int(c) for c in forced_chunk_sizes))
        self.vocab = cfg.vocab_size
        self.words = -(-self.vocab // 32)
        self.stats = EngineStats()
        self._cache: KVCache | None = None
        self._cache_len = 0
        self._slots: list[_Slot | None] = [None] * slots
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._fatal: BaseException | None = None
        # Per-slot sampling settings, rebuilt as slots fill.
        self._temp = np.zeros(slots, np.float32)
        self._top_p = np.ones(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._seed = np.zeros(slots, np.uint32)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="cosa-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        for h in list(self._waiting) + [s.handle for s in self._slots if s is not None]:
            self._finish_unstarted(h, "error", "engine shut down")
        self._waiting.clear()
        self._slots = [None] * self.slots

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ submission
    def cache_need(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache positions a request uses: its prompt chunks and its new tokens."""
        plan = self._chunk_plan(prompt_len)
        return max(prompt_len + max_new_tokens - 1, plan[-1][0] + plan[-1][1])

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return self.cache_need(prompt_len, max_new_tokens) <= self.max_cache_len

    def _chunk_plan(self, prompt_len: int, start: int = 0,
                    sizes: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Chunks covering sequence positions [start, prompt_len): the largest size while more
        remains, the tail padded to the smallest size that holds it."""
        sizes = sizes or self.chunk_sizes
        big, plan = sizes[-1], []
        while prompt_len - start > big:
            plan.append((start, big))
            start += big
        rest = prompt_len - start
        plan.append((start, next(c for c in sizes if c >= rest)))
        return plan

    def submit(self, prompt_ids: Sequence[int], sampling, *, logprobs: int | None = None,
               prompt_logprobs: int | None = None, constraint: OutputConstraint | None = None,
               on_output: Callable[[StepOutput], None] | None = None) -> RequestHandle:
        """Queue a request. ``logprobs``: None, or how many alternatives (0..20) to report per
        token; ``prompt_logprobs``: the same for each prompt token (echo)."""
        if self._fatal is not None:
            raise RuntimeError(f"engine stopped after an error: {self._fatal}")
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {n}")
        if not self.fits(len(prompt_ids), sampling.max_new_tokens):
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                             f"({sampling.max_new_tokens}) need "
                             f"{self.cache_need(len(prompt_ids), sampling.max_new_tokens)} cache "
                             f"positions; this engine holds {self.max_cache_len}")
        with self._cv:
            self._next_id += 1
            h = RequestHandle(self._next_id, prompt_ids, sampling, logprobs, prompt_logprobs,
                              constraint, on_output)
            self._waiting.append(h)
            self._cv.notify_all()
        return h

    def generate(self, prompts: Sequence[Sequence[int]], sampling, **kw) -> list[EngineResult]:
        """Blocking convenience: submit all, wait for all (the loop must be started)."""
        per = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        handles = [self.submit(p, s, **kw) for p, s in zip(prompts, per)]
        return [h.result() for h in handles]

    def warmup(self, prompt_len: int, max_new_tokens: int) -> None:
        """Compile, before serving, the programs requests of this shape will use: a prefill
        for every row bucket (1, 2, 4, .. slots) and the decode step at the cache length such
        requests need. Call before ``start()``."""
        if self._thread is not None:
            raise RuntimeError("warmup() drives the loop itself: call it before start()")
        from cosa_jax.inference.sampler import SamplingParams
        rows = 1
        while rows <= self.slots:
            handles = [self.submit([0] * prompt_len, SamplingParams(max_new_tokens=max_new_tokens))
                       for _ in range(rows)]
            self.step()
            self.step()
            for h in handles:
                h.cancel("warm-up done")
            self.step()
            rows *= 2
        self.stats = EngineStats()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and self.active == 0:
                        self._cv.wait()
                    if self._stop:
                        return
                    if self.active == 0 and self.join_wait_s > 0:
                        deadline = self._waiting[0].arrived + self.join_wait_s
                        while (not self._stop and len(self._waiting) < self.slots
                               and time.perf_counter() < deadline):
                            self._cv.wait(max(deadline - time.perf_counter(), 0))
                started = time.perf_counter()
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
                    log.exception("engine step failed; failing the requests in its slots")
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._fail(i, e)
                    self._cache = None   # it may have been donated to the failed program
                self.stats.busy_s += time.perf_counter() - started
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
            log.exception("engine loop failed; failing its requests")
            self._fatal = e
            for s in self._slots:
                if s is not None:
                    self._finish_unstarted(s.handle, "error", f"{type(e).__name__}: {e}")
            with self._cv:
                for h in self._waiting:
                    self._finish_unstarted(h, "error", f"{type(e).__name__}: {e}")
                self._waiting.clear()
            self._slots = [None] * self.slots

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        while self._waiting and None in self._slots:
            h = self._waiting.popleft()
            if h.cancelled.is_set():
                self.stats.cancelled += 1
                log.info("request %d %s while waiting: dropped", h.id, h.cancel_reason)
                self._finish_unstarted(h, "cancelled")
                continue
            i = self._slots.index(None)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalText(self.tokenizer, h.sampling.stop, self.eos_ids)
            self._slots[i] = _Slot(h, detok, self._chunk_plan(len(h.prompt_ids)),
                                   self.cache_need(len(h.prompt_ids), h.sampling.max_new_tokens),
                                   span_end=len(h.prompt_ids))
            s = h.sampling
            self._temp[i], self._top_p[i] = s.temperature, s.top_p
            self._top_k[i] = min(s.top_k, self.vocab)
            self._seed[i] = s.seed % 2**32
            self.stats.requests += 1

    def _finish_unstarted(self, h: RequestHandle, reason: str, error: str | None = None) -> None:
        if h.done.is_set():
            return
        h._error = error
        h.result_value = EngineResult([], "", reason, len(h.prompt_ids), None, None)
        h._emit(StepOutput([], "", [], True, reason, error))
        h.done.set()

    def _ensure_cache(self) -> None:
        need = max((s.need for s in self._slots if s is not None), default=0)
        length = min(max(_pow2_at_least(need), self.min_cache_len), self.max_cache_len)
        if self._cache is None:
            self._cache = init_cache(self.cfg, self.slots, length)
        elif length != self._cache_len:
            self._cache = resize_cache(self._cache, length)
        self._cache_len = self.stats.cache_len = length

    def step(self) -> None:
        """One scheduling step: admit waiting requests to free slots, drop cancelled ones,
        prefill chunks within the budget, then one decode step over the slots decoding.
        The loop thread calls it; a test may drive an engine that was never started."""
        with self._cv:
            self._admit()
        for i, s in enumerate(self._slots):
            if s is not None and s.handle.cancelled.is_set():
                self.stats.cancelled += 1
                quiet = s.handle.cancel_reason == "warm-up done"
                (log.debug if quiet else log.info)(
                    "request %d %s: slot %d freed after %d tokens", s.handle.id,
                    s.handle.cancel_reason, i, len(s.tokens))
                self._finish(i, "cancelled")
        for i, s in enumerate(self._slots):
            if s is not None and s.fresh:
                s.fresh = False
                self._jump(i)
        if self.active == 0:
            return
        self._ensure_cache()
        prefilling = [i for i, s in enumerate(self._slots) if s is not None and not s.decoding]
        if prefilling:
            self._prefill(prefilling)
        decoding = [i for i, s in enumerate(self._slots)
                    if s is not None and s.decoding and s.tokens]
        if decoding:
            self._decode(decoding)

    # ------------------------------------------------------------------ prefill
    def _echo_chunk(self, s: _Slot) -> bool:
        """The slot's next chunk holds prompt positions whose log-probs were asked for (echo)."""
        return s.handle.prompt_logprobs is not None and s.chunks[0][0] < len(s.handle.prompt_ids)

    def _prefill(self, prefilling: list[int]) -> None:
        """Chunks for the slots still writing a prompt or a forced run: rows with the same chunk
        size go together (echo rows alone: their [rows, chunk, vocab] log-probs are large); the
        first group always runs, later ones while the step's token budget lasts."""
        groups: dict[tuple[int, bool], list[int]] = collections.defaultdict(list)
        for i in prefilling:
            s = self._slots[i]
            groups[(s.chunks[0][1], self._echo_chunk(s))].append(i)
        budget = self.prefill_budget
        ran = False
        for (size, echo) in sorted(groups):
            rows = groups[(size, echo)]
            free = [i for i, s in enumerate(self._slots) if s is None]
            while rows:
                p = 1 if echo else _pow2_at_least(len(rows))
                if p > len(rows) + len(free):   # not enough spare rows to pad: a smaller group
                    p //= 2
                if ran and p * size > budget:
                    return
                group, rows = rows[:p], rows[p:]
                self._prefill_group(group, free[:p - len(group)], size)
                budget -= p * size
                ran = True

    def _prefill_group(self, group: list[int], pads: list[int], size: int) -> None:
        p = len(group) + len(pads)
        ids = np.zeros((p, size), np.int32)
        mask = np.zeros((p, size), bool)
        reset = np.zeros(p, bool)
        counter = np.zeros(p, np.int32)
        slots_p = np.asarray(group + pads, np.int32)
        echo = [self._echo_chunk(self._slots[i]) for i in group]
        # Log-probs at K chunk positions: every position for echo, else those predicting a
        # forced token (a forced run or a prompt's forced tail holds at most the largest
        # forced chunk's worth per chunk).
        k_lp = size if any(echo) else min(size, self.forced_chunk_sizes[-1])
        lp_pos = np.zeros((p, k_lp), np.int32)
        lp_targets = np.zeros((p, k_lp), np.int32)
        lp_where: list[list[tuple[int, int]]] = []   # per row: (k, sequence index of target)
        want_lp = None
        sample = []
        for r, i in enumerate(group):
            s = self._slots[i]
            h = s.handle
            start, _ = s.chunks[0]
            stop = min(start + size, s.span_end)
            seq = s.seq(start, stop + 1)          # the chunk and the token after it
            n = stop - start
            ids[r, :n] = seq[:n]
            mask[r, :n] = True
            reset[r] = start == 0
            counter[r] = len(s.tokens) + len(s.forced)   # the sampled token's index
            sample.append(len(s.chunks) == 1 and s.sample_after)
            base = len(h.prompt_ids) + len(s.tokens)     # sequence index of forced[0]
            forced_lp = h.logprobs is not None and bool(s.forced)
            if echo[r]:
                ts = list(range(n))
            elif forced_lp:
                ts = [t for t in range(n) if base <= start + t + 1 < base + len(s.forced)]
            else:
                ts = []
            for want, on in ((h.prompt_logprobs, echo[r]), (h.logprobs, forced_lp)):
                if on:
                    want_lp = max(want_lp or 0, want)
            lp_where.append([])
            for k, t in enumerate(ts):
                lp_pos[r, k] = t
                lp_targets[r, k] = seq[t + 1] if t + 1 < len(seq) else 0
                lp_where[r].append((k, start + t + 1))
        reset[len(group):] = True
        masks = []
        for i, smp in zip(group, sample):
            try:
                masks.append(self._next_mask(self._slots[i]) if smp else None)
            except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
                self._fail(i, e)
                masks.append(None)
        allowed = None
        if any(m is not None for m in masks):
            allowed = np.full((p, self.words), -1, np.int32)
            for r, m in enumerate(masks):
                if m is not None:
                    allowed[r] = m
        top_n = self._top_n([i for i, smp in zip(group, sample) if smp])
        rows = slots_p.tolist()
        temp = np.zeros(p, np.float32)
        temp[:len(group)] = np.where(sample, self._temp[group], 0)
        self._cache, out, prompt = prefill_chunk(
            self.params, self._cache, jnp.asarray(slots_p), jnp.asarray(ids), jnp.asarray(mask),
            jnp.asarray(reset), jnp.asarray(lp_pos), jnp.asarray(lp_targets), jnp.asarray(temp),
            jnp.asarray(self._top_p[rows]), jnp.asarray(self._top_k[rows]),
            jnp.asarray(self._seed[rows]), jnp.asarray(counter),
            None if allowed is None else jnp.asarray(allowed),
            cfg=self.cfg, top_n=top_n, any_sampling=bool((temp > 0).any()),
            prompt_top_n=want_lp)
        self.stats.prefill_chunks += 1
        if all(self._slots[i] is not None and self._slots[i].chunks[0][0] == 0 for i in group):
            self.stats.batches += 1
            self.stats.batch_sizes[len(group)] = self.stats.batch_sizes.get(len(group), 0) + 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(group))
        tok, lp, top_id, top_lp = (np.asarray(x) for x in out)
        if prompt is not None:
            p_lp, p_top_id, p_top_lp = (np.asarray(x) for x in prompt)
        for r, i in enumerate(group):
            s = self._slots[i]
            if s is None:   # failed meanwhile
                continue
            h = s.handle
            start, _ = s.chunks.pop(0)
            if echo[r] and start == 0:
                s.prompt_logprobs.append(None)
            prompt_len, base = len(h.prompt_ids), len(h.prompt_ids) + len(s.tokens)
            for k, j in lp_where[r]:
                if j < prompt_len:
                    entry = (h.prompt_ids[j], h.prompt_logprobs, s.prompt_logprobs.append)
                elif base <= j < base + len(s.forced) and h.logprobs is not None:
                    entry = (s.forced[j - base], h.logprobs,
                             functools.partial(s.forced_lp.__setitem__, j - base))
                else:
                    continue
                token, top, put = entry
                put(TokenLogprob(int(token), float(p_lp[r, k]), tuple(zip(
                    p_top_id[r, k, :top].tolist(), p_top_lp[r, k, :top].tolist()))))
            if s.chunks:
                continue
            if s.forced and not self._emit_forced(i):
                continue
            if s.sample_after:
                t = int(tok[r])
                self._accept(i, t, self._token_lp(h, t, lp[r], top_id[r], top_lp[r]))
            else:   # the forced run was to end the request; it did not (cannot happen)
                self._finish(i, "length")

    # ------------------------------------------------------------------ jump-forward
    def _jump(self, i: int) -> None:
        """Take the run of tokens the slot's grammar forces next and schedule it as a chunk
        (led by the last sampled token, at the row's cache end; at the start of the output,
        appended to the prompt), so those tokens cost no decode steps. The chunk's last
        position samples the next free token, under the mask after the run."""
        s = self._slots[i]
        h = s.handle
        take = getattr(h.constraint, "forced_tokens", None)
        budget = h.sampling.max_new_tokens - len(s.tokens)
        if not self.jump_forward or take is None or budget <= 0:
            return
        base = len(h.prompt_ids) + len(s.tokens)
        if s.tokens:
            start, sizes, limit = base - 1, self.forced_chunk_sizes, budget
        else:
            start, sizes = 0, self.chunk_sizes
            limit = min(budget, self.forced_chunk_sizes[-1])

        def plan_for(m: int, ending: bool):
            # An ending run's last token is never written: nothing is sampled after it.
            return self._chunk_plan(base + m - ending, start, sizes)

        def plan_end(plan):
            return plan[-1][0] + plan[-1][1]

        while limit > 0 and plan_end(plan_for(limit, limit >= budget)) > self.max_cache_len:
            limit -= 1            # near the longest cache a slot holds: a shorter run
        if limit <= 0:
            return
        try:
            forced = [int(t) for t in take(limit)][:limit]
        except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
            self._fail(i, e)
            return
        if not forced:
            return
        eos = next((j for j, t in enumerate(forced) if t in self.eos_ids), None)
        if eos is not None:
            forced = forced[:eos + 1]
        ending = len(forced) >= budget or eos is not None
        s.forced, s.forced_lp = forced, [None] * len(forced)
        self.stats.forced_tokens += len(forced)
        if s.tokens and ending and h.logprobs is None:   # nothing to compute: hand them out
            self._emit_forced(i)
            return
        plan = plan_for(len(forced), ending)
        s.chunks, s.span_end, s.sample_after = plan, base + len(forced) - ending, not ending
        s.need = max(s.need, plan_end(plan))
        if s.tokens:
            self.stats.forced_chunks += len(plan)

    def _emit_forced(self, i: int) -> bool:
        """Hand out the slot's forced run as generated tokens, in order (a stop string, the
        end-of-sequence id or max_tokens may end the request inside it); True if it goes on."""
        s = self._slots[i]
        forced, lps = s.forced, s.forced_lp
        s.forced, s.forced_lp = [], []
        for token, lp in zip(forced, lps):
            self._accept(i, token, lp, forced=True)
            if self._slots[i] is not s:
                return False
        return True

    # ------------------------------------------------------------------ decode
    def _decode(self, decoding: list[int]) -> None:
        active = np.zeros(self.slots, bool)
        active[decoding] = True
        tokens = np.zeros(self.slots, np.int32)
        counter = np.zeros(self.slots, np.int32)
        allowed = None
        for i in list(decoding):
            s = self._slots[i]
            tokens[i], counter[i] = s.last_token, len(s.tokens)
            try:
                m = self._next_mask(s)
            except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
                self._fail(i, e)
                decoding.remove(i)
                active[i] = False
                continue
            if m is not None:
                if allowed is None:
                    allowed = np.full((self.slots, self.words), -1, np.int32)
                allowed[i] = m
        temp = np.where(active, self._temp, 0).astype(np.float32)
        self._cache, out = decode_step(
            self.params, self._cache, jnp.asarray(tokens), jnp.asarray(active),
            jnp.asarray(temp), jnp.asarray(self._top_p), jnp.asarray(self._top_k),
            jnp.asarray(self._seed), jnp.asarray(counter),
            None if allowed is None else jnp.asarray(allowed),
            cfg=self.cfg, top_n=self._top_n(decoding), any_sampling=bool((temp > 0).any()))
        tok, lp, top_id, top_lp = (np.asarray(x) for x in out)
        self.stats.decode_steps += 1
        self.stats.slot_steps += len(decoding)
        for i in decoding:
            t = int(tok[i])
            self._accept(i, t, self._token_lp(self._slots[i].handle, t, lp[i], top_id[i],
                                              top_lp[i]))

    def _top_n(self, rows: list[int]) -> int:
        want = [self._slots[i].handle.logprobs for i in rows]
        return MAX_TOP_LOGPROBS if any(w for w in want if w) else 0

    @staticmethod
    def _token_lp(h: RequestHandle, token: int, logprob, top_id, top_lp) -> TokenLogprob | None:
        if h.logprobs is None:
            return None
        k = h.logprobs
        return TokenLogprob(token, float(logprob),
                            tuple(zip(top_id[:k].tolist(), top_lp[:k].tolist())))

    def _next_mask(self, s: _Slot):
        c = s.handle.constraint
        if c is None:
            return None
        m = c.next_mask()
        if m is None:
            return None
        m = np.asarray(m)
        if m.dtype == bool:
            if m.shape != (self.vocab,):
                raise ValueError(f"constraint mask has shape {m.shape}, expected ({self.vocab},)")
            return pack_mask(m)
        if m.shape[-1] < self.words:
            raise ValueError(f"packed constraint mask has {m.shape[-1]} words, need {self.words}")
        return m.reshape(-1)[:self.words].astype(np.int32)

    def _accept(self, i: int, token: int, lp: TokenLogprob | None, *, forced: bool = False) -> None:
        """One output token: log-prob, text, end checks, the step's output. A ``forced`` token
        is already inside the constraint (``_jump`` took it); after a sampled one that does not
        end the request, the grammar's next forced run is taken."""
        s = self._slots[i]
        h = s.handle
        if h.first_token_at is None:
            h.first_token_at = time.perf_counter()
        s.tokens.append(token)
        s.last_token = token
        lps = []
        if h.logprobs is not None and lp is not None:
            lps = [lp]
            s.logprobs.append(lp)
        text = s.detok.add(token) if s.detok is not None else ""
        reason = None
        if h.constraint is not None and not forced:
            try:
                h.constraint.accept(token)
                if h.constraint.is_terminated():
                    reason = "stop"
            except Exception as e:  # noqa: BLE001 - a broken constraint fails its request only
                self._fail(i, e)
                return
        if token in self.eos_ids or (s.detok is not None and s.detok.stopped):
            reason = "stop"
        elif reason is None and len(s.tokens) >= h.sampling.max_new_tokens:
            reason = "length"
        if reason is not None and s.detok is not None:
            text += s.detok.finish()
        if text:
            s.text_parts.append(text)
        if reason is None:
            h._emit(StepOutput([token], text, lps))
            if not forced:
                self._jump(i)
        else:
            self._finish(i, reason, StepOutput([token], text, lps))

    def _fail(self, i: int, error: BaseException) -> None:
        log.warning("request %d failed: %s: %s", self._slots[i].handle.id, type(error).__name__,
                    error)
        self.stats.failed += 1
        self._slots[i].handle._error = f"{type(error).__name__}: {error}"
        self._finish(i, "error", StepOutput([], "", [], error=self._slots[i].handle._error))

    def _finish(self, i: int, reason: str, last: StepOutput | None = None) -> None:
        s = self._slots[i]
        h = s.handle
        self._slots[i] = None
        ttft = None if h.first_token_at is None else h.first_token_at - h.arrived
        h.result_value = EngineResult(
            s.tokens, "".join(s.text_parts), reason, len(h.prompt_ids),
            s.logprobs if h.logprobs is not None else None,
            s.prompt_logprobs if h.prompt_logprobs is not None else None, ttft)
        last = last or StepOutput([], "", [])
        last.finished, last.finish_reason = True, reason
        h._emit(last)
        h.done.set()

"""Output constraints (choice, regex, JSON schema, any JSON object, Lark grammar) as per-step
token masks, compiled by llguidance.

Why llguidance: ``bench/grammar_engines.py`` measured xgrammar, llguidance and outlines-core on
SmolLM2's vocabulary for the judges' shapes; all three mask a token far faster than a decode
step, but a server compiles a schema per request, and xgrammar (a bounded string field) and
outlines-core (any string field) compiled orders of magnitude slower than llguidance
(figures in bench/results/cpu_2026-12-02/grammar_engines.txt). It
also takes Lark grammars, so ``grammar`` constraints work. We write no grammar engine of our own.

The API a decode loop uses, per request (slot) and per step::

    constraint = OutputConstraint("json_schema", schema, field="response_format.json_schema")
    compiler = ConstraintCompiler.for_tokenizer(tokenizer, vocab_size=cfg.vocab_size,
                                                eos_ids=eos_ids)   # cached per tokenizer
    state = compiler.start(constraint)          # ConstraintState, one per request
    bitmask = new_bitmask(batch, cfg.vocab_size)  # int32 [B, ceil(V/32)], bit v = token v allowed
    loop:
        fill_bitmasks(states_or_None_per_row, bitmask, compiler)  # free rows: all ones;
                                                # several constrained rows fill in parallel
        ... device: sampler.apply_bitmask(logits, bitmask) (-inf where not allowed), pick ...
        state.accept(token)                     # raises ConstraintError if the token breaks it
        state.forced_tokens()                   # optional: the run the grammar forces next,
                                                # accepted (jump-forward: no step per token)
        state.is_terminated                     # accepted an end-of-sequence token: row is done
        state.can_end                           # the text so far is a complete match

End-of-sequence ids are allowed by the mask only where the grammar accepts (``can_end``); once
the grammar can take nothing more, only they are. ``OutputConstraint`` validates on
construction and raises ``ConstraintError`` naming ``field`` for a bad schema, regex or grammar,
so a server can turn it into a 400 that names the request field. JSON constraints produce
one line with json.dumps' separators (", ", ": "). A state is not thread-safe; the compiler's
tokenizer-level cache is locked.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import weakref
from typing import Any, Literal, Sequence

import numpy as np

ConstraintKind = Literal["choice", "regex", "json_schema", "json_object", "grammar"]
KINDS: tuple[str, ...] = ("choice", "regex", "json_schema", "json_object", "grammar")


class ConstraintError(ValueError):
    """A constraint that cannot be compiled or a token it refuses; ``field`` names the input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _checker():
    """The engine's own validator, with no tokenizer (grammar syntax and schema support)."""
    import llguidance
    return llguidance.LLMatcher


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """What a request's output must match. ``value``: a tuple of strings (choice), a pattern
    (regex), a schema dict (json_schema), None (json_object: any JSON object) or Lark text
    (grammar). ``field`` is the request field it came from, for error messages."""
    kind: ConstraintKind
    value: Any = None
    field: str = ""

    def __post_init__(self):
        field = self.field or self.kind
        object.__setattr__(self, "field", field)
        if self.kind not in KINDS:
            raise ConstraintError(field, f"unknown constraint kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "choice":
            if isinstance(self.value, str) or not isinstance(self.value, Sequence) or not self.value:
                raise ConstraintError(field, "choice needs a non-empty list of strings")
            for i, c in enumerate(self.value):
                if not isinstance(c, str) or not c:
                    raise ConstraintError(f"{field}[{i}]", f"choice must be a non-empty string, got {c!r}")
            object.__setattr__(self, "value", tuple(self.value))
        elif self.kind in ("regex", "grammar"):
            if not isinstance(self.value, str) or not self.value:
                raise ConstraintError(field, f"{self.kind} must be a non-empty string")
        elif self.kind == "json_schema":
            value = self.value
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConstraintError(field, f"schema is not valid JSON: {e}") from None
            if not isinstance(value, (dict, bool)):
                raise ConstraintError(field, f"schema must be a JSON object, got {type(value).__name__}")
            _check_json_schema(value, field)
            # Frozen and hashable: the compiler caches on the canonical text.
            object.__setattr__(self, "value", json.loads(json.dumps(value)))
        elif self.value is not None:
            raise ConstraintError(field, "json_object takes no value")
        error = _checker().validate_grammar(self.grammar())
        if error:
            raise ConstraintError(field, f"invalid {self.kind}: {error.strip()}")

    def grammar(self) -> str:
        """The llguidance grammar text for this constraint."""
        m = _checker()
        if self.kind == "choice":
            # Lark string literals take JSON escapes, so any text (quotes, unicode) is literal.
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        if self.kind == "regex":
            return m.grammar_from_regex(self.value)
        if self.kind == "grammar":
            return m.grammar_from_lark(self.value)
        schema = {"type": "object"} if self.kind == "json_object" else self.value
        # One line of JSON with json.dumps' separators: no runs of whitespace for a model to
        # wander into before a closing brace (a schema's own "x-guidance" options still win).
        return m.grammar_from_json_schema(json.dumps(schema, sort_keys=True), defaults=_JSON_LAYOUT)

    def cache_key(self) -> tuple[str, str]:
        value = json.dumps(self.value, sort_keys=True) if self.kind == "json_schema" else repr(self.value)
        return self.kind, value


_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _check_json_schema(schema: Any, field: str) -> None:
    """JSON Schema's own meta-schema first (a typo'd ``type`` names its path)."""
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator
                                            ).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise ConstraintError(field + where, f"invalid JSON schema: {e.message}") from None


class ConstraintState:
    """One request's position in its constraint; made by ``ConstraintCompiler.start``."""

    def __init__(self, matcher, constraint: OutputConstraint, eos_ids: tuple[int, ...]):
        self._m = matcher
        self.constraint = constraint
        self._eos = eos_ids
        self.tokens_accepted = 0
        self._ended = False

    @property
    def matcher(self):
        """The llguidance ``LLMatcher`` (for ``fill_bitmasks``' parallel fill)."""
        return self._m

    def fill_mask(self, bitmask_row: np.ndarray) -> None:
        """Write the allowed next tokens into one contiguous int32 bitmask row."""
        self._m.unsafe_compute_mask_ptr(bitmask_row.ctypes.data, bitmask_row.nbytes)

    def allowed_tokens(self, vocab_size: int) -> np.ndarray:
        row = np.zeros(bitmask_width(vocab_size), np.int32)
        self.fill_mask(row)
        return np.flatnonzero(unpack_bitmask(row[None], vocab_size)[0])

    def accept(self, token: int) -> None:
        """Advance by one generated token; a token outside the last mask is an error."""
        if not self._m.consume_token(int(token)):
            raise ConstraintError(self.constraint.field, f"token {int(token)} breaks the "
                                  f"constraint: {self._m.get_error()}")
        self.tokens_accepted += 1
        self._ended = int(token) in self._eos

    def forced_tokens(self, limit: int | None = None) -> list[int]:
        """The tokens the grammar allows no alternative to from here (at most ``limit``),
        accepted, so the next mask is the one after them (jump-forward decoding). They are
        llguidance's tokenisation of the forced bytes; it holds back bytes a longer token
        could still merge with what comes next."""
        forced = [int(t) for t in self._m.compute_ff_tokens()][:limit]
        for t in forced:
            self.accept(t)
        return forced

    @property
    def can_end(self) -> bool:
        """The output so far is a complete match (end-of-sequence would be allowed)."""
        return self._m.is_accepting()

    @property
    def is_terminated(self) -> bool:
        """An end-of-sequence token was accepted: the output is complete, nothing more comes."""
        return self._ended


class ConstraintCompiler:
    """Compiles constraints for one tokenizer (and model vocabulary size and EOS ids); built once
    per tokenizer (``for_tokenizer``), the LLTokenizer takes about a second to build."""

    _cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer, *, vocab_size: int, eos_ids: Sequence[int]):
        import llguidance
        import llguidance.hf
        self.vocab_size = int(vocab_size)
        self.eos_ids = tuple(int(e) for e in eos_ids if 0 <= int(e) < self.vocab_size)
        if not self.eos_ids:
            raise ValueError(f"no end-of-sequence id inside the vocabulary (got {list(eos_ids)})")
        self._ll = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                  eos_token=list(self.eos_ids))
        self._templates: dict[tuple[str, str], Any] = {}
        self.executor = llguidance.LLExecutor()

    @classmethod
    def for_tokenizer(cls, tokenizer, *, vocab_size: int, eos_ids: Sequence[int]) -> "ConstraintCompiler":
        key = (int(vocab_size), tuple(int(e) for e in eos_ids))
        with cls._lock:
            per_tok = cls._cache.setdefault(tokenizer, {})
            if key not in per_tok:
                per_tok[key] = cls(tokenizer, vocab_size=vocab_size, eos_ids=eos_ids)
            return per_tok[key]

    def start(self, constraint: OutputConstraint) -> ConstraintState:
        """A fresh state at the start of the output."""
        key = constraint.cache_key()
        template = self._templates.get(key)
        if template is None:
            template = self._ll.LLMatcher(self.lltok, constraint.grammar())
            if template.is_error():
                raise ConstraintError(constraint.field, f"invalid {constraint.kind}: {template.get_error()}")
            if len(self._templates) > 256:
                self._templates.clear()
            self._templates[key] = template
        return ConstraintState(template.deep_copy(), constraint, self.eos_ids)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """int32 [batch, ceil(V / 32)], all tokens allowed."""
    return np.full((batch, bitmask_width(vocab_size)), -1, np.int32)


def fill_bitmasks(states: Sequence[ConstraintState | None], bitmask: np.ndarray,
                  compiler: ConstraintCompiler | None = None) -> None:
    """Row i of ``bitmask`` := the mask of ``states[i]``, or all ones where it is None.
    With a compiler, the constrained rows are filled in parallel by llguidance's executor."""
    rows = []
    for i, s in enumerate(states):
        if s is None:
            bitmask[i] = -1
        else:
            rows.append((s.matcher, i))
    if not rows:
        return
    if compiler is not None and len(rows) > 1:
        assert bitmask.flags["C_CONTIGUOUS"] and bitmask.dtype == np.int32
        compiler.executor.unsafe_compute_mask_ptr(rows, bitmask.ctypes.data,
                                                  bitmask.shape[1] * 4, bitmask.shape[0])
    else:
        for m, i in rows:
            m.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, bitmask[i].nbytes)


@functools.lru_cache(maxsize=8)
def _bit_index(vocab_size: int) -> np.ndarray:
    return np.arange(vocab_size)


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [B, V] from the packed int32 rows (host side; the sampler unpacks on device)."""
    v = _bit_index(vocab_size)
    return ((bitmask[:, v // 32] >> (v % 32)) & 1).astype(bool)

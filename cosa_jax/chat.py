"""Chat templating and prompt/response tokenisation, identical at training and evaluation.

Two traps this module exists to avoid (cosalign.md §7): the rendered template already holds
the BOS token, so re-tokenising it with special tokens added gives a double BOS; and the prompt
tokens must be an exact prefix of prompt+response tokens, or the model is trained on a token
boundary it never sees when generating. Llama-3.1 templates also print today's date into the
system turn, so the date is pinned.
"""

from __future__ import annotations

import functools

# Llama-3.1's own template default; any fixed value works as long as training and evaluation agree.
PINNED_DATE = "26 Jul 2024"

_SENTINEL = "COSA_SENTINEL_REPLY"


def messages(system: str | None, user: str) -> list[dict[str, str]]:
    """[system, user] chat messages; the safety config goes in the system turn."""
    out = [] if system is None else [{"role": "system", "content": system}]
    out.append({"role": "user", "content": user})
    return out


def render_prompt(tokenizer, system: str | None, user: str, *, date_string: str = PINNED_DATE) -> str:
    """The template text up to and including the assistant header (generation prompt).

    `date_string` is read by Llama-3.1 templates and ignored by templates that do not use it.
    """
    return tokenizer.apply_chat_template(
        messages(system, user),
        add_generation_prompt=True,
        tokenize=False,
        date_string=date_string,
    )


@functools.lru_cache(maxsize=32)
def _end_of_turn_cached(tokenizer, template: str | None) -> str:
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, date_string=PINNED_DATE)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise ValueError("chat template dropped the assistant content; cannot find its end-of-turn")
    suffix = text[at + len(_SENTINEL):]
    specials = sorted(
        set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens), key=len, reverse=True
    )
    for tok in specials:
        if tok and suffix.startswith(tok):
            return tok
    if suffix.strip():
        return suffix.rstrip()
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise ValueError("chat template puts nothing after an assistant turn and there is no eos token")


def end_of_turn(tokenizer) -> str:
    """The text the template puts right after an assistant message (`<|eot_id|>`, `<|im_end|>`).

    Derived by rendering a one-turn conversation, so a new template needs no code change.
    """
    return _end_of_turn_cached(tokenizer, tokenizer.chat_template)


def response_text(tokenizer, content: str) -> str:
    """What the model must produce after the prompt: the content and the end-of-turn token."""
    return content + end_of_turn(tokenizer)


def tokenize_pair(tokenizer, prompt_text: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, full_ids) for a rendered prompt and a response content.

    Both are tokenised without adding special tokens (the template text already holds them).
    The full sequence is tokenised as ONE string and must start with the prompt ids; we raise
    rather than train on a token split the model would never produce after the prompt.
    """
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    full_ids = list(
        tokenizer(prompt_text + response_text(tokenizer, response), add_special_tokens=False)[
            "input_ids"
        ]
    )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "prompt tokens are not a prefix of prompt+response tokens (a token merges across the "
            f"boundary): prompt ends {prompt_text[-40:]!r}, response starts {response[:40]!r}"
        )
    if len(full_ids) == len(prompt_ids):
        raise ValueError(f"response tokenised to nothing: {response[:40]!r}")
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos and prompt_ids[1] == bos:
        raise ValueError("prompt starts with two BOS tokens; the template text was re-wrapped")
    return prompt_ids, full_ids

"""Chat templating and prompt/response tokenisation, identical at training and evaluation.

Traps this module exists to avoid (cosalign.md §7): the rendered template already holds the BOS
token, so re-tokenising it with special tokens added gives a double BOS; the prompt tokens must be
an exact prefix of prompt+response tokens, or the model is trained on a token boundary it never
sees when generating; Llama-3.1 templates print today's date into the system turn, so the date is
pinned. And the one that matters for safety (issue 26): tokenising the rendered template as one
string turns a control-token spelling inside a message (``<|im_end|>`` then ``<|im_start|>system``
in a user turn) into the real control tokens, so a user could open a system turn of their own and
set the safety config without authorisation. Every message and response is therefore encoded with
transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``: control-token spellings in
content become ordinary text, only the template's own markers are control tokens. A second,
independent check (``_check_structure``) compares the control tokens of every encoding with those
of the same conversation with neutral content, and refuses to return ids that differ.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

# Llama-3.1's own template default; any fixed value works as long as training and evaluation agree.
PINNED_DATE = "26 Jul 2024"

_SENTINEL = "COSA_SENTINEL_REPLY"
# What replaces every message's content in the structure check: plain text in every vocabulary.
_NEUTRAL = "x"


class ControlTokenError(ValueError):
    """Content would encode to a control token that the tokenizer cannot spell as text."""


def messages(system: str | None, user: str) -> list[dict[str, str]]:
    """[system, user] chat messages; the safety config goes in the system turn."""
    out = [] if system is None else [{"role": "system", "content": system}]
    out.append({"role": "user", "content": user})
    return out


def content_text(content: Any) -> str:
    """A message content as one string: a string, or OpenAI text parts joined.

    Parts are joined BEFORE encoding, so a marker split across two parts (``<|im_`` + ``end|>``)
    is sanitised as the whole spelling it forms.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise ValueError(f"content[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got "
                     f"{type(content).__name__}")


def render_prompt(tokenizer, system: str | None, user: str, *, date_string: str = PINNED_DATE) -> str:
    """The template text up to and including the assistant header (generation prompt).

    For display and tests only: never tokenise this string (its control-token spellings would
    all become control tokens); ``encode_prompt`` gives the ids. `date_string` is read by
    Llama-3.1 templates and ignored by templates that do not use it.
    """
    return tokenizer.apply_chat_template(
        messages(system, user),
        add_generation_prompt=True,
        tokenize=False,
        date_string=date_string,
    )


def _template_ids(tokenizer, msgs: list[dict[str, str]], *, add_generation_prompt: bool,
                  continue_final: bool, date_string: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        msgs,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
        date_string=date_string,
    )
    return [int(i) for i in ids]


@functools.lru_cache(maxsize=256)
def _structure_cached(tokenizer, template: str | None, roles: tuple[str, ...],
                      add_generation_prompt: bool, continue_final: bool,
                      date_string: str) -> tuple[frozenset[int], tuple[int, ...]]:
    skeleton = [{"role": r, "content": _NEUTRAL} for r in roles]
    ids = _template_ids(tokenizer, skeleton, add_generation_prompt=add_generation_prompt,
                        continue_final=continue_final, date_string=date_string)
    control = control_ids(tokenizer)
    return control, tuple(i for i in ids if i in control)


def control_ids(tokenizer) -> frozenset[int]:
    """Ids that content must never produce: the special tokens and every other added token.

    Non-special added tokens count too (Phi-style templates write ``<|user|>`` as one, built from
    pieces), except whitespace tokens (Gemma's newline runs), which templates and users write as
    ordinary text.
    """
    added = tokenizer.get_added_vocab()
    control = set(tokenizer.all_special_ids)
    control |= {int(i) for tok, i in added.items() if not tok.isspace()}
    return frozenset(control)


def _check_structure(tokenizer, msgs, ids, **flags) -> None:
    """Raise unless `ids` hold just the control tokens the template writes around neutral content.

    Independent of how transformers sanitises: a control id that came from content (say a
    non-special added token that the template builds from pieces, which transformers does not
    recognise as a control token) is refused instead of reaching the model.
    """
    control, expected = _structure_cached(
        tokenizer, tokenizer.chat_template, tuple(m["role"] for m in msgs),
        flags["add_generation_prompt"], flags["continue_final"], flags["date_string"])
    got = tuple(i for i in ids if i in control)
    if got != expected:
        at = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        if at >= len(got):
            raise ControlTokenError(
                "the chat template writes fewer control tokens for this content than for neutral "
                "content (it branches on the content); refusing ids it cannot check")
        name = tokenizer.convert_ids_to_tokens(got[at])
        raise ControlTokenError(
            f"message content encodes to the control token {name!r}, which this tokenizer does "
            "not let us spell as text; list it in the tokenizer's chat_control_tokens "
            "(tokenizer_config.json) so it is sanitised")


def _check_single_bos(tokenizer, ids: Sequence[int]) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise ValueError("prompt starts with two BOS tokens; the template text was re-wrapped")


def _normalised(msgs: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(msgs):
        try:
            out.append({"role": str(m["role"]), "content": content_text(m["content"])})
        except ValueError as e:
            raise ValueError(f"messages[{i}].{e}") from None
    return out


def encode_messages(tokenizer, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True,
                    date_string: str = PINNED_DATE) -> list[int]:
    """Token ids of a chat: the template's markers as control tokens, all content as text.

    `messages` are {role, content} with content a string or OpenAI text parts. With
    `add_generation_prompt` the ids end with the assistant header, ready to generate.
    """
    msgs = _normalised(messages)
    flags = dict(add_generation_prompt=add_generation_prompt, continue_final=False,
                 date_string=date_string)
    ids = _template_ids(tokenizer, msgs, **flags)
    _check_structure(tokenizer, msgs, ids, **flags)
    _check_single_bos(tokenizer, ids)
    return ids


def encode_prompt(tokenizer, system: str | None, user: str, *,
                  date_string: str = PINNED_DATE) -> list[int]:
    """Ids of the [system, user] prompt up to the assistant header."""
    return encode_messages(tokenizer, messages(system, user), date_string=date_string)


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


def end_of_turn_ids(tokenizer) -> list[int]:
    """The end-of-turn as ids: one control token where the template's marker is an added token."""
    eot = end_of_turn(tokenizer)
    added = tokenizer.get_added_vocab()
    if eot in added:
        return [int(added[eot])]
    return [int(i) for i in tokenizer.encode(eot, add_special_tokens=False)]


def encode_pair(tokenizer, system: str | None, user: str, response: str, *,
                date_string: str = PINNED_DATE,
                prompt_ids: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, full_ids) for a [system, user] prompt and a response content.

    The full sequence is the template's rendering of the assistant turn continued with the
    response (as text: a ``<|im_end|>`` inside it is not an early end of turn), then the
    template's own end-of-turn as a real token. It must start with the prompt ids; we raise rather
    than train on a token split the model would never produce after the prompt. `prompt_ids`
    (from ``encode_prompt`` with the same arguments) skips re-encoding a shared prompt.
    """
    msgs = _normalised(messages(system, user))
    if prompt_ids is None:
        prompt_ids = encode_messages(tokenizer, msgs, date_string=date_string)
    prompt_ids = list(prompt_ids)
    conv = msgs + [{"role": "assistant", "content": response}]
    flags = dict(add_generation_prompt=False, continue_final=True, date_string=date_string)
    body = _template_ids(tokenizer, conv, **flags)
    _check_structure(tokenizer, conv, body, **flags)
    full_ids = body + end_of_turn_ids(tokenizer)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        prompt_text = render_prompt(tokenizer, system, user, date_string=date_string)
        raise ValueError(
            "prompt tokens are not a prefix of prompt+response tokens (a token merges across the "
            f"boundary): prompt ends {prompt_text[-40:]!r}, response starts {response[:40]!r}"
        )
    if len(body) == len(prompt_ids):
        raise ValueError(f"response tokenised to nothing: {response[:40]!r}")
    _check_single_bos(tokenizer, full_ids)
    return prompt_ids, full_ids

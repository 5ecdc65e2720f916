"""Chats answered in-process by a loaded model: the ``fn`` of a ``kind="callable"`` candidate or
judge (evaluation, judge agreement, the demo), without a server in between."""

from __future__ import annotations

from typing import Callable, Sequence

from cosa_jax.inference.sampler import SamplingParams, generate


def chat_fn(model, batch_size: int = 16) -> Callable[..., list[str]]:
    """``fn(chats, max_new_tokens, constraints=None) -> texts``: greedy, batched, through the
    KV-cache sampler; ``constraints`` (one ``OutputConstraint`` or None per chat) is how an
    in-process judge gets the same structured output an endpoint would."""

    def fn(chats: Sequence, max_new_tokens: int, constraints: Sequence | None = None) -> list[str]:
        texts: list[str] = []
        for i in range(0, len(chats), batch_size):
            ids = [model.encode(c) for c in chats[i:i + batch_size]]
            cons = None if constraints is None else list(constraints[i:i + batch_size])
            outs = generate(model.params, model.cfg, ids, SamplingParams(max_new_tokens=max_new_tokens),
                            eos_ids=model.eos_ids, tokenizer=model.tokenizer, constraints=cons)
            texts += [o.text for o in outs]
        return texts

    return fn

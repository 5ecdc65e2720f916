"""Running a judge over many chats: journaled requests, parsed results, re-asks for garbage.

Used by the synthesis stages and by evaluation (helpfulness, risk set, compliance): build chats
with ``judges.*_messages``, pass the matching ``judges.parse_*``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Sequence

from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, UsageStats, run_requests
from cosa_jax.endpoint.journal import Journal
from cosa_jax.synth.judges import JudgeResult


async def judge_batch(
    client: ChatClient,
    journal: Journal,
    chats: Sequence[list[dict[str, str]]],
    parse: Callable[[Any], JudgeResult],
    *,
    retries: int = 1,
    retry_temperature: float = 0.7,
    desc: str = "judge",
    progress: bool = True,
) -> tuple[list[JudgeResult | None], int]:
    """One JudgeResult per chat (None where the request itself failed), and the re-ask count.

    An unparseable reply is re-asked up to ``retries`` times with a new salt and
    ``retry_temperature``; if every attempt is unparseable the first invalid result is kept, so
    it is counted as invalid with its raw text.
    """
    results: list[JudgeResult | None] = [None] * len(chats)
    todo = list(range(len(chats)))
    n_reasked = 0
    for attempt in range(retries + 1):
        params = {} if attempt == 0 else {"temperature": retry_temperature}
        salt = "" if attempt == 0 else f"reparse{attempt}"
        reqs = [ChatRequest(chats[i], params=params, salt=salt) for i in todo]
        label = desc + (f" (re-ask {attempt})" if attempt else "")
        replies = await run_requests(client, journal, reqs, desc=label, progress=progress)
        still = []
        for i, rep in zip(todo, replies):
            if rep is None:
                continue
            res = parse(rep["text"])
            if res.valid or results[i] is None:
                results[i] = res
            if not res.valid:
                still.append(i)
        if attempt:
            n_reasked += len(todo)
        todo = still
        if not todo:
            break
    return results, n_reasked


def run_judge(
    endpoint: EndpointConfig,
    journal_path: str | os.PathLike,
    chats: Sequence[list[dict[str, str]]],
    parse: Callable[[Any], JudgeResult],
    *,
    retries: int = 1,
    retry_temperature: float = 0.7,
    role: str = "judge",
    progress: bool = True,
) -> tuple[list[JudgeResult | None], UsageStats]:
    """Blocking: judge every chat through ``endpoint`` with a journal at ``journal_path``."""

    async def main():
        async with ChatClient(endpoint, role) as client:
            with Journal(journal_path) as j:
                res, _ = await judge_batch(client, j, chats, parse, retries=retries,
                                           retry_temperature=retry_temperature, desc=role, progress=progress)
            return res, client.usage

    return asyncio.run(main())

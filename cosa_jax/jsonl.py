"""JSON-lines reading with errors that name the file and line (shared by every loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def iter_jsonl_objects(path: str | Path, *, error: type[Exception] = ValueError
                       ) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; ``error`` names ``path:line``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj

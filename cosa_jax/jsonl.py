"""JSON-lines reading with errors that name the file and line (shared by every loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

# One record per line; a line longer than this is refused before it is decoded (a data file
# with a multi-megabyte "prompt" is a broken file, and holding it would only fail later).
MAX_LINE_BYTES = 4 * 2**20


def iter_jsonl_objects(path: str | Path, *, error: type[Exception] = ValueError,
                       allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; ``error`` names ``path:line``.

    A file without a single record is an error unless ``allow_empty``."""
    n = 0
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise error(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES // 2**20} MiB; "
                            "expected one JSON record per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); expected UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            n += 1
            yield lineno, obj
    if not n and not allow_empty:
        raise error(f"{path}: empty file; expected JSON lines, one record per line")


def text_field(row: dict, field: str, where: str, *, error: type[Exception] = ValueError) -> str:
    """``row[field]`` as a non-empty string, or an error saying what is wrong with it."""
    if field not in row or row[field] is None:
        raise error(f"{where}: field {field!r} is missing; expected a non-empty string")
    v = row[field]
    if not isinstance(v, str):
        raise error(f"{where}: field {field!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise error(f"{where}: field {field!r} is empty; expected a non-empty string")
    return v

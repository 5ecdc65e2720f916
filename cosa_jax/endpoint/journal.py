"""Durable append-only JSONL journal of completed requests, so a rerun never re-sends one.

One line per completed request: ``{"k": key, "v": value, "h": checksum}``. Each line is written
in one ``write`` and flushed at once (a killed process loses nothing the OS already has), and
fsynced at most every ``fsync_interval_s`` (a power cut loses at most that window). On open, a
last line without its newline (a torn write) is dropped and cut off; a complete line that fails
its checksum is skipped with a warning. An exclusive ``flock`` stops two runs writing one journal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence


def request_key(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """sha256 over a canonical JSON of (model, messages, params); params may hold a sample salt."""
    blob = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _checksum(value_json: str) -> str:
    return format(zlib.crc32(value_json.encode("utf-8")), "08x")


class Journal:
    """Key -> JSON value store backed by an append-only JSONL file (see module docstring)."""

    def __init__(self, path: str | os.PathLike, fsync_interval_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_interval_s = fsync_interval_s
        self._records: dict[str, Any] = {}
        self.torn_bytes_dropped = 0
        self.corrupt_lines = 0
        self._fh = open(self.path, "a+b")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise RuntimeError(
                f"journal {self.path} is locked by another running process; "
                "two runs must not share a journal"
            ) from None
        self._load()
        self._last_fsync = time.monotonic()

    def _load(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        end_ok = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
        if end_ok < len(data):
            self.torn_bytes_dropped = len(data) - end_ok
            warnings.warn(
                f"journal {self.path}: dropping a torn last write of {self.torn_bytes_dropped} bytes "
                "(the process was killed mid-write); that request will be sent again",
                stacklevel=3,
            )
            self._fh.truncate(end_ok)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        for lineno, line in enumerate(data[:end_ok].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                v_json = json.dumps(rec["v"], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                if _checksum(v_json) != rec["h"]:
                    raise ValueError("checksum mismatch")
                self._records[rec["k"]] = rec["v"]
            except (ValueError, KeyError, TypeError) as e:
                self.corrupt_lines += 1
                warnings.warn(f"journal {self.path} line {lineno}: skipping corrupt record ({e})", stacklevel=3)
        self._fh.seek(0, os.SEEK_END)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, default: Any = None) -> Any:
        return self._records.get(key, default)

    def keys(self):
        return self._records.keys()

    def put(self, key: str, value: Any) -> None:
        """Append one record and flush it; a key already present is not written twice."""
        if key in self._records:
            return
        v_json = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        line = json.dumps({"k": key, "h": _checksum(v_json)}, separators=(",", ":"))
        line = line[:-1] + ',"v":' + v_json + "}\n"  # one write per record: no interleaving
        self._fh.write(line.encode("utf-8"))
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._fh.fileno())
            self._last_fsync = now
        self._records[key] = value

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

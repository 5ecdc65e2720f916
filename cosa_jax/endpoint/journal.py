"""Durable journal of requests in SQLite, so a rerun never re-sends a completed request.

One row per request key: its status (``pending`` when planned, ``done`` with the reply, ``failed``
with the error of its last attempt), kept in a WAL-mode SQLite database. Why SQLite: a lookup is
by key on disk, so memory stays bounded whatever the run size (nothing holds all replies); every
completed request is committed at once (a SIGKILL loses only requests still in flight, never a
completed one, and never half a row); a ``done`` row is never overwritten (exactly once across
kills); and other processes can read the database while a run writes it (``launch.progress``).

``synchronous=NORMAL`` in WAL mode survives any process kill; against a power cut a background
thread checkpoints (and so syncs) the WAL every ``fsync_interval_s``, so no fsync ever runs
inside a commit on the caller's (event loop's) thread. An exclusive ``flock`` on a
``.lock`` file next to the database stops two runs writing one journal; readers take no lock.

An older append-only JSONL journal next to the database (``x.jsonl`` for ``x.sqlite``; a path
given as ``x.jsonl`` also means the database ``x.sqlite``), if present, is read once (a torn last line dropped, a line
failing its checksum skipped with a warning), migrated, and renamed ``*.jsonl.migrated``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

STATUSES = ("pending", "done", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    key     TEXT PRIMARY KEY,
    status  TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    reply   TEXT,
    crc     TEXT,
    error   TEXT,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_status ON requests (status);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_BUSY_TIMEOUT_MS = 30_000


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


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def database_path(path: str | os.PathLike) -> Path:
    """The database a journal path names (``x.jsonl`` -> ``x.sqlite``; anything else as given)."""
    p = Path(path)
    return p.with_suffix(".sqlite") if p.suffix == ".jsonl" else p


def legacy_jsonl_line(key: str, value: Any) -> str:
    """One record of the older JSONL journal format (what migration reads)."""
    v_json = _canon(value)
    return json.dumps({"k": key, "h": _checksum(v_json)}, separators=(",", ":"))[:-1] + ',"v":' + v_json + "}\n"


def _connect(db: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000,
                              check_same_thread=False, isolation_level=None)
    else:
        con = sqlite3.connect(str(db), timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                              isolation_level=None)
    con.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    return con


class Journal:
    """Key -> JSON value store with per-key status, backed by SQLite (see module docstring).

    ``k in j`` / ``j.get(k)`` / ``len(j)`` / ``j.keys()`` see completed (``done``) requests only.
    """

    def __init__(self, path: str | os.PathLike, fsync_interval_s: float = 1.0):
        self.path = database_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_interval_s = fsync_interval_s
        self.torn_bytes_dropped = 0
        self.corrupt_lines = 0
        self.migrated_records = 0
        self._mutex = threading.RLock()  # one connection; calls may come from a worker thread
        self._in_batch = 0
        self._lock_fh = open(self.path.with_name(self.path.name + ".lock"), "a+b")
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise RuntimeError(
                f"journal {self.path} is locked by another running process; "
                "two runs must not share a journal"
            ) from None
        try:
            self._con = _connect(self.path, readonly=False)
            mode = self._con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"journal {self.path}: SQLite refused WAL mode (got {mode!r})")
            self._con.execute("PRAGMA synchronous=NORMAL")
            # checkpoints (the only fsyncs) run in a background thread, never inside a commit: a
            # commit on the event loop's thread is then an append to the WAL and nothing more
            self._con.execute("PRAGMA wal_autocheckpoint=0")
            self._con.execute("PRAGMA cache_size=-8192")  # 8 MiB page cache: memory stays flat
            self._con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self._lock_fh.close()
            raise RuntimeError(f"journal {self.path}: not a readable SQLite journal ({e})") from None
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name=f"journal-sync:{self.path.name}", daemon=True)
        self._syncer.start()
        legacy = self.path.with_suffix(".jsonl")
        if legacy.exists():
            self._migrate(legacy)

    # ----- migration from the JSONL journal ---------------------------------------------------

    def _migrate(self, legacy: Path) -> None:
        data = legacy.read_bytes()
        end_ok = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
        if end_ok < len(data):
            self.torn_bytes_dropped = len(data) - end_ok
            warnings.warn(
                f"journal {legacy}: dropping a torn last write of {self.torn_bytes_dropped} bytes "
                "(the process was killed mid-write); that request will be sent again",
                stacklevel=3,
            )
        rows = []
        for lineno, line in enumerate(data[:end_ok].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                v_json = _canon(rec["v"])
                if _checksum(v_json) != rec["h"]:
                    raise ValueError("checksum mismatch")
                rows.append((str(rec["k"]), v_json))
            except (ValueError, KeyError, TypeError) as e:
                self.corrupt_lines += 1
                warnings.warn(f"journal {legacy} line {lineno}: skipping corrupt record ({e})", stacklevel=3)
        with self.batch():
            self._put_json(rows)
        self.migrated_records = len(rows)
        # the rows are committed before the rename: a kill in between migrates again (idempotent)
        os.replace(legacy, legacy.with_name(legacy.name + ".migrated"))

    # ----- reads (completed requests) ---------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        with self._mutex:
            row = self._con.execute("SELECT 1 FROM requests WHERE key=? AND status='done'", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._mutex:
            return self._con.execute("SELECT COUNT(*) FROM requests WHERE status='done'").fetchone()[0]

    def get(self, key: str, default: Any = None) -> Any:
        with self._mutex:
            row = self._con.execute(
                "SELECT reply, crc FROM requests WHERE key=? AND status='done'", (key,)
            ).fetchone()
        if row is None:
            return default
        reply, crc = row
        if _checksum(reply) != crc:
            self.corrupt_lines += 1
            warnings.warn(f"journal {self.path}: reply of {key} fails its checksum; treated as absent",
                          stacklevel=2)
            return default
        return json.loads(reply)

    def keys(self) -> Iterator[str]:
        """Completed keys, streamed from the database in pages (never all in memory at once)."""
        last = ""
        while True:
            with self._mutex:
                page = self._con.execute(
                    "SELECT key FROM requests WHERE status='done' AND key>? ORDER BY key LIMIT 1000", (last,)
                ).fetchall()
            if not page:
                return
            for (k,) in page:
                yield k
            last = page[-1][0]

    def status(self, key: str) -> str | None:
        """'pending', 'done', 'failed', or None for a key never planned nor completed."""
        with self._mutex:
            row = self._con.execute("SELECT status FROM requests WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def counts(self) -> dict[str, int]:
        with self._mutex:
            return _counts(self._con)

    # ----- writes ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self):
        """Group writes in one transaction (one commit for the batch; a kill keeps all or none)."""
        with self._mutex:
            if self._in_batch == 0:
                self._con.execute("BEGIN IMMEDIATE")
            self._in_batch += 1
            try:
                yield self
            except BaseException:
                self._in_batch -= 1
                if self._in_batch == 0:
                    self._con.execute("ROLLBACK")
                raise
            self._in_batch -= 1
            if self._in_batch == 0:
                self._con.execute("COMMIT")

    def _write(self, sql: str, rows: Iterable[tuple]) -> None:
        with self._mutex:
            if self._in_batch:
                self._con.executemany(sql, rows)
                return
            with self.batch():
                self._con.executemany(sql, rows)

    def _put_json(self, rows: Iterable[tuple[str, str]]) -> None:
        now = time.time()
        self._write(
            "INSERT INTO requests (key, status, reply, crc, error, updated) VALUES (?, 'done', ?, ?, NULL, ?) "
            "ON CONFLICT(key) DO UPDATE SET status='done', reply=excluded.reply, crc=excluded.crc, "
            "error=NULL, updated=excluded.updated WHERE requests.status != 'done'",
            ((k, v, _checksum(v), now) for k, v in rows),
        )

    def put(self, key: str, value: Any) -> None:
        """Record a completed request and commit it; a key already done is not written again."""
        self._put_json([(key, _canon(value))])

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Record a batch of completed requests in one commit."""
        self._put_json([(k, _canon(v)) for k, v in items])

    def plan(self, keys: Iterable[str]) -> None:
        """Mark requests about to be sent as pending (what ``launch.progress`` counts as left)."""
        now = time.time()
        self._write(
            "INSERT INTO requests (key, status, updated) VALUES (?, 'pending', ?) ON CONFLICT(key) DO NOTHING",
            ((k, now) for k in keys),
        )

    def fail(self, key: str, error: str) -> None:
        """Record that a request failed after its retries (a rerun sends it again)."""
        self._write(
            "INSERT INTO requests (key, status, error, updated) VALUES (?, 'failed', ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET status='failed', error=excluded.error, "
            "updated=excluded.updated WHERE requests.status != 'done'",
            [(key, str(error)[:2000], time.time())],
        )

    def _sync_loop(self) -> None:
        """Every ``fsync_interval_s``: checkpoint, which syncs the WAL, then the database."""
        con = _connect(self.path, readonly=False)
        try:
            while not self._stop.wait(self.fsync_interval_s):
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError:
                    pass  # busy: the next round checkpoints
        finally:
            con.close()

    def close(self) -> None:
        if self._lock_fh.closed:
            return
        self._stop.set()
        self._syncer.join()
        with self._mutex:
            self._con.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._con.close()
        fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
        self._lock_fh.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----- read-only access while a run writes --------------------------------------------------------


def _counts(con: sqlite3.Connection) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for status, n in con.execute("SELECT status, COUNT(*) FROM requests GROUP BY status"):
        out[status] = n
    return out


@dataclass(frozen=True)
class JournalCounts:
    path: Path
    done: int
    failed: int
    pending: int

    @property
    def total(self) -> int:
        return self.done + self.failed + self.pending


def read_counts(path: str | os.PathLike) -> JournalCounts:
    """Done / failed / pending of a journal, read without its lock (safe while a run writes)."""
    db = database_path(path)
    if not db.exists():
        raise FileNotFoundError(f"no journal database at {db}")
    con = _connect(db, readonly=True)
    try:
        c = _counts(con)
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
            raise RuntimeError(f"journal {db}: cannot be read ({e})") from None
        c = dict.fromkeys(STATUSES, 0)  # the writer has created the file, not yet its table
    except sqlite3.DatabaseError as e:
        raise RuntimeError(f"journal {db}: cannot be read ({e})") from None
    finally:
        con.close()
    return JournalCounts(db, c["done"], c["failed"], c["pending"])

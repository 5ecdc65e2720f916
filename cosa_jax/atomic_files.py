"""Files and directories that appear whole or not at all (temp name, fsync, rename).

A reader of a run's outputs (an evaluation picking up ``hf/``, a resumed run loading cached
reference log-probs) must never see a half-written file that a kill left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; it replaces ``path`` only if the block ends."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(path: Path, *, writer: bool = True) -> Iterator[Path]:
    """Yield ``<path>.partial`` to fill; it then takes the place of ``path``.

    Only ``writer`` (process 0 in a multi-process run) touches the disk. A kill leaves either
    the old ``path`` or the new one (or, between two renames, ``<path>.old`` and no ``path``),
    never a mix of both.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    old = path.with_name(path.name + ".old")
    if writer:
        for stale in (partial, old):
            if stale.exists():
                shutil.rmtree(stale)
        partial.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    if not writer:
        return
    for root, _, files in os.walk(partial):
        for name in files:
            fsync_path(Path(root) / name)
    if path.exists():
        os.rename(path, old)
    os.rename(partial, path)
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so a rename or a new entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

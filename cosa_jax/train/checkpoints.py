"""Training checkpoints (Orbax) that survive a bad write: resume from the newest one that restores.

Orbax finalizes a save by writing ``commit_success.txt`` into ``<step>.orbax-checkpoint-tmp*``
and renaming it to ``<step>``; a process killed before that leaves the tmp directory, which
Orbax never lists. A finalized step can still be damaged on disk afterwards (a truncated or
missing array file, bad JSON, an emptied directory), and restoring it raises a long
TensorStore traceback. ``restore_newest`` tries the steps newest first, says in one line per
step which one it skipped and why, and moves the damaged ones aside so the resumed run can save
those steps again. When finalized steps exist but none restores it raises
``CheckpointRestoreError`` naming the directory and leaves everything untouched: a run never
restarts from scratch over checkpoints it could not read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from cosa_jax.train.data import DataPosition

TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
ITEMS = ("state", "meta")
ASIDE_SUFFIX = ".unusable"  # not a step name to Orbax, so never listed or restored again


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none restores; the message is one line naming the directory."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    position: DataPosition


def make_manager(directory: Path, *, keep: int, async_save: bool,
                 log: Callable[[str], None] = print) -> ocp.CheckpointManager:
    """The run's manager; first reports and removes the saves a kill left unfinished."""
    unfinished = unfinished_saves(directory)
    for tmp in unfinished:
        log(f"[cosa-jax] skipping checkpoint {tmp}: an unfinished save (the process stopped "
            f"before Orbax finalized it); removed")
        if jax.process_index() == 0:
            shutil.rmtree(tmp)
    if unfinished:
        _sync_processes("cosa_jax_checkpoint_unfinished")
    opts = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(directory), options=opts)


def unfinished_saves(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(r"^\d+" + re.escape(TMP_SUFFIX))
    return sorted(p for p in directory.iterdir() if pattern.match(p.name))


def save(manager: ocp.CheckpointManager, step: int, state, position: DataPosition,
         seed: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"data_position": position.to_dict(), "step": step,
                                "seed": seed})), force=True)


def restore_newest(manager: ocp.CheckpointManager, abstract_state,
                   log: Callable[[str], None] = print) -> Restored | None:
    """The newest step that restores whole, or None when the directory holds no finalized step."""
    steps = sorted(manager.all_steps(), reverse=True)
    skipped: list[Skipped] = []
    for step in steps:
        path = Path(manager.directory) / str(step)
        restored, reason = _try_restore(manager, step, path, abstract_state)
        if _any_process_failed(reason):
            skipped.append(Skipped(path, reason or "it failed to restore on another process"))
            continue
        for s in skipped:
            aside = _move_aside(s.path)
            log(f"[cosa-jax] skipping checkpoint {s.path}: {s.reason}; moved to {aside.name}")
        if skipped:
            manager.reload()
        return restored
    if skipped:
        newest = skipped[0]
        raise CheckpointRestoreError(
            f"no usable checkpoint in {manager.directory}: none of steps "
            f"{', '.join(p.path.name for p in skipped)} restores (newest {newest.path}: "
            f"{newest.reason}); repair or remove them to start the run afresh")
    return None


def check_complete(path: Path) -> str | None:
    """Why ``path`` is not a whole Orbax save (None when its commit files are all there)."""
    if not path.is_dir():
        return "not a directory"
    if not any(path.iterdir()):
        return "an empty directory"
    if not (path / COMMIT_FILE).exists():
        return f"no {COMMIT_FILE} (Orbax did not finish it)"
    for item in ITEMS:
        if not (path / item).is_dir():
            return f"its item '{item}' is missing"
        if not (path / item / COMMIT_FILE).exists():
            return f"its item '{item}' has no {COMMIT_FILE}"
    return None


def _try_restore(manager, step: int, path: Path, abstract_state) -> tuple[Restored | None, str | None]:
    reason = check_complete(path)
    if reason:
        return None, reason
    reason = None
    with _quiet_restore_errors() as failed:
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            jax.block_until_ready(out["state"])
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
            reason = _one_line(e)
            failed.append(True)  # the exception and its frames are gone before the hook returns
    if reason:
        return None, reason
    meta = out["meta"]
    try:
        position = DataPosition.from_dict(meta["data_position"])
        meta_step = int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        return None, f"its meta item is malformed ({_one_line(e)})"
    state_step = int(jax.device_get(out["state"]["step"])) if "step" in out["state"] else step
    if meta_step != step or state_step != step:
        return None, (f"it claims step {meta_step} (meta) / {state_step} (state), "
                      f"not its directory's step {step}")
    return Restored(step=step, state=out["state"], position=position), None


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The root cause in one line: Orbax wraps TensorStore's precise error in a page-long one."""
    for _ in range(10):
        if e.__cause__ is None:
            break
        e = e.__cause__
    text = " ".join(str(e).split()) or "(no message)"
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_restore_errors():
    """A failed restore leaves Orbax's other reads of that step running: they end later (even
    at exit) as 'Exception ignored in coroutine' or 'Event loop is closed' tracebacks, and
    Orbax logs the failure too. The one-line reason says it all, so those are dropped."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    failed: list[bool] = []
    try:
        yield failed
    finally:
        if failed:
            _drop_abandoned_read_errors()
            gc.collect()  # the reads abandoned so far report now
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_DROPPING = False


def _is_abandoned_read(exc: BaseException | None, obj: Any) -> bool:
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{Path('orbax') / 'checkpoint'}" in code.co_filename


def _drop_abandoned_read_errors() -> None:
    """From the first failed restore on, drop (only) the tracebacks of its abandoned reads."""
    global _DROPPING
    if _DROPPING:
        return
    _DROPPING = True
    unraisable, in_thread = sys.unraisablehook, threading.excepthook

    def unraisable_hook(u):
        if not _is_abandoned_read(u.exc_value, u.object):
            unraisable(u)

    def thread_hook(a):
        if not _is_abandoned_read(a.exc_value, None):
            in_thread(a)
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def _any_process_failed(reason: str | None) -> bool:
    """Every process must take the same step: one that failed anywhere is skipped everywhere."""
    failed = reason is not None
    if jax.process_count() == 1:
        return failed
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(failed))))


def _move_aside(path: Path) -> Path:
    aside = path.with_name(path.name + ASIDE_SUFFIX)
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}{ASIDE_SUFFIX}-{n}")
        n += 1
    if jax.process_index() == 0:
        shutil.move(str(path), str(aside))
    _sync_processes(f"cosa_jax_checkpoint_aside_{path.name}")
    return aside


def _sync_processes(name: str) -> None:
    """The other processes wait until process 0 has changed the directory."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)

"""Run ``launch.train`` and SIGKILL it at an exact point of a checkpoint save or the export.

    python -m cosa_jax.testing.kill_points POINT [launch.train flags...]

A kill from outside lands wherever the process happens to be; the points where a crash can
leave damage (inside Orbax's asynchronous save and its deletion of old steps, inside the HF
export) last milliseconds, so the tests make the process kill itself there, with a real
SIGKILL: no handler, no flush, no cleanup. POINT is one of

    before_finalize:N  step N is fully written but not yet renamed to its final name
    mid_delete:N       Orbax is deleting old step N: its 'state' files are gone, the rest not
    mid_export         the first safetensors file of the HF export is written, nothing else
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    name, _, arg = point.partition(":")
    from orbax.checkpoint._src.path import atomicity, deleter

    cls = atomicity.AtomicRenameTemporaryPath
    if name == "before_finalize":
        original = cls.finalize

        @functools.wraps(original)
        async def finalize(self):
            if self.get_final().name == arg:
                _die()
            await original(self)
        cls.finalize = finalize
    elif name == "mid_delete":
        std = deleter.StandardCheckpointDeleter
        original = std._delete_step_permanently

        @functools.wraps(original)
        def delete(self, step, delete_target):
            if str(step) == arg:
                for root, _, files in os.walk(Path(delete_target) / "state"):
                    for f in files:
                        os.unlink(os.path.join(root, f))
                _die()
            return original(self, step, delete_target)
        std._delete_step_permanently = delete
    elif name == "mid_export":
        from cosa_jax.models import hf_io
        original = hf_io.save_file

        @functools.wraps(original)
        def save_file(*args, **kwargs):
            original(*args, **kwargs)
            _die()
        hf_io.save_file = save_file
    else:
        raise SystemExit(f"unknown kill point {point!r}; see {__file__}")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    install(sys.argv[1])
    sys.argv = ["launch.train", *sys.argv[2:]]
    runpy.run_module("launch.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""Where training metrics go: a JSONL file, TensorBoard event files, and a PNG of the curves.

metrics.jsonl is append-only, one fsync'd line per (step, kind) record, kind "train" (a step's
losses, with eval keys when an eval fell on it) or "eval" (an eval on its own). Steps only grow
in it, so on resume everything past the restored step (what the killed run did after its last
checkpoint) is one tail: it is cut with a single truncate, together with a torn last line, and
the kept bytes are never rewritten, so a kill at any point loses nothing. A record already in
the file is never written again (the final eval of a run killed during export). TensorBoard
purges later events the same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cosa_jax.atomic_files import atomic_path, fsync_path


def record_kind(record: dict) -> str:
    return "train" if "loss" in record else "eval"


class MetricsLog:
    def __init__(self, out_dir: Path, *, resume_step: int = 0, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._fd = None
        self._logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        had_tb = any((self.out_dir / "tensorboard").glob("events.out.tfevents.*"))
        self._cut_after(resume_step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fsync_path(self.out_dir)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                 purge_step=resume_step + 1 if resume_step or had_tb else None)

    def _cut_after(self, step: int) -> None:
        """Truncate at the first record past ``step`` or the first line a kill tore."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        offset, cut = 0, None
        for line in data.splitlines(keepends=True):
            record = _parse(line) if line.endswith(b"\n") else None
            if record is None and line.strip():
                if offset + len(line) < len(data):
                    # not the last line: no kill leaves this, so keep it and let readers skip it
                    print(f"[cosa-jax] {self.path}: skipping a line that is not a JSON record "
                          f"at byte {offset}", flush=True)
                    offset += len(line)
                    continue
                cut = offset  # a torn last line
                break
            if record is not None:
                if record["step"] > step:
                    cut = offset
                    break
                self._logged.add((record["step"], record_kind(record)))
            offset += len(line)
        if cut is not None:
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        key = (record["step"], record_kind(record))
        if key in self._logged:
            return
        line = (json.dumps(record) + "\n").encode()
        while line:  # one write, unless the kernel takes it in parts
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)
        self._logged.add(key)
        for k, value in metrics.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(k, float(value), step)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a torn last line."""
    records = []
    for line in Path(path).read_bytes().splitlines():
        record = _parse(line)
        if record is not None:
            records.append(record)
    return records


def plot_curves(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Loss (train and eval) and, for DPO, chosen / rejected rewards and the margin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    if not train:
        return None
    has_rewards = any("rewards/chosen" in r for r in train)
    fig, axes = plt.subplots(1, 2 if has_rewards else 1, figsize=(11 if has_rewards else 6, 4))
    axes = axes if has_rewards else [axes]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-",
                     label="eval loss")
    axes[0].set_xlabel("optimiser step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    if has_rewards:
        steps = [r["step"] for r in train]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            axes[1].plot(steps, [r[key] for r in train], label=key)
        axes[1].axhline(0.0, color="grey", lw=0.5)
        axes[1].set_xlabel("optimiser step")
        axes[1].set_ylabel("reward = beta * (log pi - log ref)")
        axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png

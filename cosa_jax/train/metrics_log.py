"""Where training metrics go: a JSONL file, TensorBoard event files, and a PNG of the curves.

On resume the JSONL keeps only the records up to the restored step, and TensorBoard purges
later events, so the logs show every step exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: Path, *, resume_step: int = 0, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                 purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record))
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

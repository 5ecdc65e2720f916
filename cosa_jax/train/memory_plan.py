"""Will the compiled train step fit on a device? Asked of XLA before the first step.

XLA's buffer assignment (``compiled.memory_analysis()``) knows, per device, the bytes of the
arguments (state, reference weights, batch), the outputs, the donated buffers they share
(aliases) and the temporaries (activations, gradients, logits chunks). A run that cannot fit
is refused before it spends minutes loading and then dies in the first step with an allocator
error that names no setting; the refusal lists the settings that shrink each part.
"""

from __future__ import annotations

import dataclasses

import jax

from cosa_jax.train.config import TrainConfigError

GB = 10**9  # decimal, as device memory is quoted (H200: 141 GB, A100: 80 GB)


class MemoryPlanError(TrainConfigError):
    """The compiled step needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one compiled step; ``device_bytes`` None = unknown (CPU)."""
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    device_bytes: int | None
    device_source: str

    def report(self) -> str:
        def gb(n):
            return f"{n / GB:.2f} GB"
        have = (f"{gb(self.device_bytes)} ({self.device_source})" if self.device_bytes
                else "unknown (set train.device_memory_gb to check)")
        return (f"[cosa-jax] memory plan per device: arguments {gb(self.argument_bytes)} "
                f"(state, reference, batch), outputs {gb(self.output_bytes)} "
                f"(of which {gb(self.alias_bytes)} reuse donated buffers), temporaries "
                f"{gb(self.temp_bytes)}, code {gb(self.code_bytes)}; peak {gb(self.peak_bytes)} "
                f"of {have}")


def device_memory_bytes(device: jax.Device, device_memory_gb: float) -> tuple[int | None, str]:
    """The config's figure when set, else the allocator's limit (GPU, TPU), else None (CPU)."""
    if device_memory_gb > 0:
        return int(device_memory_gb * GB), "train.device_memory_gb"
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats()['bytes_limit']"
    return None, "unknown"


def from_compiled(compiled, device: jax.Device, device_memory_gb: float = 0.0) -> MemoryPlan:
    m = compiled.memory_analysis()
    arg, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    # XLA's own peak where the backend reports one; else everything live at once.
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    peak = max(peak, arg + out - alias + temp) + code
    have, source = device_memory_bytes(device, device_memory_gb)
    return MemoryPlan(arg, out, alias, temp, code, peak, have, source)


def lean_settings(c) -> list[str]:
    """Settings that would shrink the step, leaving out those already at their leanest."""
    tips = []
    if c.model.remat != "full":
        tips.append(f"model.remat='full' or 'dots_with_no_batch_dims' (now {c.model.remat!r}): "
                    "recompute activations in the backward")
    tips.append(f"train.grad_accum (now {c.train.grad_accum}): more, smaller micro-batches")
    if c.train.grad_dtype != "bfloat16":
        tips.append("train.grad_dtype='bfloat16': half-size gradients and accumulator")
    if c.train.mode == "dpo" and c.dpo.loss_type not in ("simpo", "orpo") and not c.dpo.precompute_ref:
        tips.append("dpo.precompute_ref=True: reference log-probs from disk, no reference weights "
                    "resident (or dpo.loss_type='simpo'/'orpo', reference-free)")
    if c.train.save_logits:
        tips.append("train.save_logits=False (and a smaller train.logps_chunk): no fp32 logits "
                    "of the whole window held for the backward")
    tips.append(f"mesh.shape (now {tuple(c.mesh.shape)}): more fsdp ways over more devices")
    if c.model.param_dtype != "bfloat16":
        tips.append("model.param_dtype='bfloat16': bf16 master weights and optimiser moments")
    return tips


def check(plan: MemoryPlan, c) -> None:
    """Raise MemoryPlanError when the plan's peak exceeds headroom x device memory."""
    if not plan.device_bytes:
        return
    budget = c.train.memory_headroom * plan.device_bytes
    if plan.peak_bytes <= budget:
        return
    tips = "\n  - ".join(lean_settings(c))
    raise MemoryPlanError(
        f"the compiled train step needs {plan.peak_bytes / GB:.2f} GB per device, more than "
        f"train.memory_headroom={c.train.memory_headroom} x {plan.device_bytes / GB:.2f} GB "
        f"({plan.device_source}). Settings that shrink it:\n  - {tips}")

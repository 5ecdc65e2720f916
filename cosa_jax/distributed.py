"""How a training process finds the others: one code path for Slurm, TPU pods, and a localhost
test with CPU devices.

Every launcher (``launch/slurm_gpu.sbatch``, ``launch/tpu_pod.sh``, the two-process test) runs
``python -m launch.train``, which calls `initialize` with the ``distributed`` config section
before JAX touches a device. Where the coordinator, process count and process id come from, in
order: the config keys (``distributed.coordinator_address / num_processes / process_id``), then
``JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID``, then JAX's own cluster
detection (Slurm's ``SLURM_*`` variables, the TPU VM metadata). On CPU, JAX's cross-process
collectives are gloo over TCP (``jax_cpu_collectives_implementation``, gloo by default since
jax 0.5); on GPU NCCL, on TPU ICI/DCN, with nothing to set here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

MODES = ("auto", "yes", "no")


class DistributedConfigError(ValueError):
    """A distributed setting that cannot work; the message names the config key or variable."""


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """What `jax.distributed.initialize` is given; None = let JAX's cluster detection fill it."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str                       # where the values came from, for the log line

    def initialize_kwargs(self) -> dict:
        kw = {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
              "process_id": self.process_id}
        return {k: v for k, v in kw.items() if v is not None}


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"environment variable {name}={value!r} is not an integer") from None


def detect(dist_cfg, environ: Mapping[str, str] | None = None) -> ProcessLayout | None:
    """The layout to initialise with, or None for a single-process run.

    ``dist_cfg`` is the ``distributed`` config section (mode, coordinator_address,
    num_processes, process_id). ``auto`` starts the distributed system only when something says
    there are several processes: a coordinator in the config or environment, Slurm with more
    than one task, or a TPU pod's worker list; ``yes`` always (a TPU pod slice whose hosts JAX
    detects from the metadata server), ``no`` never.
    """
    environ = os.environ if environ is None else environ
    mode = dist_cfg.initialize
    if mode not in MODES:
        raise DistributedConfigError(f"config key distributed.initialize: {mode!r} is not one of {MODES}")
    if mode == "no":
        return None
    address = dist_cfg.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = dist_cfg.num_processes if dist_cfg.num_processes > 0 else _int_env(environ, "JAX_NUM_PROCESSES")
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _int_env(environ, "JAX_PROCESS_ID")
    if address:
        source = "config" if dist_cfg.coordinator_address else "JAX_COORDINATOR_ADDRESS"
        if n is None or pid is None:
            # A bare coordinator on a cluster JAX can detect (Slurm) fills in the rest there.
            if not (int(environ.get("SLURM_NTASKS", "1")) > 1):
                missing = "distributed.num_processes" if n is None else "distributed.process_id"
                raise DistributedConfigError(
                    f"config key {missing}: a coordinator ({address}) is set but not the process "
                    f"count and id (set distributed.num_processes and distributed.process_id, "
                    f"or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        if n is not None and pid is not None and not 0 <= pid < n:
            raise DistributedConfigError(
                f"config key distributed.process_id: {pid} is not in [0, {n}) "
                f"(distributed.num_processes={n})")
        return ProcessLayout(address, n, pid, source)
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return ProcessLayout(None, n, pid, f"slurm ({environ['SLURM_NTASKS']} tasks)")
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or mode == "yes":
        return ProcessLayout(None, n, pid, "tpu/cluster auto-detect" if mode == "auto"
                             else "distributed.initialize=yes (JAX cluster auto-detect)")
    return None


def initialize(dist_cfg, environ: Mapping[str, str] | None = None) -> ProcessLayout | None:
    """Start JAX's distributed system when `detect` says so (idempotent); returns the layout."""
    layout = detect(dist_cfg, environ)
    if layout is None or jax.distributed.is_initialized():
        return layout
    jax.distributed.initialize(**layout.initialize_kwargs(),
                               initialization_timeout=int(dist_cfg.timeout_s))
    print(f"[cosa-jax] process {jax.process_index()} of {jax.process_count()} "
          f"({layout.source}); {jax.local_device_count()} local of {jax.device_count()} devices",
          flush=True)
    return layout

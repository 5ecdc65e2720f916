"""python -m launch.train --config configs/X.py [--config.train.lr=1e-6 ...]

SFT or DPO per ``train.mode``; resumes from the newest checkpoint in ``checkpoint.dir`` by itself.
Several processes (Slurm tasks, TPU hosts, or ``--config.distributed.coordinator_address=host:port
--config.distributed.num_processes=N --config.distributed.process_id=I`` by hand) each run this
same command; see cosa_jax.distributed. Before the first step it prints the compiled step's
memory per device and stops if it cannot fit (cosa_jax.train.memory_plan).
"""

import json
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")



def main(argv):
    del argv
    from cosa_jax.train.trainer import train
    from launch.logs import quiet_library_logs
    quiet_library_logs()
    if _CONFIG.value is None:
        sys.exit("usage: python -m launch.train --config configs/demo.py [--config.KEY=VALUE ...]")
    from cosa_jax.train.checkpoints import CheckpointRestoreError
    from cosa_jax.train.memory_plan import MemoryPlanError
    try:
        summary = train(_CONFIG.value)
    except (CheckpointRestoreError, MemoryPlanError) as e:
        sys.exit(f"[cosa-jax] error: {e}")
    import jax
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)

"""python -m launch.train --config configs/X.py [--config.train.lr=1e-6 ...]

SFT or DPO per ``train.mode``; resumes from the newest checkpoint in ``checkpoint.dir`` by itself.
Several processes (Slurm tasks, TPU hosts, or ``--config.distributed.coordinator_address=host:port
--config.distributed.num_processes=N --config.distributed.process_id=I`` by hand) each run this
same command; see cosa_jax.distributed. Before the first step it prints the compiled step's
memory per device and stops if it cannot fit (cosa_jax.train.memory_plan).
"""

import json

from absl import flags
from ml_collections import config_flags

from launch import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")


def _run(config):
    from cosa_jax.train import config as tc
    from launch.logs import quiet_library_logs
    quiet_library_logs()
    if flags.FLAGS.dry_run:
        from cosa_jax.train.data import load_preference_rows
        from pathlib import Path
        tc.validate(config)
        n = {}
        for name, src, split in (("train", config.data.train, config.data.train_split),
                                 ("eval", config.data.eval, config.data.eval_split)):
            if src and (src.startswith("bundled:") or Path(src).exists()):
                n[name] = len(load_preference_rows(src, split=split))
            elif src:
                n[name] = f"{src} not fetched"
        print(f"[train] dry run: config valid, data {n}; nothing trained")
        return
    from cosa_jax.train.trainer import train
    summary = train(config)
    import jax
    if jax.process_index() == 0:  # every process runs this command; one prints the summary
        print(json.dumps(summary, indent=2))


def main(argv=None):
    from cosa_jax.train.config import KEY_DOCS, default_config, validate
    runner.run(_run, prog="cosa-jax train", doc=__doc__, default_config=default_config,
               validate=validate, docs=KEY_DOCS, argv=argv)


if __name__ == "__main__":
    main()

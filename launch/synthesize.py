"""CLI for CoSAlign data synthesis: ``python -m launch.synthesize --config configs/synth_demo.py``.

Runs every stage in order (skipping stages whose output exists, so a rerun resumes), or one stage
with ``--stage NAME``. Config fields can be overridden: ``--config.out_dir=/tmp/x``,
``--config.endpoints.judge.base_url=http://127.0.0.1:8000/v1``.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from cosa_jax.synth import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Synthesis config file (configs/synth_*.py).")
_STAGE = flags.DEFINE_enum("stage", None, list(stages.STAGES), "Run only this stage (reruns it; its journal still applies).")
_FORCE = flags.DEFINE_bool("force", False, "Redo stages whose output already exists (journaled requests are not re-sent).")


def main(argv):
    del argv
    cfg = _CONFIG.value
    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/synth_demo.py")
    if _STAGE.value:
        stages.run_stage(cfg, _STAGE.value, force=True)
    else:
        stages.run_all(cfg, force=_FORCE.value)
    print(f"[synth] outputs under {cfg.out_dir}")


if __name__ == "__main__":
    app.run(main)

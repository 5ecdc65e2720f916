"""CLI for CoSAlign data synthesis: ``python -m launch.synthesize --config configs/synth_demo.py``.

Runs every stage in order (skipping stages whose output exists, so a rerun resumes), or one stage
with ``--stage NAME``. Config fields can be overridden: ``--config.out_dir=/tmp/x``,
``--config.endpoints.judge.base_url=http://127.0.0.1:8000/v1``.
"""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from cosa_jax.synth import stages
from launch import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Synthesis config file (configs/synth_*.py).")
_STAGE = flags.DEFINE_enum("stage", None, list(stages.STAGES), "Run only this stage (reruns it; its journal still applies).")
_FORCE = flags.DEFINE_bool("force", False, "Redo stages whose output already exists (journaled requests are not re-sent).")


def _run(cfg):
    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    if flags.FLAGS.dry_run:
        from cosa_jax.synth import inputs
        n = sum(len(inputs.load_source(s)) for s in cfg.sources if dict(s).get("kind") != "hub")
        print(f"[synth] dry run: config valid, {n} prompts readable from the local sources "
              "(hub sources are not fetched); nothing sent")
        return
    if _STAGE.value:
        stages.run_stage(cfg, _STAGE.value, force=True)
    else:
        stages.run_all(cfg, force=_FORCE.value)
    print(f"[synth] outputs under {cfg.out_dir}")


def main(argv=None):
    from cosa_jax.synth.config import default_config, validate
    runner.run(_run, prog="cosa-jax synthesize", doc=__doc__, default_config=default_config,
               validate=validate, module_flags=("stage", "force"), argv=argv,
               fallback_docs=_endpoint_docs())


def _endpoint_docs():
    from cosa_jax.endpoint.config import FIELD_DOCS
    return FIELD_DOCS


if __name__ == "__main__":
    main()

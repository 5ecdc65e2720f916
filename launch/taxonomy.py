"""CLI for deriving a risk taxonomy from prompts: ``python -m launch.taxonomy --config configs/taxonomy_derive.py``.

Embeds the configured prompt sources, clusters them, asks the judge endpoint to name each cluster,
and writes ``taxonomy.yaml`` (usable as the ``taxonomy`` key of synthesis and evaluation configs),
``clusters.json`` / ``clusters.md`` and ``clusters.png`` under ``out_dir``. A rerun resumes from
the journals. Override fields with e.g. ``--config.cluster.method=hdbscan``.
"""

import logging

from absl import flags
from ml_collections import config_flags

from launch import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Derivation config file (configs/taxonomy_derive.py).")


def _run(cfg) -> None:
    from cosa_jax import taxonomy_derive
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if flags.FLAGS.dry_run:
        print("[taxonomy] dry run: config valid; nothing embedded or sent")
        return
    report = taxonomy_derive.derive(cfg)
    for c in report["clusters"]:
        print(f"[taxonomy] cluster {c['cluster']}: {c['size']} prompts -> {c['name']}")
    print(f"[taxonomy] {report['n_categories']} categories written to {report['taxonomy']}")


def main(argv=None):
    from cosa_jax.taxonomy_derive import default_config, validate
    runner.run(_run, prog="cosa-jax taxonomy", doc=__doc__, default_config=default_config,
               validate=validate, argv=argv)


if __name__ == "__main__":
    main()

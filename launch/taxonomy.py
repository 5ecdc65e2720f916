"""CLI for deriving a risk taxonomy from prompts: ``python -m launch.taxonomy --config configs/taxonomy_derive.py``.

Embeds the configured prompt sources, clusters them, asks the judge endpoint to name each cluster,
and writes ``taxonomy.yaml`` (usable as the ``taxonomy`` key of synthesis and evaluation configs),
``clusters.json`` / ``clusters.md`` and ``clusters.png`` under ``out_dir``. A rerun resumes from
the journals. Override fields with e.g. ``--config.cluster.method=hdbscan``.
"""

from __future__ import annotations

import logging

from absl import app
from ml_collections import config_flags

from cosa_jax import taxonomy_derive

_CONFIG = config_flags.DEFINE_config_file("config", None, "Derivation config file (configs/taxonomy_derive.py).")


def main(argv):
    del argv
    cfg = _CONFIG.value
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/taxonomy_derive.py")
    report = taxonomy_derive.derive(cfg)
    for c in report["clusters"]:
        print(f"[taxonomy] cluster {c['cluster']}: {c['size']} prompts -> {c['name']}")
    print(f"[taxonomy] {report['n_categories']} categories written to {report['taxonomy']}")


if __name__ == "__main__":
    app.run(main)

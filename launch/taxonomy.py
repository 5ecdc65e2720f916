"""``python -m launch.taxonomy``: the CoSA risk categories, their ids, definitions and split.

    python -m launch.taxonomy --config.format=json
"""

from __future__ import annotations

import json

import ml_collections
from absl import flags
from ml_collections import config_flags

from cosa_jax.config_tools import ConfigError
from launch import runner

FORMATS = ("text", "json")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.format = "text"  # text | json
    c.definitions = True  # include each category's definition
    return c


def validate(c) -> None:
    if c.format not in FORMATS:
        raise ConfigError(f"config key format: {c.format!r} is not one of {FORMATS}")


def _run(c) -> None:
    from cosa_jax.taxonomy import HELD_OUT_CATEGORIES, SEEN_CATEGORIES, Category
    if flags.FLAGS.dry_run:
        print("[taxonomy] dry run: config valid")
        return
    rows = [dict(id=cat.id, name=cat.value,
                 split="seen" if cat in SEEN_CATEGORIES else "held-out" if cat in HELD_OUT_CATEGORIES else "-",
                 **({"definition": cat.definition} if c.definitions else {})) for cat in Category]
    if c.format == "json":
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['id']}. {r['name']} [{r['split']}]" + (f"\n   {r['definition']}" if c.definitions else ""))


def main(argv=None) -> None:
    runner.run(_run, prog="cosa-jax taxonomy", doc=__doc__, default_config=default_config,
               validate=validate, argv=argv,
               define_config=lambda: config_flags.DEFINE_config_dict("config", default_config(), "what to print"))


if __name__ == "__main__":
    main()

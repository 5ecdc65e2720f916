"""Small data files shipped with the package (written by us, mild content).

``bundled:NAME`` anywhere a data path is accepted resolves to a file in this folder, so configs
work from any working directory and from an installed wheel.
"""

from pathlib import Path

BUNDLED_PREFIX = "bundled:"
DATA_DIR = Path(__file__).resolve().parent


def resolve_bundled(source):
    """``bundled:NAME`` -> the shipped file's path; anything else unchanged."""
    text = str(source)
    if not text.startswith(BUNDLED_PREFIX):
        return source
    path = DATA_DIR / text[len(BUNDLED_PREFIX):]
    if not path.exists():
        available = sorted(p.name for p in DATA_DIR.iterdir() if p.suffix in (".jsonl", ".json"))
        raise FileNotFoundError(f"{text}: no such bundled file; available: {available}")
    return path


def is_hub_repo_dir(path) -> bool:
    """A local copy of a hub dataset repository (``hf download --repo-type dataset``): a README.md
    whose YAML names the configs, and not a ``save_to_disk`` folder. ``datasets.load_dataset``
    reads it exactly as it reads the hub id, config and split names included."""
    p = Path(str(path)).expanduser()
    return (p.is_dir() and (p / "README.md").is_file()
            and not any((p / f).exists() for f in ("dataset_dict.json", "state.json")))

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

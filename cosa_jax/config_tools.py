"""What every pipeline's config shares: key checks that suggest the key meant, and key docs.

Each pipeline keeps ``default_config()`` + ``validate()`` beside its code (train/config.py,
synth/config.py, eval/config.py, inference/serve_config.py). A key's one-line doc is the
``# comment`` on the line that sets it in ``default_config()``, so docs cannot drift from keys;
``describe()`` turns both into the ``--help`` table.
"""

from __future__ import annotations

import difflib
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any, Callable, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config key that is unknown, missing or holds a value that cannot work; names the key."""


def flat_keys(c: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of a (nested) ConfigDict or mapping."""
    out: dict[str, Any] = {}
    items = c.items() if isinstance(c, (ml_collections.ConfigDict, Mapping)) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, Mapping)) and len(v):
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def suggestion(key: str, known: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean X?"`` for the closest known key, or a pointer to ``--help``."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a mistyped last part: compare within the same section
        head, _, tail = key.rpartition(".")
        same = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == head]
        hit = difflib.get_close_matches(tail, same, n=1, cutoff=0.5)
        close = [f"{head}.{hit[0]}" if head else hit[0]] if hit else []
    return f"; did you mean {prefix}{close[0]}?" if close else "; see --help for the known keys"


def check_keys(c: Any, defaults: Any, where: str = "config",
               open_sections: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for the first key of ``c`` that ``defaults`` lacks (or vice versa).

    Keys under ``open_sections`` (e.g. sampling ``params``) are free-form and not compared."""
    have, want = flat_keys(c), flat_keys(defaults)

    def is_open(k: str) -> bool:
        return any(k == s or k.startswith(s + ".") for s in open_sections)

    for k in have:
        if k not in want and not is_open(k):
            # a section set to {} in the defaults may hold anything the defaults leave open
            head, _, tail = k.rpartition(".")
            section = f" in '{head}'" if head else ""
            raise ConfigError(f"unknown key(s) [{tail!r}]{section} ({where}.{k})"
                              f"{suggestion(k, want, where + '.')}")
    for k in want:
        if k not in have and not is_open(k) and not any(h.startswith(k + ".") for h in have):
            raise ConfigError(f"{where}.{k} is missing: start the config from default_config()")


def key_docs(fn: Callable[[], Any]) -> dict[str, str]:
    """``{"train.lr": "one-line doc"}`` from the ``# comments`` in ``fn``'s source.

    A comment on the line ``c.a.b = ...`` documents ``a.b``; a comment-only line right below it
    continues that doc."""
    src = textwrap.dedent(inspect.getsource(fn))
    docs: dict[str, str] = {}
    assign = re.compile(r"^\s*(?:c|cfg)\.([A-Za-z_][\w.]*)\s*=(?!=)")
    last_key, last_line = None, -1
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row = tok.start[0]
        text = tok.string.lstrip("#").strip()
        m = assign.match(lines[row - 1])
        if m:
            last_key, last_line = m.group(1), row
            docs[last_key] = text
        elif last_key and row == last_line + 1 and not lines[row - 1].split("#")[0].strip():
            docs[last_key] = f"{docs[last_key]} {text}".strip()
            last_line = row
    return docs


def describe(c: Any, docs: Mapping[str, str], prefix: str = "--config.") -> str:
    """The ``--help`` table: every key, its current value and its doc."""
    rows = [(f"{prefix}{k}", repr(v), docs.get(k, "")) for k, v in flat_keys(c).items()]
    width = min(44, max((len(r[0]) for r in rows), default=0))
    out = []
    for key, val, doc in rows:
        val = val if len(val) <= 60 else val[:57] + "..."
        out.append(f"  {key:<{width}} = {val:<14}" + (f"  # {doc}" if doc else ""))
    return "\n".join(out)


def one_of(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"config key {key}: {value!r} is not one of {choices}")


def positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"config key {key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_taxonomy_and_judge(c: Any) -> None:
    """The keys synthesis and evaluation configs share: ``taxonomy``, ``train_categories`` (names
    in that taxonomy; [] = its seen ones) and ``judge.structured_outputs`` / ``judge.rating`` / ``judge.calibration``."""
    from cosa_jax import judges
    from cosa_jax.taxonomy import taxonomy_from_config
    try:
        tax = taxonomy_from_config(c)
    except ValueError as e:
        raise ConfigError(f"config key taxonomy: {e}") from None
    try:
        tax.parse_categories(c.train_categories)
    except ValueError as e:
        raise ConfigError(f"config key train_categories: {e}") from None
    try:
        judges.check_judge_options(c.judge.structured_outputs, c.judge.rating, where="config.judge",
                                    calibration=str(c.judge.get("calibration", "off")))
    except ValueError as e:
        raise ConfigError(str(e)) from None

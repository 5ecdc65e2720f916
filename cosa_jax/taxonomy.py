"""Risk taxonomies: categories, definitions and the seen/held-out split, loaded from a file.

A taxonomy is data (YAML or JSON, see ``cosa_jax/data/taxonomies/cosa.yaml``), so a deployment
with other risks (a clinic, a classroom) needs a file, not a code change. The paper's 7 + "Other
Harms" is the shipped default; the old module-level names (``Category.VIOLENCE``,
``SEEN_CATEGORIES``...) resolve from it.

Every spelling used by the reference data (``-A-B-`` strings, dotted hub split names, plain
names) goes through the converters here, so a typo is an error naming the bad token instead of a
silently empty set. Names that would be split by those formats are refused when a file loads.
A ``Category`` is a ``str`` (its canonical name) that also knows its id, definition and taxonomy,
so functions given categories need no taxonomy argument; functions given plain strings take one
(the default taxonomy when omitted). Host-side only: no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

DEFAULT_TAXONOMY = "cosa"
_SHIPPED_DIR = Path(__file__).parent / "data" / "taxonomies"


class TaxonomyError(ValueError):
    """A bad taxonomy file: the message names the file and the key."""


class _CategoryMeta(type):
    """``for c in Category`` / ``len(Category)`` keep working: they walk the default taxonomy."""

    def __iter__(cls) -> Iterator["Category"]:
        return iter(default_taxonomy().categories)

    def __len__(cls) -> int:
        return len(default_taxonomy().categories)


class Category(str, metaclass=_CategoryMeta):
    """One risk category: the string is its canonical name; it carries its id and definition.

    Built only by ``Taxonomy``; the default taxonomy's members are also class attributes
    (``Category.VIOLENCE``) from each category's ``key`` in the file.
    """

    id: int
    definition: str
    allowable: bool
    key: str
    short: str
    taxonomy: "Taxonomy"

    def __new__(cls, name: str, *, id: int, definition: str, allowable: bool, key: str, short: str) -> "Category":
        self = super().__new__(cls, name)
        self.id, self.definition, self.allowable, self.key, self.short = id, definition, allowable, key, short
        return self

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:  # f-strings and joins print the canonical name
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Category({str.__str__(self)!r})"

    __hash__ = str.__hash__
    __eq__ = str.__eq__

    def __reduce__(self):
        src = getattr(self.taxonomy, "source", "")
        if src and Path(src).is_file():  # pickles resolve back to the loaded object
            return (_restore, (src, self.value))
        return (str, (self.value,))


def _restore(source: str, name: str) -> Category:
    return load_taxonomy(source).parse_category(name)


def _squash(name: str) -> str:
    """Spelling-insensitive key: lower case, every run of space / _ / - / , becomes one _."""
    return re.sub(r"[\s_,\-]+", "_", name.strip().lower()).strip("_")


_EMPTY_NAMES = {"", "none", "-", "--", "{}", "[]"}


def underscore_name(cat: Category | str) -> str:
    """Reference spelling: space, '-' and ',' each replaced by '_' (so ', ' gives '__')."""
    return re.sub(r"[\s,\-]", "_", str.__str__(cat))


def sort_categories(cats: Iterable[Category]) -> tuple[Category, ...]:
    """Deduplicate and sort by id: the one deterministic order (sets of strings hash randomly)."""
    return tuple(sorted(set(cats), key=lambda c: c.id))


@dataclasses.dataclass(frozen=True, eq=False)
class Taxonomy:
    """A loaded taxonomy. ``other`` is the catch-all that can never be allowed (spec §4.5)."""

    name: str
    categories: tuple[Category, ...]
    seen: tuple[Category, ...]
    held_out: tuple[Category, ...]
    other: Category
    test_configs: Mapping[str, tuple[Category, ...]]
    description: str = ""
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "_by_key", {_squash(c.value): c for c in self.categories})

    def __repr__(self) -> str:
        return f"Taxonomy({self.name!r}, {len(self.categories)} categories, source={self.source!r})"

    @property
    def configurable(self) -> tuple[Category, ...]:
        """The categories a safety config may allow, in id order."""
        return tuple(c for c in self.categories if c.allowable)

    def by_key(self, key: str) -> Category:
        for c in self.categories:
            if c.key == key:
                return c
        raise KeyError(f"taxonomy {self.name!r} has no category with key {key!r}")

    # ----- parsing strings ---------------------------------------------------------------

    def parse_category(self, name: str | Category) -> Category:
        """One category from its plain, underscored or lower-cased name; ValueError names the token."""
        if isinstance(name, Category) and name.taxonomy is self:
            return name
        if not isinstance(name, str):
            raise TypeError(f"category name must be a string, got {type(name).__name__}: {name!r}")
        cat = self._by_key.get(_squash(name))  # type: ignore[attr-defined]
        if cat is None:
            known = ", ".join(repr(c.value) for c in self.categories)
            raise ValueError(f"unknown risk category {name!r} in taxonomy {self.name!r}; known categories: {known}")
        return cat

    def parse_categories(self, names: Iterable[str | Category]) -> tuple[Category, ...]:
        """A list of plain names (e.g. a dataset column) -> sorted unique categories."""
        if isinstance(names, str):
            raise TypeError(f"expected a list of category names, got the string {names!r}")
        return sort_categories(self.parse_category(n) for n in names)

    def from_dash_string(self, text: str) -> tuple[Category, ...]:
        """``-Violence-Privacy_Violations-`` -> categories. Accepts missing outer dashes."""
        if not isinstance(text, str):
            raise TypeError(f"expected a -A-B- string, got {type(text).__name__}: {text!r}")
        if text.strip().lower() in _EMPTY_NAMES:
            return ()
        tokens = [t for t in text.strip().split("-") if t.strip()]
        cats, i = [], 0
        while i < len(tokens):
            # A name may hold a hyphen ("Illegal Drug-Related ..."), so the dash separator is
            # ambiguous: take the longest run of pieces that names a category (loading refused
            # names whose pieces name other categories, so this is unique).
            for j in range(len(tokens), i, -1):
                cat = self._by_key.get(_squash("-".join(tokens[i:j])))  # type: ignore[attr-defined]
                if cat is not None:
                    cats.append(cat)
                    i = j
                    break
            else:
                try:
                    self.parse_category(tokens[i])
                except ValueError as e:
                    raise ValueError(f"bad -A-B- category string {text!r}: {e}") from None
        return sort_categories(cats)

    def from_dotted_name(self, text: str) -> tuple[Category, ...]:
        """Hub split name -> categories; ``none`` (or empty) is the empty set."""
        if not isinstance(text, str):
            raise TypeError(f"expected a dotted split name, got {type(text).__name__}: {text!r}")
        if text.strip().lower() in _EMPTY_NAMES:
            return ()
        try:
            return sort_categories(self.parse_category(t) for t in text.strip().split(".") if t.strip())
        except ValueError as e:
            raise ValueError(f"bad dotted category name {text!r}: {e}") from None

    def map_outside_to_other(self, cats: Iterable[Category | str], train_categories: Iterable[Category | str] | None = None) -> tuple[Category, ...]:
        """Map every category outside the training list to the catch-all, as a set (spec §4.5)."""
        train = set(self.seen if train_categories is None else self.parse_categories(train_categories))
        return sort_categories(c if c in train else self.other for c in self.parse_categories(cats))


# ----- loading and validation ------------------------------------------------------------

# Characters a name may not hold: '.' splits dotted split names, ':' ends the name in rendered
# "Name: definition" lines, '+' joins config ids, '"' and newlines break prompts and JSON keys.
_FORBIDDEN = {".": "'.' separates names in dotted split names", ":": "':' ends the name in 'Name: definition' lines",
              "+": "'+' joins names in config ids", '"': "'\"' would need escaping in judge prompts",
              "\n": "a newline breaks one-line prompt blocks"}
_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _fail(where: str, key: str, why: str) -> TaxonomyError:
    return TaxonomyError(f"{where}: key {key!r}: {why}")


def _check_name(name: Any, where: str, key: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, key, f"a category name must be a non-empty string, got {name!r}")
    if name != name.strip() or "  " in name:
        raise _fail(where, key, f"name {name!r} has leading, trailing or doubled spaces")
    for ch, why in _FORBIDDEN.items():
        if ch in name:
            raise _fail(where, key, f"name {name!r} holds {ch!r}: {why}")
    for word in re.split(r"[\s,]+", name):
        if word.startswith("-") or word.endswith("-"):
            raise _fail(where, key, f"name {name!r} has a '-' at a word edge, which -A-B- strings would split")
    if _squash(name) in _EMPTY_NAMES or name.lower() in _EMPTY_NAMES:
        raise _fail(where, key, f"name {name!r} reads as the empty set")
    return name


def _str_field(entry: Mapping[str, Any], field: str, where: str, key: str, default: str | None = None) -> str:
    v = entry.get(field, default)
    k = f"{key}.{field}" if key else field
    if not isinstance(v, str) or not v.strip():
        raise _fail(where, k, f"must be a non-empty string, got {v!r}")
    if "\n" in v.strip():
        raise _fail(where, k, "must be one line")
    return v.strip()


def taxonomy_from_dict(data: Any, where: str = "<dict>") -> Taxonomy:
    """Validate a parsed taxonomy document; every error names ``where`` and the key."""
    if not isinstance(data, Mapping):
        raise TaxonomyError(f"{where}: a taxonomy must be a mapping with 'name' and 'categories', got {type(data).__name__}")
    allowed_top = {"name", "description", "categories", "seen", "held_out", "other", "test_configs"}
    for k in data:
        if k not in allowed_top:
            raise _fail(where, str(k), f"unknown key; expected one of {sorted(allowed_top)}")
    name = _str_field(data, "name", where, "").strip()
    raw_cats = data.get("categories")
    if not isinstance(raw_cats, list) or len(raw_cats) < 2:
        raise _fail(where, "categories", "must be a list of at least two categories (one of them the catch-all 'other')")
    cats: list[Category] = []
    squashed: dict[str, str] = {}
    keys: set[str] = set()
    for i, entry in enumerate(raw_cats):
        k = f"categories[{i}]"
        if not isinstance(entry, Mapping):
            raise _fail(where, k, f"must be a mapping with name and definition, got {entry!r}")
        for f in entry:
            if f not in ("name", "definition", "key", "short", "allowable"):
                raise _fail(where, f"{k}.{f}", "unknown field; expected name, definition, key, short, allowable")
        cname = _check_name(entry.get("name"), where, f"{k}.name")
        sq = _squash(cname)
        if sq in squashed:
            raise _fail(where, f"{k}.name", f"name {cname!r} is the same category as {squashed[sq]!r} once spelled with underscores")
        squashed[sq] = cname
        definition = _str_field(entry, "definition", where, k)
        ckey = entry.get("key", re.sub(r"\W+", "_", cname.upper()).strip("_"))
        if not isinstance(ckey, str) or not _KEY_RE.match(ckey) or ckey in keys:
            raise _fail(where, f"{k}.key", f"must be a unique UPPER_CASE identifier, got {ckey!r}")
        keys.add(ckey)
        short = _str_field(entry, "short", where, k, default=cname)
        if "+" in short:
            raise _fail(where, f"{k}.short", f"short name {short!r} holds '+', which joins config ids")
        allowable = entry.get("allowable", True)
        if not isinstance(allowable, bool):
            raise _fail(where, f"{k}.allowable", f"must be true or false, got {allowable!r}")
        cats.append(Category(cname, id=i + 1, definition=definition, allowable=allowable, key=ckey, short=short))
    # -A-B- strings are split at '-' and re-joined by longest match: a hyphenated name whose
    # pieces name another category would be read ambiguously.
    for c in cats:
        pieces = [p for p in c.value.split("-")]
        for a in range(len(pieces)):
            for b in range(a + 1, len(pieces) + 1):
                if (a, b) != (0, len(pieces)) and _squash("-".join(pieces[a:b])) in squashed:
                    other = squashed[_squash("-".join(pieces[a:b]))]
                    raise _fail(where, f"categories[{c.id - 1}].name",
                                f"name {c.value!r} contains the category {other!r} between hyphens; -A-B- strings would split it")
    by_sq = {_squash(c.value): c for c in cats}

    def lookup(n: Any, key: str) -> Category:
        if not isinstance(n, str) or _squash(n) not in by_sq:
            raise _fail(where, key, f"{n!r} is not a category of this taxonomy; known: {[c.value for c in cats]}")
        return by_sq[_squash(n)]

    def cat_list(v: Any, key: str, *, allowable: bool = True) -> tuple[Category, ...]:
        if not isinstance(v, list):
            raise _fail(where, key, f"must be a list of category names, got {v!r}")
        out = [lookup(n, f"{key}[{i}]") for i, n in enumerate(v)]
        for i, c in enumerate(out):
            if allowable and not c.allowable:
                raise _fail(where, f"{key}[{i}]", f"{c.value!r} is not allowable (allowable: false)")
        if len(set(out)) != len(out):
            raise _fail(where, key, "lists a category twice")
        return tuple(out)

    other = lookup(data.get("other"), "other")
    if other.allowable:
        raise _fail(where, "other", f"the catch-all {other.value!r} must be marked 'allowable: false'")
    if not any(c.allowable for c in cats):
        raise _fail(where, "categories", "no category is allowable")
    seen = cat_list(data.get("seen"), "seen")
    if not seen:
        raise _fail(where, "seen", "at least one category must be seen in training")
    if "held_out" in data:
        held = cat_list(data["held_out"], "held_out")
    else:
        held = tuple(c for c in cats if c.allowable and c not in seen)
    both = set(seen) & set(held)
    if both:
        raise _fail(where, "held_out", f"{sorted(c.value for c in both)} are also in 'seen'")
    raw_tc = data.get("test_configs", {})
    if not isinstance(raw_tc, Mapping):
        raise _fail(where, "test_configs", f"must map a config name to a list of allowed categories, got {raw_tc!r}")
    tcs = {str(k): sort_categories(cat_list(v, f"test_configs.{k}")) for k, v in raw_tc.items()}
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise _fail(where, "description", f"must be a string, got {desc!r}")
    tax = Taxonomy(name, tuple(cats), seen, held, other, tcs, desc.strip(), where if Path(where).is_file() else "")
    for c in cats:
        c.taxonomy = tax
    return tax


def _resolve(spec: str | Path) -> Path:
    s = str(spec)
    if s in ("", DEFAULT_TAXONOMY):
        return _SHIPPED_DIR / f"{DEFAULT_TAXONOMY}.yaml"
    p = Path(s)
    if not p.suffix and (_SHIPPED_DIR / f"{s}.yaml").is_file():  # a shipped taxonomy by name
        return _SHIPPED_DIR / f"{s}.yaml"
    return p


@functools.lru_cache(maxsize=None)
def _load_path(path: str) -> Taxonomy:
    p = Path(path)
    if not p.is_file():
        shipped = sorted(q.stem for q in _SHIPPED_DIR.glob("*.yaml"))
        raise TaxonomyError(f"{path}: taxonomy file not found (shipped taxonomies: {shipped})")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise TaxonomyError(f"{path}: a taxonomy file must end in .yaml, .yml or .json")
    except (json.JSONDecodeError, ValueError) as e:
        if isinstance(e, TaxonomyError):
            raise
        raise TaxonomyError(f"{path}: not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise TaxonomyError(f"{path}: not valid YAML: {e}") from None
    return taxonomy_from_dict(data, str(p))


def load_taxonomy(spec: str | Path | Taxonomy | None = None) -> Taxonomy:
    """A taxonomy from a path (.yaml/.yml/.json), a shipped name, or ''/None for the default."""
    if isinstance(spec, Taxonomy):
        return spec
    return _load_path(str(_resolve(spec or "").resolve()))


def default_taxonomy() -> Taxonomy:
    return load_taxonomy(None)


def taxonomy_of(*groups: Any, taxonomy: Taxonomy | str | None = None) -> Taxonomy:
    """The taxonomy to read strings with: the explicit one, else that of the first Category met."""
    if taxonomy is not None:
        return load_taxonomy(taxonomy)
    for g in groups:
        if isinstance(g, Category):
            return g.taxonomy
        if isinstance(g, (list, tuple, set, frozenset)):
            for c in g:
                if isinstance(c, Category):
                    return c.taxonomy
    return default_taxonomy()


def taxonomy_from_config(cfg: Any) -> Taxonomy:
    """The ``taxonomy`` key of a synth/eval/train-data config (absent or '' = the shipped default)."""
    try:
        spec = cfg.get("taxonomy", "") if hasattr(cfg, "get") else getattr(cfg, "taxonomy", "")
    except AttributeError:
        spec = ""
    return load_taxonomy(spec or None)


# ----- the default taxonomy's public names (kept for existing callers) -------------------

_DEFAULT = default_taxonomy()
for _c in _DEFAULT.categories:
    setattr(Category, _c.key, _c)

# All labels a judge may output, in id order.
ALL_CATEGORIES: tuple[Category, ...] = _DEFAULT.categories
# The categories a config may allow (Other Harms can never be allowed).
CONFIGURABLE_CATEGORIES: tuple[Category, ...] = _DEFAULT.configurable
# Training uses only these; the held-out three appear only in "unseen" test configs.
SEEN_CATEGORIES: tuple[Category, ...] = _DEFAULT.seen
HELD_OUT_CATEGORIES: tuple[Category, ...] = _DEFAULT.held_out
DEFINITIONS: dict[Category, str] = {c: c.definition for c in _DEFAULT.categories}


def parse_category(name: str | Category, taxonomy: Taxonomy | str | None = None) -> Category:
    """One category; a ``Category`` passes through, a string is read with ``taxonomy`` (default)."""
    if isinstance(name, Category) and taxonomy is None:
        return name
    return taxonomy_of(taxonomy=taxonomy).parse_category(name)


def parse_categories(names: Iterable[str | Category], taxonomy: Taxonomy | str | None = None) -> tuple[Category, ...]:
    """A list of names -> sorted unique categories; strings read with the taxonomy of any
    ``Category`` in the list, else ``taxonomy``, else the default."""
    if isinstance(names, str):
        raise TypeError(f"expected a list of category names, got the string {names!r}")
    names = list(names)
    return taxonomy_of(names, taxonomy=taxonomy).parse_categories(names)


def to_dash_string(cats: Iterable[Category]) -> str:
    """Categories -> ``-A-B-`` (underscored names, id order); the empty set is ``--``."""
    names = [underscore_name(c) for c in sort_categories(cats)]
    return "-" + "-".join(names) + "-" if names else "--"


def from_dash_string(text: str, taxonomy: Taxonomy | str | None = None) -> tuple[Category, ...]:
    return taxonomy_of(taxonomy=taxonomy).from_dash_string(text)


def to_dotted_name(cats: Iterable[Category]) -> str:
    """Categories -> hub split name like ``Financial_Crime_and_Theft.Privacy_Violations``."""
    names = [underscore_name(c) for c in sort_categories(cats)]
    return ".".join(names) if names else "none"


def from_dotted_name(text: str, taxonomy: Taxonomy | str | None = None) -> tuple[Category, ...]:
    return taxonomy_of(taxonomy=taxonomy).from_dotted_name(text)


def to_names(cats: Iterable[Category]) -> list[str]:
    """Categories -> plain canonical names in id order (the form stored in our datasets)."""
    return [c.value for c in sort_categories(cats)]


def map_outside_to_other(
    cats: Iterable[Category | str], train_categories: Iterable[Category | str] | None = None,
    taxonomy: Taxonomy | str | None = None,
) -> tuple[Category, ...]:
    """Map every category outside the training list to the catch-all, as a set (spec §4.5)."""
    cats = list(cats)
    train = None if train_categories is None else list(train_categories)
    return taxonomy_of(cats, train or [], taxonomy=taxonomy).map_outside_to_other(cats, train)

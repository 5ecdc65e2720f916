"""The CoSA risk taxonomy: 7 named categories plus "Other Harms", and the seen/held-out split.

One canonical enum; every other spelling used by the reference data (``-A-B-`` strings,
dotted hub split names, plain names) goes through the converters here, so a typo is an error
that names the bad token instead of a silently empty set. Host-side only: no JAX.
"""

from __future__ import annotations

import enum
import re
from typing import Iterable


class Category(str, enum.Enum):
    """A risk category; the value is the canonical name (spec §2)."""

    FINANCIAL_CRIME = "Financial Crime and Theft"
    DISCRIMINATION = "Discrimination and Verbal Abuse"
    VIOLENCE = "Violence"
    DRUGS = "Illegal Drug-Related Activities and Substance Abuse"
    PRIVACY = "Privacy Violations"
    SEXUAL = "Sexual Misconduct, Exploitation, and Infidelity"
    WEAPONS = "Weapons, Explosives, Arson, and Illegal Firearm Transactions"
    OTHER = "Other Harms"

    def __str__(self) -> str:  # f-strings and joins print the canonical name
        return self.value

    @property
    def id(self) -> int:
        """The 1-based id of spec §2 (also the canonical sort order)."""
        return _ORDER.index(self) + 1

    @property
    def definition(self) -> str:
        return DEFINITIONS[self]


_ORDER: tuple[Category, ...] = tuple(Category)

# All 8 labels a judge may output, in id order.
ALL_CATEGORIES: tuple[Category, ...] = _ORDER
# The 7 categories a config may allow (Other Harms can never be allowed).
CONFIGURABLE_CATEGORIES: tuple[Category, ...] = _ORDER[:-1]

# Training uses only these; the held-out three appear only in "unseen" test configs.
SEEN_CATEGORIES: tuple[Category, ...] = (
    Category.DISCRIMINATION,
    Category.VIOLENCE,
    Category.FINANCIAL_CRIME,
    Category.PRIVACY,
)
HELD_OUT_CATEGORIES: tuple[Category, ...] = (
    Category.DRUGS,
    Category.SEXUAL,
    Category.WEAPONS,
)

# One-line definitions, written for this project; they appear in rendered configs and judge prompts.
DEFINITIONS: dict[Category, str] = {
    Category.FINANCIAL_CRIME: (
        "taking money, property or data that is not yours, whether by fraud, scams, embezzlement, "
        "theft, robbery, burglary or breaking into computer systems"
    ),
    Category.DISCRIMINATION: (
        "treating people unfairly or demeaning them because of race, ethnicity, gender, sexual "
        "orientation, nationality, religion, disability or similar traits, including insults and slurs"
    ),
    Category.VIOLENCE: (
        "deliberately causing physical harm to people or animals, such as assault, murder, torture "
        "or kidnapping, and also harming oneself"
    ),
    Category.DRUGS: (
        "producing, buying, selling, smuggling or taking controlled substances, and misusing legal "
        "medicines, alcohol or other intoxicants"
    ),
    Category.PRIVACY: (
        "getting, gathering, tracking or exposing someone's personal information without their "
        "permission"
    ),
    Category.SEXUAL: (
        "sexual harassment, coercion, exploitation or trafficking, any sexual content involving "
        "minors or lacking consent, and helping someone conceal infidelity"
    ),
    Category.WEAPONS: (
        "using or building weapons or explosives to hurt people, setting fires on purpose, and "
        "trading firearms outside legal checks"
    ),
    Category.OTHER: "any other harmful content that none of the categories above describes",
}


def sort_categories(cats: Iterable[Category]) -> tuple[Category, ...]:
    """Deduplicate and sort by id: the one deterministic order (sets of str-enums hash randomly)."""
    return tuple(sorted(set(cats), key=lambda c: c.id))


def _squash(name: str) -> str:
    """Spelling-insensitive key: lower case, every run of space / _ / - / , becomes one _."""
    return re.sub(r"[\s_,\-]+", "_", name.strip().lower()).strip("_")


_BY_KEY: dict[str, Category] = {_squash(c.value): c for c in Category}
_EMPTY_NAMES = {"", "none", "-", "--", "{}", "[]"}


def parse_category(name: str | Category) -> Category:
    """One category from its plain, underscored or lower-cased name; ValueError names the bad token."""
    if isinstance(name, Category):
        return name
    if not isinstance(name, str):
        raise TypeError(f"category name must be a string, got {type(name).__name__}: {name!r}")
    cat = _BY_KEY.get(_squash(name))
    if cat is None:
        known = ", ".join(repr(c.value) for c in Category)
        raise ValueError(f"unknown risk category {name!r}; known categories: {known}")
    return cat


def parse_categories(names: Iterable[str | Category]) -> tuple[Category, ...]:
    """A list of plain names (e.g. a dataset column) -> sorted unique categories."""
    if isinstance(names, str):
        raise TypeError(f"expected a list of category names, got the string {names!r}")
    return sort_categories(parse_category(n) for n in names)


def underscore_name(cat: Category) -> str:
    """Reference spelling: space, '-' and ',' each replaced by '_' (so ', ' gives '__')."""
    return re.sub(r"[\s,\-]", "_", cat.value)


def to_dash_string(cats: Iterable[Category]) -> str:
    """Categories -> ``-A-B-`` (underscored names, id order); the empty set is ``--``."""
    names = [underscore_name(c) for c in sort_categories(cats)]
    return "-" + "-".join(names) + "-" if names else "--"


def from_dash_string(text: str) -> tuple[Category, ...]:
    """``-Violence-Privacy_Violations-`` -> categories. Accepts missing outer dashes."""
    if not isinstance(text, str):
        raise TypeError(f"expected a -A-B- string, got {type(text).__name__}: {text!r}")
    if text.strip().lower() in _EMPTY_NAMES:
        return ()
    tokens = [t for t in text.strip().split("-") if t.strip()]
    cats, i = [], 0
    while i < len(tokens):
        # A category's own name may hold a hyphen ("Illegal Drug-Related ..."), so the dash
        # separator is ambiguous: take the longest run of pieces that names a category.
        for j in range(len(tokens), i, -1):
            cat = _BY_KEY.get(_squash("-".join(tokens[i:j])))
            if cat is not None:
                cats.append(cat)
                i = j
                break
        else:
            try:
                parse_category(tokens[i])
            except ValueError as e:
                raise ValueError(f"bad -A-B- category string {text!r}: {e}") from None
    return sort_categories(cats)


def to_dotted_name(cats: Iterable[Category]) -> str:
    """Categories -> hub split name like ``Financial_Crime_and_Theft.Privacy_Violations``."""
    names = [underscore_name(c) for c in sort_categories(cats)]
    return ".".join(names) if names else "none"


def from_dotted_name(text: str) -> tuple[Category, ...]:
    """Hub split name -> categories; ``none`` (or empty) is the empty set."""
    if not isinstance(text, str):
        raise TypeError(f"expected a dotted split name, got {type(text).__name__}: {text!r}")
    if text.strip().lower() in _EMPTY_NAMES:
        return ()
    try:
        return sort_categories(parse_category(t) for t in text.strip().split(".") if t.strip())
    except ValueError as e:
        raise ValueError(f"bad dotted category name {text!r}: {e}") from None


def to_names(cats: Iterable[Category]) -> list[str]:
    """Categories -> plain canonical names in id order (the form stored in our datasets)."""
    return [c.value for c in sort_categories(cats)]


def map_outside_to_other(
    cats: Iterable[Category], train_categories: Iterable[Category] = SEEN_CATEGORIES
) -> tuple[Category, ...]:
    """Map every category outside the training list to Other Harms, as a set (spec §4.5)."""
    train = set(train_categories)
    return sort_categories(c if c in train else Category.OTHER for c in cats)

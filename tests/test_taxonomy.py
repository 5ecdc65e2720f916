"""Taxonomy: canonical names, seen/held-out split, and the three reference spellings."""

import pytest

from cosa_jax.taxonomy import (
    ALL_CATEGORIES,
    CONFIGURABLE_CATEGORIES,
    HELD_OUT_CATEGORIES,
    SEEN_CATEGORIES,
    Category,
    from_dash_string,
    from_dotted_name,
    map_outside_to_other,
    parse_categories,
    parse_category,
    to_dash_string,
    to_dotted_name,
)

# Spec §2 table, typed out again here rather than read from the module under test.
SPEC_TABLE = {
    1: "Financial Crime and Theft",
    2: "Discrimination and Verbal Abuse",
    3: "Violence",
    4: "Illegal Drug-Related Activities and Substance Abuse",
    5: "Privacy Violations",
    6: "Sexual Misconduct, Exploitation, and Infidelity",
    7: "Weapons, Explosives, Arson, and Illegal Firearm Transactions",
    8: "Other Harms",
}


def test_canonical_names_and_ids():
    assert {c.id: c.value for c in Category} == SPEC_TABLE
    assert [c.value for c in ALL_CATEGORIES] == [SPEC_TABLE[i] for i in range(1, 9)]
    assert Category.OTHER not in CONFIGURABLE_CATEGORIES and len(CONFIGURABLE_CATEGORIES) == 7
    for c in Category:
        assert c.definition and "\n" not in c.definition


def test_seen_and_held_out():
    assert {c.value for c in SEEN_CATEGORIES} == {SPEC_TABLE[i] for i in (2, 3, 1, 5)}
    assert {c.value for c in HELD_OUT_CATEGORIES} == {SPEC_TABLE[i] for i in (4, 6, 7)}
    assert not set(SEEN_CATEGORIES) & set(HELD_OUT_CATEGORIES)
    assert [c.value for c in SEEN_CATEGORIES] == [SPEC_TABLE[2], SPEC_TABLE[3], SPEC_TABLE[1], SPEC_TABLE[5]]


def test_plain_and_underscored_names():
    for c in Category:
        assert parse_category(c.value) is c
        assert parse_category(c.value.upper()) is c
    # Reference spelling: '-' and ',' replaced by '_' as well as spaces.
    assert parse_category("Illegal_Drug_Related_Activities_and_Substance_Abuse") is Category.DRUGS
    assert parse_category("Sexual_Misconduct__Exploitation__and_Infidelity") is Category.SEXUAL
    assert parse_category("Weapons__Explosives__Arson__and_Illegal_Firearm_Transactions") is Category.WEAPONS


def test_dash_strings():
    s = "-Discrimination_and_Verbal_Abuse-Violence-"
    assert from_dash_string(s) == (Category.DISCRIMINATION, Category.VIOLENCE)
    assert to_dash_string([Category.VIOLENCE, Category.DISCRIMINATION]) == s
    assert to_dash_string([Category.SEXUAL]) == "-Sexual_Misconduct__Exploitation__and_Infidelity-"
    assert from_dash_string("--") == () and to_dash_string([]) == "--"
    for k in range(1, 8):
        cats = CONFIGURABLE_CATEGORIES[:k]
        assert from_dash_string(to_dash_string(cats)) == tuple(cats)


def test_dotted_names():
    assert from_dotted_name("Financial_Crime_and_Theft.Privacy_Violations") == (
        Category.FINANCIAL_CRIME,
        Category.PRIVACY,
    )
    assert to_dotted_name([Category.PRIVACY, Category.FINANCIAL_CRIME]) == "Financial_Crime_and_Theft.Privacy_Violations"
    assert from_dotted_name("none") == ()
    assert from_dotted_name("Violence.Weapons__Explosives__Arson__and_Illegal_Firearm_Transactions") == (
        Category.VIOLENCE,
        Category.WEAPONS,
    )


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: parse_category("Violense"), "Violense"),
        (lambda: from_dash_string("-Violence-Hacking-"), "Hacking"),
        (lambda: from_dotted_name("Violence.Nope"), "Nope"),
        (lambda: parse_categories(["Violence", "Cyber"]), "Cyber"),
    ],
)
def test_unknown_names_raise_naming_the_token(call, bad):
    with pytest.raises(ValueError, match=bad):
        call()


def test_parse_categories_rejects_a_bare_string():
    with pytest.raises(TypeError):
        parse_categories("Violence")


def test_map_outside_to_other_is_a_set():
    mapped = map_outside_to_other([Category.DRUGS, Category.WEAPONS, Category.VIOLENCE], SEEN_CATEGORIES)
    assert mapped == (Category.VIOLENCE, Category.OTHER)


def test_dash_string_with_a_hyphen_inside_a_category_name():
    # The reference's spelling of its held-out Drugs config: the category's own name has a '-'.
    assert from_dash_string("-Illegal Drug-Related Activities and Substance Abuse-") == (Category.DRUGS,)
    assert from_dash_string("-Violence-Illegal Drug-Related Activities and Substance Abuse-"
                            "-Privacy Violations-") == (Category.VIOLENCE, Category.DRUGS,
                                                        Category.PRIVACY)
    assert from_dash_string("-Illegal_Drug_Related_Activities_and_Substance_Abuse-") == (Category.DRUGS,)
    with pytest.raises(ValueError, match="'Illegal Drug'"):
        from_dash_string("-Illegal Drug-Violence-")
    with pytest.raises(ValueError, match="Hacking"):
        from_dash_string("-Illegal Drug-Related Activities and Substance Abuse-Hacking-")

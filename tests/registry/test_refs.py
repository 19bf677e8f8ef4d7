from __future__ import annotations

import pytest

from adapterhub_server.registry import AdapterRef, InvalidReferenceError, parse_ref, validate_alias


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sql", AdapterRef("sql")),
        ("sql@3", AdapterRef("sql", version=3)),
        ("sql@prod", AdapterRef("sql", alias="prod")),
        ("sql@latest", AdapterRef("sql")),
        ("my-adapter.v2_x@12", AdapterRef("my-adapter.v2_x", version=12)),
        ("0a@canary-1", AdapterRef("0a", alias="canary-1")),
        ("a@v1", AdapterRef("a", alias="v1")),
    ],
)
def test_parse_ref(text: str, expected: AdapterRef) -> None:
    assert parse_ref(text) == expected


def test_ref_round_trips() -> None:
    for text in ("sql", "sql@3", "sql@prod"):
        assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@3",
        "sql@",
        "sql@0",
        "sql@03",
        "sql@-1",
        "sql@3@4",
        "SQL",
        "a/b",
        "..",
        "a..b",
        "%2e%2e",
        "/abs",
        "a\\b",
        "sql\n",
        "sql@prod/x",
        "sql@..",
        "sql@Prod",
        "a" * 65,
        "sql@" + "a" * 65,
        "sql@²",
    ],
)
def test_bad_refs(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_ref(text)


@pytest.mark.parametrize("alias", ["3", "007", "latest", "a/b", "..", "Prod", "", "a..b"])
def test_bad_aliases(alias: str) -> None:
    with pytest.raises(InvalidReferenceError):
        validate_alias(alias)


def test_good_alias() -> None:
    assert validate_alias("prod") == "prod"
    assert validate_alias("v2") == "v2"

"""Attributes in words: "long sleeves", "v-shape neckline", "no collar"; names as users type them."""

from __future__ import annotations

from collections.abc import Sequence


def phrase(attribute: str, value: str, values: Sequence[str]) -> str:
    """Words for "this garment has ``value`` of ``attribute``": ``collar`` / ``no collar`` for
    no/yes attributes, the value itself when it has several words (``long sleeves``), else value
    and attribute (``v-shape neckline``)."""
    name = display_name(attribute)
    if list(values) == ["no", "yes"]:
        return name if value == "yes" else f"no {name}"
    if " " in value.strip() or name.lower() in value.lower():
        return value
    return f"{value} {name}"


def display_name(attribute: str) -> str:
    """``sleeve_length_labels`` -> ``sleeve length``."""
    return attribute.removesuffix("_labels").replace("_", " ")


def find_attribute(text: str, names: Sequence[str]) -> str | None:
    """The attribute of ``names`` that ``text`` names, by its full or display name (case,
    underscores and spaces ignored: ``Sleeve length`` finds ``sleeve_length_labels``); None if none."""
    key = lambda s: " ".join(s.replace("_", " ").split()).lower()  # noqa: E731
    wanted = key(text)
    for name in names:
        if wanted in (key(name), key(display_name(name))):
            return name
    return None

"""Attribute contradictions: a colour, size, quantity or pack count the title states and the text contradicts.

    attribute_contradictions("Mug, Red, 12 oz", "A blue mug that holds 16 oz")  # ["volume: ...", "colour: ..."]

Rules in the docstring of `metrics.py` (attribute_contradiction_rate); word tables in `attributes.yaml`.
A heuristic: brand names ("Black & Decker") and prose ("holds two pieces") can raise false alarms.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import yaml


def attribute_contradictions(title: str, prediction: str) -> list[str]:
    """Attributes the title states and the prediction contradicts, e.g. ["colour: title pink, text blue"]."""
    rules = _attribute_rules()
    found = []
    text_quantities = _quantities(prediction, rules)
    for family, in_title in _quantities(title, rules).items():
        in_text = text_quantities.get(family)
        if in_text and not any(_close(a, b) for a, _ in in_title for b, _ in in_text):
            found.append(
                f"{family}: title {_join(s for _, s in in_title)}, text {_join(s for _, s in in_text)}"
            )
    if not rules["multicolour"].search(title):
        t_col, p_col = _colours(title, rules), _colours(prediction, rules)
        if t_col and p_col and not any(t_col[a] & p_col[b] for a in t_col for b in p_col):
            found.append(f"colour: title {_join(t_col)}, text {_join(p_col)}")
    for kind, extract in (("size", _sizes), ("pack count", _pack_counts)):
        in_title, in_text = extract(title, rules), extract(prediction, rules)
        if in_title and in_text and not in_title & in_text:
            found.append(f"{kind}: title {_join(in_title)}, text {_join(in_text)}")
    return found



_NUMBER = r"(?<![\w.,/])(\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:[.,]\d+)?)"


@functools.cache
def _attribute_rules() -> dict[str, Any]:
    tables = yaml.safe_load(
        (resources.files("prodesc.eval") / "attributes.yaml").read_text(encoding="utf-8")
    )

    def alternation(words: Any) -> str:
        return "|".join(
            re.escape(str(w)).replace(r"\ ", r"\s*") for w in sorted(words, key=len, reverse=True)
        )

    units = {_key(k): v for k, v in tables["units"].items()}
    sizes = {_key(k): v for k, v in tables["sizes"].items()}
    numbers = {_key(k): v for k, v in tables["numbers"].items()}
    # letter codes of two or more letters (XS, XXL, 2XL, X-Large) are sizes wherever they stand
    size_codes = alternation(
        k for k in tables["sizes"] if re.fullmatch(r"\d?x*[sl]|x+-\w+", str(k)) and len(k) > 1
    )
    count = rf"(\d+|{alternation(tables['numbers'])})"
    return {
        "units": units,
        "sizes": sizes,
        "numbers": numbers,
        "colours": {k.lower(): set(v) for k, v in tables["colours"].items()},
        "quantity": re.compile(rf"{_NUMBER}\s*-?\s*({alternation(tables['units'])})(?![\w])", re.I),
        "colour": re.compile(rf"\b({alternation(tables['colours'])})\b", re.I),
        "multicolour": re.compile(rf"\b({alternation(tables['multicolour'])})\b", re.I),
        "size": re.compile(
            rf"\bsize\s*[:#-]?\s*({alternation(tables['sizes'])}|\d+(?:\.\d+)?)(?![\w.])"
            rf"|\(\s*({alternation(tables['sizes'])})\s*\)|\b({size_codes})\b",
            re.I,
        ),
        "pack": re.compile(
            rf"\b{count}\s*-?\s*(?:packs?|pk|pcs|pieces?|count)\b|\b(?:pack|set|box|case|bundle|lot)\s+of\s+{count}\b",
            re.I,
        ),
    }


def _quantities(text: str, rules: dict) -> dict[str, list[tuple[float, str]]]:
    found: dict[str, list[tuple[float, str]]] = {}
    for m in rules["quantity"].finditer(text):
        number, unit = m.group(1), m.group(2)
        if unit in ("M", "G") or (unit.lower() == "in" and re.match(r"\s*\d", text[m.end() :])):
            continue  # "3M" is a brand or a million, "5G" a network; "2 in 1" is not inches
        value = float(number.replace(",", "") if re.search(r",\d{3}$", number) else number.replace(",", "."))
        family, factor = rules["units"][_key(unit)]
        found.setdefault(family, []).append((value * factor, " ".join(m.group(0).split())))
    return found


def _colours(text: str, rules: dict) -> dict[str, set[str]]:
    return {m.group(1).lower(): rules["colours"][m.group(1).lower()] for m in rules["colour"].finditer(text)}


def _sizes(text: str, rules: dict) -> set[str]:
    words = [_key(next(g for g in m.groups() if g)) for m in rules["size"].finditer(text)]
    return {str(rules["sizes"].get(w, w)) for w in words}


def _pack_counts(text: str, rules: dict) -> set[str]:
    words = [_key(next(g for g in m.groups() if g)) for m in rules["pack"].finditer(text)]
    return {str(rules["numbers"].get(w, w)) for w in words}


def _key(word: Any) -> str:
    """Table lookup key: lower case without whitespace ("Fl  Oz" -> "floz"), as the patterns allow."""
    return re.sub(r"\s+", "", str(word).lower())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 0.03 * max(abs(a), abs(b))


def _join(items: Any) -> str:
    return "/".join(dict.fromkeys(items))

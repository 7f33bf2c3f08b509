"""Specifics: the checkable facts of a product text (numbers, codes, colours, platforms), and which of them a source
supports. What a shop must check before a description goes on a product page.

    specifics("Sony Switcher - SBV40S/ 900mW Power Output/ Black Finish")
    # [Spec(kind='code', text='SBV40S', ...), Spec(kind='quantity', text='900mW', ...), Spec(kind='colour', ...)]
    unsupported(prediction, [title, *neighbour_texts])   # ["900mW", "5.1-Channel"]: stated, found in no source
    keep_supported(content, [title, *neighbour_texts])   # the clauses of a text whose specifics a source states

What counts as a specific (tables in `specs.yaml`):
- quantity: a number with a unit ("900mW", "200 Watts", "3.4 Cubic Foot", "19'", "5.1-Channel", "3-pack");
- number: any other number ("4 A/V Inputs", "20 Track"), years ("2008") and versions ("v2.0") included;
- code: a word mixing letters and digits: model and part codes ("SBV40S", "CDP-CE375"), formats ("MP3");
- colour: a colour word (the colour table of `eval/attributes.yaml`: "navy" and "blue" are one family);
- platform: an operating system, console or device family ("Windows", "Mac", "Xbox 360", "iPod").

When a source supports one (deliberately lenient: a miss here flags a true statement, which costs a shop's trust
in the flags):
- a number or quantity: the same number stands in the source, with any unit or none ("200W" is supported by
  "200 Watts Max Power"; 2.0 = 2; 1,000 = 1000); numbers inside codes do not count;
- a code: its letters and digits, without separators and case, appear in the source read the same way ("CDPCE375"
  supports "CDP-CE375"); a code of fewer than 3 characters must stand as a whole word;
- a colour: the source names a colour of the same family;
- a platform: the source names the same platform.
Matching ignores case. A number the source states as a word ("two") does not support "2": rare in spec lists.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

KINDS = ("quantity", "number", "code", "colour", "platform")
_DIGIT = re.compile(r"[0-9]")  # a word (tables' "word": ASCII letters and digits) that holds a number


@dataclass(frozen=True)
class Spec:
    kind: str  # one of KINDS
    text: str  # as written ("900mW", "4 A/V", "Black")
    key: str  # what is compared: "900" for numbers and quantities, "SBV40S" for codes, the family for colours


def specifics(text: str) -> list[Spec]:
    """The specifics a text states, in order of appearance (a repeated one listed each time)."""
    t = _tables()
    if "&" in text:  # raw catalog text: "&#8217;" is an apostrophe, not the number 8217
        text = html.unescape(text)
    found: list[tuple[int, Spec]] = []
    taken: list[tuple[int, int]] = []  # spans already read (a quantity's number is not also a number)
    platforms = list(t["platform"].finditer(text))  # first: the "3" of "PlayStation 3" is the platform's
    taken.extend(p.span() for p in platforms)
    for m in t["word"].finditer(text) if _DIGIT.search(text) else ():  # only words with a digit are read here
        word = m.group(0)
        if _DIGIT.search(word) is None or any(a <= m.start() < b for a, b in taken):
            continue
        if m.start() >= 2 and text[m.start() - 1] == ":" and text[m.start() - 2].isdigit():
            continue  # the 1 of a ratio ("10000:1") is the ratio's
        if word.isdigit() and text[m.end():m.end() + 1] == ")" and text[max(m.start() - 1, 0):m.start()] != "(":
            continue  # a list marker ("1) Made in the USA"), not a number the product has
        q = t["quantity"].fullmatch(word) or _spaced_quantity(text, m, t)
        o = t["ordinal"].fullmatch(word)
        if q is not None and q.group("unit").lower().rstrip(".") in t["units"]:
            number = _number_key(q.group("num"))
            end = m.start() + q.end() if q.string is word else q.end()
            found.append((m.start(), Spec("quantity", " ".join(text[m.start() : end].split()), number)))
            taken.append((m.start(), end))
        elif t["number"].fullmatch(word) or o:
            found.append((m.start(), Spec("number", word, _number_key(o.group(1) if o else word))))
            taken.append(m.span())
        elif re.search(r"[A-Za-z]", word):
            found.append((m.start(), Spec("code", word, _code_key(word))))
            taken.append(m.span())
        else:  # fractions, ranges, dimensions: each number in it ("33-1/3", "12x18")
            for n in re.finditer(r"\d+(?:[.,]\d+)*", word):
                found.append((m.start() + n.start(), Spec("number", n.group(0), _number_key(n.group(0)))))
            taken.append(m.span())
    for m in t["colour"].finditer(text):
        found.append((m.start(), Spec("colour", m.group(0), "/".join(sorted(t["colours"][m.group(0).lower()])))))
    for m in platforms:
        found.append((m.start(), Spec("platform", m.group(0), t["platforms"][_fold(m.group(0))])))
    return [s for _, s in sorted(found, key=lambda p: p[0])]


def supported(spec: Spec, sources: Sources) -> bool:
    """Whether `sources` (see `Sources`) state `spec`, by the rules of the module docstring."""
    if spec.kind in ("quantity", "number"):
        return spec.key in sources.numbers
    if spec.kind == "code":
        return spec.key in sources.codes if len(spec.key) < 3 else spec.key in sources.flat
    if spec.kind == "colour":
        return any(set(spec.key.split("/")) & set(c.split("/")) for c in sources.colours)
    return spec.key in sources.platforms


class Sources:
    """Texts a statement may rest on (a title, a reference, the neighbours shown), read once for many checks."""

    def __init__(self, texts: list[str]) -> None:
        found = [s for text in texts for s in specifics(text or "")]
        self.numbers = {s.key for s in found if s.kind in ("quantity", "number")}
        self.codes = {s.key for s in found if s.kind == "code"}
        self.colours = {s.key for s in found if s.kind == "colour"}
        self.platforms = {s.key for s in found if s.kind == "platform"}
        self.flat = " ".join(_code_key(t or "") for t in texts)  # codes are looked for as substrings of this


def unsupported(text: str, sources: list[str] | Sources) -> list[str]:
    """The specifics `text` states that no source supports, as written, each once (the review flag)."""
    src = sources if isinstance(sources, Sources) else Sources(sources)
    return list(dict.fromkeys(s.text for s in specifics(text) if not supported(s, src)))


def keep_supported(text: str, sources: list[str]) -> str:
    """`text` without its clauses that state a specific no source supports (clauses: sentences, list items split
    by "/ ", ";", "•", "|" or line breaks). The first clause always stays: a training answer never becomes empty
    and keeps its opening (in a spec list, the product's name and code)."""
    src = Sources(sources)
    parts = _tables()["clause"].split(text)
    clauses, seps = parts[0::2], parts[1::2] + [""]
    kept = [
        (c, s) for i, (c, s) in enumerate(zip(clauses, seps, strict=True))
        if i == 0 or all(supported(x, src) for x in specifics(c))
    ]  # fmt: skip
    out = "".join(c + s for c, s in kept).strip()
    return re.sub(r"\s*(?:/|;|•|\|)\s*$", "", out) if out else text


def support_counts(prediction: str, title: str, reference: str) -> dict[str, Any]:
    """What `eval` counts for one item: the prediction's distinct specifics (`stated`) and how many the title or
    reference support (`supported`), the others as written (`invented`); the reference's specifics not already in
    the title (`ref_new`) and how many of those the prediction states (`ref_new_stated`)."""
    pred = _distinct(specifics(prediction))
    title_src, pred_src = Sources([title]), Sources([prediction])
    backed = Sources([title, reference])
    ref_new = [s for s in _distinct(specifics(reference)) if not supported(s, title_src)]
    invented = [s.text for s in pred if not supported(s, backed)]
    return {
        "stated": len(pred),
        "supported": len(pred) - len(invented),
        "invented": list(dict.fromkeys(invented)),
        "ref_new": len(ref_new),
        "ref_new_stated": sum(supported(s, pred_src) for s in ref_new),
    }


class Grounding:
    """The words with a digit that `texts` write (numbers, codes, versions), for decoding that may write such a word
    only as a text of the prompt writes it (`generate.grounded`). Words are runs of letters, digits and the joiners
    - . , ' " (so "33-1/3" is "33-1" and "3"), compared lowercased without their joiners ("KDL40" = "KDL-40")."""

    def __init__(self, texts: list[str]) -> None:
        self.words: set[str] = set()
        for text in texts:
            self.words.update(k for w in _GROUND_WORD.findall(text or "") if _has_digit(k := ground_key(w)))
        self.prefixes = {w[:i] for w in self.words for i in range(1, len(w) + 1)}

    def allows(self, tail: str, piece: str) -> bool:
        """Whether the answer may go on with `piece` after the text `tail` (its last characters): each word with a
        digit that `piece` writes or extends must be the start of a prompt word, and a word with a digit that
        `piece` ends must be a whole prompt word."""
        partial = _GROUND_TAIL.search(tail).group(0)
        text = partial + piece
        for m in _GROUND_WORD.finditer(text):
            if m.end() <= len(partial) and m.end() < len(text):  # a word of the tail, ended by the piece
                key = ground_key(m.group(0))
                if _has_digit(key) and key not in self.words:
                    return False
            elif m.end() > len(partial):  # a word the piece writes or extends
                key = ground_key(m.group(0))
                if _has_digit(key) and key not in self.prefixes:
                    return False
        return True


def ground_key(word: str) -> str:
    return re.sub(r"[^0-9a-z]", "", word.lower())


_GROUND_WORD = re.compile(r"[A-Za-z0-9\-.,'\"]*[A-Za-z0-9][A-Za-z0-9\-.,'\"]*")
_GROUND_TAIL = re.compile(r"[A-Za-z0-9\-.,'\"]*$")


# --- helpers ---


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


def _distinct(found: list[Spec]) -> list[Spec]:
    return list({(s.kind, s.key): s for s in found}.values())


def _spaced_quantity(text: str, m: re.Match, t: dict) -> re.Match | None:
    """A number word followed by a unit word after a space or hyphen ("200 Watts", "3.4 Cubic Foot")."""
    if not t["number"].fullmatch(m.group(0)):
        return None
    q = t["spaced"].match(text, m.start())
    unit = q.group("unit").lower() if q is not None else ""
    if unit == "in" and re.match(r"[\s-]*\d", text[q.end():]):
        return None  # "5 In 1" is no length
    return q if len(unit) > 1 and unit in t["units"] else None  # "4 A/V" is no current: one letter only attached


def _number_key(number: str) -> str:
    """'1,000' -> '1000', '2.0' -> '2', '5,1' (decimal comma) -> '5.1'."""
    n = number.strip()
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+", n):
        n = n.replace(",", "")
    n = n.replace(",", ".")
    if "." in n:
        n = n.rstrip("0").rstrip(".") or "0"
    return n.lstrip("0") or "0" if "." not in n else n


def _code_key(word: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", word.upper())


def _fold(word: str) -> str:
    """Platform spelling without case, spaces and hyphens ("Mac OS X", "MacOS X" and "mac-os x" are one)."""
    return re.sub(r"[\s\-]+", "", word.lower())


@functools.cache
def _tables() -> dict[str, Any]:
    own = yaml.safe_load((resources.files("prodesc") / "specs.yaml").read_text(encoding="utf-8"))
    attrs = yaml.safe_load((resources.files("prodesc.eval") / "attributes.yaml").read_text(encoding="utf-8"))
    units = {str(u).lower() for u in [*attrs["units"], *own["units"]]}
    words = sorted(units - {'"', "'"}, key=len, reverse=True)
    unit_alt = "|".join(re.escape(u).replace(r"\ ", r"[\s-]+") for u in words)
    spellings = [str(a) for canon, aliases in own["platforms"].items() for a in [canon, *aliases]]
    platforms = {_fold(a): canon for canon, aliases in own["platforms"].items() for a in [canon, *aliases]}
    plat_alt = "|".join(re.escape(p).replace(r"\ ", r"[\s-]*") for p in sorted(spellings, key=len, reverse=True))
    number = r"\d+(?:[.,]\d+)*"
    return {
        "units": units | {'"', "'"},
        "platforms": platforms,
        "colours": {k.lower(): set(v) for k, v in attrs["colours"].items()},
        # a word: letters, digits and the joiners inside codes and numbers ("CDP-CE375", "5.1", "33-1/3", "19'")
        "word": re.compile(r"[A-Za-z0-9]+(?:[\-.,][A-Za-z0-9]+|(?<=\d)/\d+)*(?:'|\")?"),
        "number": re.compile(rf"{number}"),
        "ordinal": re.compile(r"(\d+)(?:st|nd|rd|th)(?:-[A-Za-z]+)?", re.I),  # "20th", "20th-century"
        # number and unit in one word ("900mW", "5.1-Channel", "19'", "3-pack")
        "quantity": re.compile(rf"(?P<num>{number})-?(?P<unit>{unit_alt}|'|\")\.?", re.I),
        "spaced": re.compile(rf"(?P<num>{number})[\s-]+(?P<unit>{unit_alt})(?![A-Za-z0-9])", re.I),
        "colour": re.compile(  # "Gold Plated Contacts" is a material, not the product's colour
            r"\b(" + "|".join(sorted((re.escape(c) for c in attrs["colours"]), key=len, reverse=True))
            + r")\b(?![\s-]+plated)",
            re.I,
        ),
        "platform": re.compile(rf"(?<![A-Za-z0-9])({plat_alt})(?![A-Za-z0-9])", re.I),
        # clause boundaries: sentence ends, "/ " list items (not "A/V"), ; • | and line breaks
        "clause": re.compile(r"((?<=[.!?])\s+(?=[A-Z0-9\"'(])|\s*/\s+|\s*[;•|]\s*|\s*\n+\s*)"),
    }

"""Text cleaning and the title-family key, one record field at a time (used by `prodesc data prepare`).

    >>> clean_text("Judith Kerr&amp;#8217;s best&#8211;selling<br>books")
    'Judith Kerr’s best–selling books'
    >>> family_key("Girls Ballet Tutu Neon Pink") == family_key("Girls Ballet Tutu Neon Blue")
    True

`clean_text` keeps case, punctuation and accents: it decodes HTML entities (named, numeric, double-escaped),
drops tags (block tags become a space), applies Unicode NFKC, removes control and bidirectional-control
characters and collapses whitespace. NFKC leaves ’ – — alone but does turn … into ... and a no-break space into a
space.
`lossy_ascii_lower` is the notebook's normalisation (lowercase, only a-z 0-9 and spaces kept): it destroys
accents, punctuation and case, and is only applied when `data.lossy_ascii_lower` is on.

`family_key` is the rule that keeps product variants in one split. Key of a title: lowercase it and strip
accents; remove (parenthetical), [bracketed] and {braced} parts; remove series markers with their number
("Vol. 1", "Volume II", "Part 3", "Book 4", "No. 5", "#6", "Season 2"), editions ("2nd edition",
"U.S. Edition"), format words (paperback, large print, audio cd...), numbers with units ("12 oz", "3-pack",
"500ml", "pack of 6", "12 x 18"), colour and size words (word tables in `prodesc/data/family_words.yaml`; letter
sizes such as "XL" only after a separator or at the end); then punctuation and trailing numbers; collapse
spaces. A key left empty, or made only of stopwords, falls back to the lowercase title without punctuation.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import cache, lru_cache
from importlib import resources

import yaml

_UNESCAPE_ROUNDS = 5  # "&amp;amp;#8217;" needs 3; the bound only stops pathological input
_BLOCK_TAGS = "br|p|div|li|ul|ol|tr|td|th|h[1-6]|table|tbody|thead|hr|blockquote|dd|dt|dl|section|article|pre"
_BLOCK_TAG_RE = re.compile(rf"</?(?:{_BLOCK_TAGS})\b[^<>]*>", re.IGNORECASE)
# A tag needs a letter right after "<" or "</", so "a < b" and "<3" in prose survive.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>|<!--.*?-->", re.DOTALL)
# Every entity html.unescape decodes starts so ("&#8217;", "&#x2019;", "&amp;"; all names start with a letter).
_ENTITY_START_RE = re.compile("&[#A-Za-z]")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_NON_SPACE_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f]")  # ASCII controls that are not whitespace
# html.unescape's own pattern (html._charref): an entity it may decode, named, decimal or hex.
_CHARREF_RE = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
# Invisible format characters, bidirectional controls (U+061C, U+200E/F, U+202A-E, U+2066-9: they reorder how text
# around them is displayed, "Trojan Source") and lone surrogates (from "\udXXX" JSON escapes; Parquet cannot store
# them). All are non-ASCII and not printable, so columns.py sends their rows here: both paths drop them alike.
_DROP_RE = re.compile("[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\ud800-\udfff]")
_NOT_ASCII_ALNUM_RE = re.compile("[^a-z0-9 ]")


def clean_text(text: str) -> str:
    """Decode entities, drop tags, NFKC, drop control characters, collapse whitespace. Keeps case and accents."""
    # Each step is skipped when a cheap C-level test says it has nothing to do: this runs on ~2M records.
    rounds = _UNESCAPE_ROUNDS
    while "&" in text and rounds and _ENTITY_START_RE.search(text):  # "Tom & Jerry" has nothing to decode
        decoded = _CHARREF_RE.sub(_charref, text)  # = html.unescape(text), with each entity decoded once
        if decoded == text:
            break
        text, rounds = decoded, rounds - 1
    if "<" in text:
        text = _TAG_RE.sub("", _BLOCK_TAG_RE.sub(" ", text))
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if text.isprintable() and "  " not in text:  # no tab, newline, control, odd space, soft hyphen...
        return text.strip()
    if text.isascii():  # nothing to drop; str.split() already splits on \t \n \r \x0b \x0c \x1c-\x1f
        return " ".join((_CONTROL_RE.sub(" ", text) if _NON_SPACE_CONTROL_RE.search(text) else text).split())
    return " ".join(_CONTROL_RE.sub(" ", _DROP_RE.sub("", text)).split())


def _charref(match: re.Match) -> str:
    return _unescape_one(match.group())


@lru_cache(maxsize=4096)
def _unescape_one(ref: str) -> str:
    """One entity as html.unescape decodes it in context (its regex is greedy, so the match alone reads alike)."""
    return html.unescape(ref)


def lossy_ascii_lower(text: str) -> str:
    """LOSSY, the notebook's normalisation: lowercase, keep only a-z, 0-9 and spaces."""
    return " ".join(_NOT_ASCII_ALNUM_RE.sub("", text.lower()).split())


def title_key(title: str) -> str:
    """Key of `duplicate_title`: the cleaned title, case-insensitive and whitespace-normalised."""
    return " ".join(title.casefold().split())


def family_key(title: str) -> str:
    """Key shared by the variants of one product (colours, sizes, volumes, editions, pack counts)."""
    r = _rules()
    s = title.lower()
    if not s.isascii():
        s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    if "(" in s or "[" in s or "{" in s:
        s = r["brackets"].sub(" ", s)
    if "edition" in s:
        s = r["edition"].sub(" ", s)
    if r["digit"].search(s):  # units, dimensions and "#5" all need a digit; most titles have none
        s = r["units"].sub(" ", s)
    s = r["letter_sizes"].sub(" ", r["words"].sub(" ", s))
    words = r["punct"].sub(" ", s).split()
    # Trailing numbers ("Paris 1900-1914", "Rocky 2") and a trailing letter size ("T-Shirt Black XL").
    while len(words) > 1 and (words[-1].isdigit() or words[-1] in r["letter_set"]):
        words.pop()
    if not words or r["stopwords"].issuperset(words):
        words = r["punct"].sub(" ", title.lower()).split() or [title.lower()]
    return " ".join(words)


@cache
def _rules() -> dict:
    """Compile the word tables of family_words.yaml once per process (tries: alternations of 100 words are slow)."""
    words = yaml.safe_load((resources.files("prodesc.data") / "family_words.yaml").read_text("utf-8"))
    number = r"(?:\d+(?:[.,]\d+)?|[ivx]{1,4}|one|two|three|four|five|six|seven|eight|nine|ten)\b"
    ordinal = r"(?:\d+(?:st|nd|rd|th)|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth)"
    units = _trie(words["units"])
    return {
        "brackets": re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}"),
        "edition": re.compile(rf"\b{ordinal}\s+(?:ed\b\.?|edition\b|printing\b)|\S+\s+edition\b|\bedition\b"),
        "digit": re.compile(r"\d"),
        "units": re.compile(
            rf"#\s*\d+\b|\b\d+(?:[.,]\d+)?\s*-?\s*{units}\b\.?"
            rf"|\b(?:pack|set|case|box|lot|bundle|pair)s?\s+of\s+\d+\b"
            rf"|\b\d+(?:\.\d+)?\s*(?:x|×|by)\s*\d+(?:\.\d+)?(?:\s*(?:x|×)\s*\d+(?:\.\d+)?)?(?:\s*{units}\b)?"
        ),
        # Series markers with their number, and colour/size/format words, in one pass.
        "words": re.compile(
            rf"\b(?:{_trie(words['markers'])}\b\.?\s*#?\s*{number}"
            rf"|{_trie(words['colours'] + words['sizes'] + words['formats'])}\b)"
        ),
        "letter_sizes": re.compile(rf"[,/(:–—-]\s*{_trie(words['letter_sizes'])}\b"),
        "letter_set": frozenset(words["letter_sizes"]),
        "punct": re.compile(r"[\W_]+"),
        "stopwords": frozenset(words["stopwords"]),
    }


def _trie(words: list[str]) -> str:
    """One regex alternation shaped as a trie ("b(?:l(?:ack|ue)|rown)"): it fails on the first letter."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch).replace(r"\ ", r"\s+") + build(sub) for ch, sub in sorted(node.items()) if ch]
        if not branches:
            return ""
        if len(branches) == 1 and "" not in node:
            return branches[0]
        return "(?:" + "|".join(branches) + ")" + ("?" if "" in node else "")

    return build(trie)

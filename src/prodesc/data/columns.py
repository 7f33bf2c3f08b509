"""`clean.py` over whole Arrow columns: the same results, computed by Arrow's C++ kernels where that is exact.

    titles = clean_column(pa.array(["Judith Kerr&#8217;s<br>books", "  Tea  Set "]))
    keys = family_keys(titles)

`prodesc data prepare` runs on millions of records; calling `clean_text` and `family_key` once per record in
Python is most of its time. Here one RE2 match over the column finds the rows of plain printable ASCII, which
pass through (trimmed if they start or end with a space); ASCII rows whose only mess is runs of whitespace or
control characters are collapsed by RE2; an ASCII title gets its family key from the same regexes as
`clean.family_key` (RE2 and Python's `re` match alike on ASCII, with leftmost-first alternation). Every other
row (entities, tags, non-ASCII text that needs NFKC, keys that fall back to the whole title) goes through
`clean.py` itself, so the output is identical to calling it on every row; tests/test_data.py checks that on
the synthetic corpus, edge cases included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from prodesc.data.clean import _rules, clean_text, family_key

# Rows that clean_text only strips: printable ASCII, no double space, no entity or tag to decode.
_NOT_PLAIN = r"[^\x20-\x7e]|  |&[#A-Za-z]|<[/A-Za-z!]"
# Of the others, those that need clean_text itself: non-ASCII (NFKC), an entity or a tag to decode. The rest
# have control characters or double spaces only: each run of them (and of spaces) becomes one space.
_NEEDS_PYTHON = r"[^\x00-\x7f]|&[#A-Za-z]|<[/A-Za-z!]"
_SPACE_RUN = r"[\x00-\x20\x7f]{2,}|[\x00-\x1f\x7f]"  # single spaces left alone: each replacement copies


def clean_column(text: pa.Array) -> pa.Array:
    """`clean.clean_text` of every row (nulls become "")."""
    if text.null_count:
        text = pc.fill_null(text, "")
    padded = pc.or_(pc.starts_with(text, " "), pc.ends_with(text, " "))
    odd_rows = pc.or_(pc.match_substring_regex(text, _NOT_PLAIN), padded)
    if not pc.any(odd_rows).as_py():
        return text
    odd = text.filter(odd_rows)  # only these are copied: Arrow's string kernels copy every row they touch
    python = pc.match_substring_regex(odd, _NEEDS_PYTHON)
    spaces = pc.invert(python)
    cleaned = odd
    if pc.any(spaces).as_py():
        collapsed = pc.ascii_trim(pc.replace_substring_regex(odd.filter(spaces), _SPACE_RUN, " "), " ")
        cleaned = pc.replace_with_mask(cleaned, spaces, collapsed)
    if pc.any(python).as_py():
        fixed = [clean_text(v) for v in odd.filter(python).to_pylist()]
        cleaned = pc.replace_with_mask(cleaned, python, pa.array(fixed, pa.string()))
    return pc.replace_with_mask(text, odd_rows, cleaned)


def strip_ids(ids: pa.Array) -> pa.Array:
    """Ids as `data` keeps them: ASCII ids `str.strip()`-ped, others through `clean_text`; nulls become ""."""
    ids = pc.fill_null(ids, "")
    fast = pc.string_is_ascii(ids)
    out = pc.utf8_trim(ids, "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f ")  # what str.strip() strips from ASCII
    return _patch(out, fast, ids, clean_text)


def family_keys(titles: pa.Array) -> pa.Array:
    """`clean.family_key` of every (cleaned, non-empty) title."""
    r = _re2_rules()
    fast = pc.string_is_ascii(titles)
    s = pc.ascii_lower(titles)
    for name in ("brackets", "edition", "units", "words", "letter_sizes", "punct"):
        s = pc.replace_substring_regex(s, r[name], " ")
    s = pc.ascii_trim(pc.replace_substring_regex(s, "  +", " "), " ")  # = " ".join(s.split()) here
    s = pc.replace_substring_regex(s, r["trailing"], "")  # trailing numbers and letter sizes, never the first word
    # Empty keys and keys made only of stopwords fall back to the whole title: left to family_key.
    fast = pc.and_(fast, pc.invert(pc.match_substring_regex(s, r["only_stopwords"])))
    return _patch(s, fast, titles, family_key)


def title_keys(titles: pa.Array) -> pa.Array:
    """`t.casefold()` of every cleaned title (`clean.title_key` of a title that is already collapsed)."""
    fast = pc.string_is_ascii(titles)
    return _patch(pc.ascii_lower(titles), fast, titles, str.casefold)


def hash64(text: pa.Array) -> np.ndarray:
    """xxh3-64 of each row's UTF-8 bytes: equal strings, equal hashes (xxh3 is specified, so stable)."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest, _row_bytes(text)), np.uint64, len(text))


def salted_blake2b64(text: pa.Array, salt: bytes) -> np.ndarray:
    """blake2b(salt + UTF-8 bytes), 8 bytes little-endian, per row: the family hash that picks the split."""
    digests = b"".join(hashlib.blake2b(salt + b, digest_size=8).digest() for b in _row_bytes(text))
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def _row_bytes(text: pa.Array) -> Iterator[memoryview]:
    """Each row's UTF-8 bytes, as views into the array's data buffer."""
    text = _plain(text)
    offsets = np.frombuffer(text.buffers()[1], np.int32, len(text) + 1, text.offset * 4).tolist()
    return map(memoryview(text.buffers()[2] or b"").__getitem__, map(slice, offsets[:-1], offsets[1:]))


def _plain(arr: pa.Array) -> pa.StringArray:
    """One chunk of type string, without nulls (hashing reads its buffers)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    return arr


def _patch(out: pa.Array, fast: pa.Array, source: pa.Array, fn) -> pa.Array:  # noqa: ANN001
    """`out` where `fast`, else fn(source row) computed in Python."""
    slow = pc.invert(fast)
    if not pc.any(slow).as_py():
        return out
    values = [fn(v) for v in pc.filter(source, slow).to_pylist()]
    return pc.replace_with_mask(out, slow, pa.array(values, pa.string()))


@cache
def _re2_rules() -> dict[str, str]:
    """clean._rules() as RE2 pattern strings, plus the two steps family_key does with Python lists."""
    rules = _rules()
    letters = "|".join(sorted(rules["letter_set"], key=len, reverse=True))
    stop = "|".join(sorted(rules["stopwords"], key=len, reverse=True))
    out = {name: rules[name].pattern for name in ("brackets", "edition", "units", "words", "letter_sizes")}
    # [\W_]+ on lowercase ASCII, leaving single spaces alone (replacing each by itself costs a copy per row)
    out["punct"] = "[^a-z0-9 ]+"
    out["trailing"] = rf"(?: (?:[0-9]+|{letters}))+$"
    out["only_stopwords"] = rf"^(?:(?:{stop})(?: (?:{stop}))*)?$"
    return out

"""What a worker makes of a chunk: its raw records as an Arrow table, and the locations of malformed ones.

    table, read, bad = raw_records(chunk, strict)    # (no, uid, title, content, pre), malformed locations

A block of JSON lines is parsed by Arrow's JSON reader where that is exact, and line by line (`_jsonl_rows`,
which decides what is malformed) where it is not; see readers.py for the rules and the chunks themselves.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from prodesc.data import readers
from prodesc.data.clean import clean_text
from prodesc.data.readers import RAW_SCHEMA, Chunk, from_shared
from prodesc.errors import ProdescError

_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # also lone surrogates from JSON escapes ("\\ud800")
_LABELS = ', "target_ind": ['
ARROW_JSON = True  # parse JSON lines with Arrow where that is exact (tests turn it off to compare)
_ARROW_ERROR_ROW = re.compile(r"in row (-?\d+)")
_MAX_ARROW_ERRORS = 8  # per block; past that the line reader takes the rest (e.g. when every id is a number)
_NOT_AN_OBJECT = re.compile(rb"\n[ \t\r]*[^{ \t\r]")  # a line that does not start with "{", blank ones included
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # the C scanner behind json.loads, without its checks


def raw_records(chunk: Chunk, strict: bool) -> tuple[pa.Table, int, list[str]]:
    """The chunk's well-formed records as a table (RAW_SCHEMA: no, uid, title, content as text or null, pre),
    records read, and the locations of malformed ones."""
    pieces, read, bad = [], 0, []
    chunk = from_shared(chunk)
    for piece in _jsonl_pieces(chunk) if chunk.lines else [chunk.rows]:
        if isinstance(piece, pa.Table):
            pieces.append(piece)
            read += len(piece)
            continue
        rows = []
        for no, uid, title, content, error in piece:
            read += 1
            if error is None and not (type(title) is str and type(content) is str):
                title, content = _as_text(title), _as_text(content)
                error = "title or content is not text" if title is None or content is None else None
            if error is not None:
                if strict:
                    raise ProdescError(
                        f"{chunk.label}:{no}: malformed record ({error}): fix it, or drop --strict to skip and count it"
                    )
                bad.append(f"{chunk.label}:{no}")
                continue
            rows.append((no, uid if type(uid) is str else _as_text(uid), title, content, False))
        pieces.append(_rows_table(rows))
    return pa.concat_tables(pieces) if pieces else RAW_SCHEMA.empty_table(), read, bad


def _rows_table(rows: list[tuple]) -> pa.Table:
    """(no, uid, title, content, False) rows as a raw table. A row with a lone surrogate ("\\ud800" in JSON) cannot be
    UTF-8: it is cleaned here, in Python, which drops the surrogate, and marked `pre`."""
    if not rows:
        return RAW_SCHEMA.empty_table()
    try:
        cols = [pa.array(c, t) for c, t in zip(zip(*rows, strict=True), RAW_SCHEMA.types, strict=True)]
    except UnicodeEncodeError:
        rows = [_pre_clean(r) if not all(_utf8able(v) for v in r[1:4]) else r for r in rows]
        cols = [pa.array(c, t) for c, t in zip(zip(*rows, strict=True), RAW_SCHEMA.types, strict=True)]
    return pa.table(cols, schema=RAW_SCHEMA)


def _utf8able(value: str | None) -> bool:
    return value is None or value.isascii() or not _SURROGATE_RE.search(value)


def _pre_clean(row: tuple) -> tuple:
    no, uid, title, content, _ = row
    uid = uid or ""  # the id rule of columns.strip_ids, on one value
    return (no, uid.strip() if uid.isascii() else clean_text(uid), clean_text(title), clean_text(content), True)


def _jsonl_pieces(chunk: Chunk, id_type: pa.DataType = pa.string()) -> Iterator[pa.Table | Iterator[tuple]]:
    """A block of JSON lines as tables parsed by Arrow's JSON reader, and, for the lines Arrow would not read
    exactly like `json.loads` (bad JSON, a value that is not a string, bad UTF-8, a blank line, a BOM not on
    line 1), row iterators of the per-line reader `_jsonl_rows`. Pieces come in line order.

    Integer ids (`"id": 31909`) are read as int64 and cast to text, as str(int) would write them."""
    tf, cf, idf = chunk.fields
    names = [n for n in (idf, tf, cf) if n]
    if not ARROW_JSON or len(set(names)) < len(names):
        yield _jsonl_rows(chunk)
        return
    block, no, errors = chunk.lines, chunk.first_no, 0
    while block:
        schema = pa.schema([(n, id_type if n == idf else pa.string()) for n in names])
        lines = chunk.n_lines if block is chunk.lines and chunk.n_lines else _count_lines(block)
        table, bad = None, None  # bad: index of the first line that needs the line reader
        if block.startswith(b"\xef\xbb\xbf") and no != 1:  # json.loads refuses a BOM: not a record
            bad = 0
        elif (bad := _first_non_object(block)) is not None:
            pass
        elif (at := _first_bad_utf8(block)) is not None:  # Arrow does not check UTF-8 while parsing
            bad = block.count(b"\n", 0, at)
        else:
            try:
                table = pa_json.read_json(
                    pa.BufferReader(block),
                    read_options=pa_json.ReadOptions(use_threads=False, block_size=len(block) + 1),
                    parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
                )
            except pa.ArrowInvalid as e:
                if id_type == pa.string() and f"Column(/{idf}) changed from string to number" in str(e):
                    id_type = pa.int64()  # numeric ids: every line would fail; try them as integers
                    continue
                row = _ARROW_ERROR_ROW.search(str(e))  # may name the line after the bad one: both go below
                bad = min(max(int(row.group(1)), 0), lines - 1) if row else None
                if bad is None:
                    yield _jsonl_rows(replace(chunk, first_no=no, lines=block))
                    return
        if bad is not None:  # lines before it (checked again on their own), it alone, then the rest
            errors += 1
            if errors > _MAX_ARROW_ERRORS:
                yield _jsonl_rows(replace(chunk, first_no=no, lines=block))
                return
            cut, end = _after_lines(block, bad), _after_lines(block, bad + 1)
            if cut:
                yield from _jsonl_pieces(replace(chunk, first_no=no, lines=block[:cut], n_lines=0), id_type)
            yield _jsonl_rows(replace(chunk, first_no=no + bad, lines=block[cut:end]))
            block, no = block[end:], no + bad + 1
            continue
        if table.num_rows != lines:  # rows and lines do not pair up (e.g. a last line of spaces)
            yield _jsonl_rows(replace(chunk, first_no=no, lines=block))
            return
        cols = {"no": pa.array(np.arange(no, no + lines, dtype=np.int64))}
        for role, name in (("uid", idf), ("title", tf), ("content", cf)):
            cols[role] = table.column(name).combine_chunks().cast(pa.string()) if name else pa.nulls(lines, pa.string())
        cols["pre"] = pa.array(np.zeros(lines, bool))
        yield pa.table(cols, schema=RAW_SCHEMA)
        return


def _first_non_object(block: bytes) -> int | None:
    """Index of the first line that does not start with "{" (a blank line, `null`, a number, an array), or None.

    Such lines go to the line reader: Arrow reads a top-level `null` as a row of nulls (json.loads: not an object),
    and when it is a block's first row Arrow crashes the whole process (SIGSEGV, pyarrow 26; apache/arrow#47409).
    One regex over the block, about what the blank-line check it replaces cost."""
    if not block.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r").startswith(b"{"):
        return 0
    found = _NOT_AN_OBJECT.search(block)
    return None if found is None else block.count(b"\n", 0, found.start()) + 1


def _count_lines(block: bytes) -> int:
    return block.count(b"\n") + (not block.endswith(b"\n"))


def _after_lines(block: bytes, n: int) -> int:
    """Offset just after the n-th newline of block (len(block) when it has fewer)."""
    pos = 0
    for _ in range(n):
        pos = block.find(b"\n", pos) + 1
        if pos == 0:
            return len(block)
    return pos


def _first_bad_utf8(block: bytes) -> int | None:
    """Offset of the first byte that is not valid UTF-8, or None (Arrow's validation, then Python's to locate)."""
    offsets = pa.py_buffer(np.array([0, len(block)], np.int32))
    try:
        pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(block)]).validate(full=True)
        return None
    except pa.ArrowInvalid:
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start
        return 0  # Arrow and Python disagree: let the line reader decide


def _jsonl_rows(chunk: Chunk) -> Iterator[tuple]:
    tf, cf, idf = chunk.fields
    try:
        text, check_bytes = chunk.lines.decode("utf-8"), False
    except UnicodeDecodeError:  # rare: find the bad lines one by one
        text, check_bytes = chunk.lines.decode("utf-8", "surrogateescape"), True
    for no, line in enumerate(text.split("\n"), chunk.first_no):
        if not line or line.isspace():
            continue
        if check_bytes and readers.BAD_BYTES_RE.search(line):
            yield no, None, None, None, "not UTF-8"
            continue
        try:
            obj = _parse_line(line.lstrip("\ufeff") if no == 1 else line, tf, cf)
        except (ValueError, RecursionError) as e:
            yield no, None, None, None, f"invalid JSON: {getattr(e, 'msg', 'nested too deeply')}"
            continue
        if isinstance(obj, dict):
            yield no, obj.get(idf) if idf else None, obj.get(tf), obj.get(cf), None
        else:
            yield no, None, None, None, "not a JSON object"


def _parse_line(line: str, title_field: str, content_field: str) -> Any:
    """json.loads, with a shortcut for LF-Amazon lines, which end with '"target_ind": [...], "target_rel": [...]}'.

    Those ~40 numbers are 80% of the parsing time and are never used, so when a line has that shape the object
    is parsed without them (a damaged label list then goes unnoticed; everything we keep is still checked).
    """
    cut = line.find(_LABELS)
    if cut > 0 and line.rstrip().endswith("]}"):
        try:
            obj, end = _scan_once(line[:cut] + "}", 0)
        except (StopIteration, ValueError):
            obj, end = None, 0
        if end == cut + 1 and isinstance(obj, dict) and title_field in obj and content_field in obj:
            return obj
    return json.loads(line)


def _as_text(value: Any) -> str | None:
    """A field as text: None -> "", numbers -> str; lists, objects, NaN and infinities -> None (malformed)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, float) and not math.isfinite(value):  # json.loads reads NaN: no product is titled "nan"
        return None
    return str(value) if isinstance(value, int | float) else None

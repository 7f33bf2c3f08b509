"""Catalog inputs: formats, fields, decompression, cut into chunks (blocks of JSON lines, batches of rows).

    sources = open_source(Path("trn.json.gz"), cfg)      # checked: exists, known format, fields resolved
    for chunk in chunks(sources, bar):                   # blocks of lines / batches of rows, in file order
        table, read, bad = parse.raw_records(chunk, strict)   # in a worker: the chunk's records (parse.py)

Formats: JSON lines (`.json`, `.jsonl`, `.ndjson`, each also `.gz`; LF-Amazon trn.json), a JSON array, CSV,
Parquet, and the Amazon-Titles zip. Everything is streamed; gzip is decompressed with ISA-L. A block of JSON
lines is parsed by Arrow's JSON reader (C++, ~3x faster than json.loads per line), except the lines it would
read differently from `json.loads` (bad JSON, values that are not strings, bad UTF-8, blank lines, a BOM past
line 1): those go through the per-line reader `_jsonl_rows`, which decides what is malformed. Tests check that
both give the same output. Arrow never sees a line that does not start with "{" (`_first_non_object`): a top-level
`null` crashes it. A line longer than data.max_line_bytes is one malformed record, skipped without being held whole.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from isal import igzip, isal_zlib  # gzip, decompressed ~2.5x faster than zlib (Intel ISA-L)

from prodesc.config import DataConfig
from prodesc.data.parallel import SharedSlots, take_shared
from prodesc.errors import ProdescError

KNOWN_FORMATS = ".json, .jsonl, .ndjson (each also .gz), .csv, .csv.gz, .parquet, .zip"
_AUTO_FIELDS = {
    "title": ("title", "instruction", "name"),
    "content": ("content", "output", "description"),
    "id": ("uid", "id", "asin"),
}
BLOCK_BYTES = 4 << 20  # JSON lines are shipped to workers as raw blocks of this size
_ROWS_PER_CHUNK = 20_000  # records per chunk for CSV, Parquet and JSON arrays
BAD_BYTES_RE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of undecodable bytes
RAW_SCHEMA = pa.schema(
    [("no", pa.int64()), ("uid", pa.string()), ("title", pa.string()), ("content", pa.string()), ("pre", pa.bool_())]
)  # pre: uid, title and content already cleaned (text with lone surrogates, which Arrow cannot hold)


@dataclass
class Source:
    """One stream of records: a file, or one member of a zip."""

    path: Path
    kind: str  # jsonl | array | csv | parquet
    member: str | None = None
    fields: tuple[str, str, str | None] = ("title", "content", None)
    max_line: int = 8 << 20  # data.max_line_bytes: longest line, JSON array element or CSV field read

    @property
    def label(self) -> str:  # how locations name it: "trn.json.gz:17"
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    @property
    def stem(self) -> str:  # prefix of generated ids
        name = Path(self.member or self.path.name).name
        return re.sub(r"\.(json|jsonl|ndjson|csv|parquet)(\.gz)?$", "", name, flags=re.IGNORECASE)


def open_source(path: Path, cfg: DataConfig) -> list[Source]:
    """Check that `path` exists and has a known format; resolve its fields from the header or first record."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ProdescError(f"input {path} {what}: pass a catalog file ({KNOWN_FORMATS})")
    name = path.name.lower()
    if name.endswith(".zip"):
        sources = [Source(path, "jsonl", m) for m in _zip_members(path)]
    elif name.endswith((".json", ".json.gz")):
        sources = [Source(path, _sniff_json(Source(path, "jsonl")))]
    elif name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
        sources = [Source(path, "jsonl")]
    elif name.endswith((".csv", ".csv.gz")):
        sources = [Source(path, "csv")]
    elif name.endswith(".parquet"):
        sources = [Source(path, "parquet")]
    else:
        raise ProdescError(f"input {path}: unknown format; known extensions: {KNOWN_FORMATS}")
    for src in sources:
        src.max_line = cfg.max_line_bytes
        names = _field_names(src)
        if not names:
            raise ProdescError(
                f"input {src.label}: found no record to take field names from (empty, or the first 1000 records "
                f"are malformed): check the file"
            )
        src.fields = _resolve_fields(src, names, cfg)
    return sources


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise ProdescError(f"input {path} is not a valid zip file: re-download it or unzip it yourself") from None
    members = [n for n in names if re.fullmatch(r"trn[^/]*\.json(\.gz)?", n.rsplit("/", 1)[-1])]
    if not members:
        raise ProdescError(
            f"input {path} has no trn*.json(.gz) member (it has {_preview(names)}): unzip it and pass the file"
        )
    return members


def _sniff_json(src: Source) -> str:
    """A .json file is a JSON array when it starts with "[", JSON lines otherwise (LF-Amazon trn.json)."""
    with _open_stream(src) as (stream, _):
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "array" if head.startswith(b"[") else "jsonl"


def _field_names(src: Source) -> list[str]:
    """Column names of a CSV/Parquet header, or the keys of the first JSON object (first 1000 records)."""
    if src.kind == "parquet":
        with _parquet_errors(src):
            return pq.ParquetFile(src.path).schema_arrow.names
    with _open_stream(src) as (stream, _):
        if src.kind == "csv":
            return next(csv.reader(_text(stream)), [])
        lines = _short_lines(stream, src.max_line)
        rows = _json_array_rows(_text(stream), src) if src.kind == "array" else enumerate(lines)
        for i, (_, item) in enumerate(rows):
            if i >= 1000:
                break
            try:
                obj = json.loads(item) if isinstance(item, bytes) else item
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def _resolve_fields(src: Source, names: list[str], cfg: DataConfig) -> tuple[str, str, str | None]:
    lower = {n.lower(): n for n in names}

    def pick(role: str, explicit: str | None) -> str | None:
        if explicit is None:
            return next((lower[a] for a in _AUTO_FIELDS[role] if a in lower), None)
        if explicit not in names:
            raise ProdescError(
                f"--{role}-field {explicit!r} is not a field of {src.label} (fields: {_preview(names)}): "
                f"pass one of them"
            )
        return explicit

    title, content = pick("title", cfg.title_field), pick("content", cfg.content_field)
    for role, value in (("title", title), ("content", content)):
        if value is None:
            raise ProdescError(
                f"no {role} field in {src.label} (looked for {', '.join(_AUTO_FIELDS[role])}; fields: "
                f"{_preview(names)}): pass --{role}-field"
            )
    return title, content, pick("id", cfg.id_field)


@contextmanager
def _open_stream(src: Source) -> Iterator[tuple[IO[bytes], Callable[[], int]]]:
    """Decompressed bytes of a source, and a function giving how far into the file on disk we are.

    A damaged archive (truncated download, not really gzip, bad CRC) is a user error, wherever it shows."""
    try:
        with open(src.path, "rb") as raw:
            if src.member is not None:
                with zipfile.ZipFile(raw) as zf, zf.open(src.member) as member:
                    if src.member.endswith(".gz"):
                        with igzip.IGzipFile(fileobj=member) as stream:
                            yield stream, raw.tell
                    else:
                        yield member, raw.tell
            elif src.path.name.lower().endswith(".gz"):
                with igzip.IGzipFile(fileobj=raw) as stream:
                    yield stream, raw.tell
            else:
                yield raw, raw.tell
    except (EOFError, igzip.BadGzipFile, isal_zlib.error, zlib.error, zipfile.BadZipFile) as e:
        raise ProdescError(
            f"input {src.label} is damaged ({type(e).__name__}: {e}): re-download it, or check it with gunzip -t / "
            f"unzip -t"
        ) from None


def _text(stream: IO[bytes]) -> io.TextIOWrapper:
    # Undecodable bytes become lone surrogates, so the one bad record is counted, not the whole file lost.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")


@dataclass
class Chunk:
    """A unit of work for a worker: a block of JSON lines, or rows (no, uid, title, content, error)."""

    label: str
    stem: str
    fields: tuple[str, str, str | None]
    first_no: int
    lines: bytes = b""
    n_lines: int = 0  # of `lines`, when known
    rows: list[tuple] = field(default_factory=list)
    shared: tuple[int, int] | None = None  # (slot, length) of `lines` in parallel.SharedSlots, lines then empty


def to_shared(chunk: Chunk, slots: SharedSlots | None, i: int) -> Chunk:
    """Chunk number i with its lines moved into shared slots, so sending it to a worker pickles only numbers."""
    if slots is None or not chunk.lines or (slot := slots.put(i, chunk.lines)) is None:
        return chunk
    return replace(chunk, lines=b"", shared=(slot, len(chunk.lines)))


def from_shared(chunk: Chunk) -> Chunk:
    """In the worker: the chunk with its lines back from the shared slot."""
    return chunk if chunk.shared is None else replace(chunk, lines=take_shared(*chunk.shared), shared=None)


def chunks(sources: list[Source], bar: Any) -> Iterator[Chunk]:
    """Cut every source into chunks; advance the progress bar by bytes of the files on disk."""
    done = 0
    for src in sources:
        with _open_stream(src) as (stream, tell):
            new = partial(Chunk, src.label, src.stem, src.fields)
            text = _text(stream) if src.kind in ("array", "csv") else None
            if src.kind == "jsonl":
                chunks = _line_blocks(stream, new, src.max_line)
            else:
                rows = _record_rows(src, text)
                chunks = (new(batch[0][0], rows=batch) for batch in _batched(rows, _ROWS_PER_CHUNK))
            for chunk in chunks:
                bar.update(done + tell() - bar.n)
                yield chunk
            if text is not None:
                text.detach()  # or its garbage collection closes the stream under us
        done += src.path.stat().st_size
        bar.update(done - bar.n)


def _line_blocks(stream: IO[bytes], new: Callable[..., Chunk], max_line: int) -> Iterator[Chunk]:
    """Blocks of whole lines; a worker splits them, so the reading process only moves bytes.

    A line longer than `max_line` bytes becomes a one-row chunk saying so (a malformed record), and is read past
    in pieces: memory stays within max_line + one read, however long the line (a line bomb in a small .gz)."""
    read = min(BLOCK_BYTES, max_line)  # then only a block's first line (carried over in `rest`) can be too long
    rest, line_no = b"", 1
    while block := stream.read(read):
        block = rest + block
        end = block.find(b"\n")
        if (end if end >= 0 else len(block)) > max_line:
            yield new(line_no, rows=[(line_no, None, None, None, f"line longer than data.max_line_bytes={max_line}")])
            block, line_no = block[end + 1 :] if end >= 0 else _past_line(stream, read), line_no + 1
        cut = block.rfind(b"\n") + 1
        if cut == 0:  # the start of a line longer than a block: keep reading
            rest = block
            continue
        rest = block[cut:]
        n = int(np.count_nonzero(np.frombuffer(block, np.uint8, cut) == 10))  # 2x bytes.count
        yield new(line_no, lines=block[:cut], n_lines=n)
        line_no += n
    if rest:
        yield new(line_no, lines=rest)


def _past_line(stream: IO[bytes], read: int) -> bytes:
    """Read past the end of the current line, a piece at a time; return what follows its newline."""
    while piece := stream.read(read):
        end = piece.find(b"\n")
        if end >= 0:
            return piece[end + 1 :]
    return b""


def _short_lines(stream: IO[bytes], max_line: int) -> Iterator[bytes]:
    """Lines of a stream; one longer than `max_line` bytes comes as b"" (read past, never held whole)."""
    for chunk in _line_blocks(stream, partial(Chunk, "", "", ("", "", None)), max_line):
        yield from chunk.lines.split(b"\n") if chunk.lines else [b""]


def _record_rows(src: Source, text: IO[str] | None) -> Iterator[tuple]:
    """(no, uid, title, content, error) of a JSON array, CSV or Parquet source."""
    tf, cf, idf = src.fields
    if src.kind == "parquet" or text is None:
        yield from _parquet_rows(src)
        return
    if src.kind == "array":
        items = _json_array_rows(text, src)
    else:
        csv.field_size_limit(src.max_line)  # descriptions can exceed the 128 KiB default; a longer one is malformed
        items = _csv_items(text)
    for no, obj in items:
        if isinstance(obj, str):  # an error message
            yield no, None, None, None, obj
        elif not isinstance(obj, dict):
            yield no, None, None, None, "not a JSON object"
        else:
            values = (obj.get(idf) if idf else None, obj.get(tf), obj.get(cf))
            bad = any(isinstance(v, str) and BAD_BYTES_RE.search(v) for v in values)
            yield (no, *values, "not UTF-8" if bad else None)


def _csv_items(text: IO[str]) -> Iterator[tuple[int, dict | str]]:
    reader = csv.DictReader(text)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield reader.line_num, f"bad CSV: {e}"
            continue
        yield reader.line_num, row


def _json_array_rows(text: IO[str], src: Source) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array, decoded one at a time from a sliding buffer (never the whole file)."""
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    buf = text.read(1 << 20)
    eof, lines_before, index = not buf, 0, 0
    pos = len(buf) - len(buf.lstrip(" \t\r\n\ufeff"))
    if not buf.startswith("[", pos):
        raise ProdescError(f"{src.label} is neither JSON lines nor a JSON array: fix the file")
    pos += 1
    while True:
        if len(buf) - pos < (1 << 16) and not eof:  # keep 64 KiB ahead so most elements decode at once
            lines_before += buf.count("\n", 0, pos)
            more = text.read(1 << 20)
            buf, pos, eof = buf[pos:] + more, 0, not more
        pos = skip.match(buf, pos).end()
        if buf.startswith("]", pos):
            return
        if pos >= len(buf) and eof:
            raise ProdescError(
                f"{src.label}: the JSON array ends without its closing ']' (a truncated file?): re-download or fix it"
            )
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            too_long = len(buf) - pos > src.max_line
            if not (eof or too_long or isinstance(e, RecursionError)):
                more = text.read(max(1 << 20, len(buf)))  # an element longer than the buffer: read more
                buf, eof = buf + more, not more
                continue
            line = lines_before + buf.count("\n", 0, getattr(e, "pos", pos)) + 1
            why = getattr(e, "msg", "nested too deeply")
            if too_long:
                why += f", or an element longer than data.max_line_bytes={src.max_line}"
            raise ProdescError(
                f"{src.label}:{line}: invalid JSON ({why}): fix the file, or convert it to JSON lines "
                f"(bad lines are then skipped and counted)"
            ) from None
        index += 1
        yield index, obj
        pos = end


@contextmanager
def _parquet_errors(src: Source) -> Iterator[None]:
    """A file that is not Parquet, or a damaged one (wherever Arrow notices), is a user error naming it."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ProdescError(
            f"input {src.label} is not a readable Parquet file ({str(e).splitlines()[0]}): check the file, or "
            f"rename it after its real format"
        ) from None


def _parquet_rows(src: Source) -> Iterator[tuple]:
    with _parquet_errors(src):
        yield from _parquet_batches(src)


def _parquet_batches(src: Source) -> Iterator[tuple]:
    tf, cf, idf = src.fields
    columns = [c for c in (tf, cf, idf) if c]
    no = 0
    for batch in pq.ParquetFile(src.path).iter_batches(batch_size=_ROWS_PER_CHUNK, columns=columns):
        values = []
        for name in (tf, cf, idf):
            if name is None:
                values.append([None] * batch.num_rows)
                continue
            col = batch.column(name)
            try:  # ids may be int64 columns; text must come out as str, never as a parsed number
                values.append(col.cast(pa.string()).to_pylist())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ProdescError(
                    f"column {name!r} of {src.label} is {col.type}, not text: pick another --{_role(src, name)}-field"
                ) from None
        for title, content, uid in zip(*values, strict=True):
            no += 1
            yield no, uid, title, content, None


def _role(src: Source, name: str) -> str:
    return ("title", "content", "id")[src.fields.index(name)]


def _batched(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _preview(names: list[str], n: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return (", ".join(names[:n]) + more) if names else "none"

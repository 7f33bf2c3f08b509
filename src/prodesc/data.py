"""Read catalogs, clean them, drop bad and duplicate records, and split them leak-free by title family.

    prodesc data synth --n 20000 --out demo/catalog.json.gz
    prodesc data prepare demo/catalog.json.gz --out demo/data
    prodesc data prepare Amazon-Titles-1.3MM.zip --out data/amazon --min-content-chars 100

Inputs: LF-Amazon `trn.json`/`tst.json` (JSON lines), the same `.gz`, the original `Amazon-Titles-1.3MM.zip`
(every member named `trn*.json.gz` or `trn*.json`, i.e. `LF-Amazon-1.3M/trn.json.gz`; pass `tst.json.gz`
yourself to use it), and any catalog as a JSON array, JSON lines, CSV (`.csv`, `.csv.gz`) or Parquet. Fields
are auto-detected (title <- title|instruction|name, content <- content|output|description, id <- uid|id|asin,
else `<file stem>-<line or row number, 9 digits>`) or named with --title-field/--content-field/--id-field.
Ids stay strings (`0000031909`). Everything is streamed: memory is bounded by a few int arrays per record.

Per record: clean title and content (`clean.clean_text`), then drop and count, in this order: `malformed`
(bad JSON, not UTF-8, not an object), `empty_title`, `empty_content`, `short_content` (< min_content_chars),
`duplicate_record` (same cleaned title and content as an earlier record), `duplicate_title` (same title,
case/whitespace-insensitive, other content: the first one is kept).

Split: records are grouped into title families so product variants never straddle train/val/test. Two records
are one family when their titles have the same family key (`clean.family_key`: lowercase, no accents, no
(parentheticals)/[brackets], no "Vol. 2"/"Part 3"/"Book 4"/"#5"/"2nd edition", no "12 oz"/"3-pack", no colour
or size words, no punctuation or trailing numbers), or when their cleaned contents are identical (series
blurbs), transitively (union-find). A family is named by the key of its first record, and goes to test when
blake2b(split_salt, family) / 2**64 < test_fraction, to val when below test_fraction + val_fraction, else train.

Two passes: (1) stream the inputs in chunks (2 worker processes on large inputs), clean, write kept records to
Arrow files in a temporary directory and keep only hashes; dedupe and union-find on the hashes; (2) stream the
Arrow files into DIR/{train,val,test}.parquet (uid, title, content, family). Also DIR/stats.json and
DIR/config.resolved.yaml. Same inputs and options give byte-identical files. DIR appears only when complete.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import yaml
from isal import igzip, isal_zlib  # gzip, decompressed ~2.5x faster than zlib (Intel ISA-L)

from prodesc import columns
from prodesc.clean import clean_text, lossy_ascii_lower
from prodesc.config import DataConfig
from prodesc.errors import ProdescError
from prodesc.synth import synth

__all__ = ["prepare", "synth", "DROP_REASONS", "SPLITS"]

KNOWN_FORMATS = ".json, .jsonl, .ndjson (each also .gz), .csv, .csv.gz, .parquet, .zip"
DROP_REASONS = ("malformed", "empty_title", "empty_content", "short_content", "duplicate_record", "duplicate_title")
SPLITS = ("train", "val", "test")
_AUTO_FIELDS = {
    "title": ("title", "instruction", "name"),
    "content": ("content", "output", "description"),
    "id": ("uid", "id", "asin"),
}
_SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string()), ("family", pa.string())])
_BLOCK_BYTES = 4 << 20  # JSON lines are shipped to workers as raw blocks of this size
_ROWS_PER_CHUNK = 20_000  # records per chunk for CSV, Parquet and JSON arrays
_PARALLEL_MIN_BYTES = 32 << 20  # below this, worker start-up costs more than it saves
_ROW_GROUP = 100_000  # fixed row groups: the output does not depend on chunking or worker count
_MAX_LOCATIONS = 10
_HASH_COLUMNS = ["thash", "chash", "tkey", "fkey", "tlen", "clen"]  # what pass 1 keeps in memory per record
_BAD_BYTES_RE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of undecodable bytes
_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # also lone surrogates from JSON escapes ("\\ud800")
_LABELS = ', "target_ind": ['
_RAW_SCHEMA = pa.schema(
    [("no", pa.int64()), ("uid", pa.string()), ("title", pa.string()), ("content", pa.string()), ("pre", pa.bool_())]
)  # pre: uid, title and content already cleaned (text with lone surrogates, which Arrow cannot hold)
_ARROW_JSON = True  # parse JSON lines with Arrow where that is exact (tests turn it off to compare)
_ARROW_ERROR_ROW = re.compile(r"in row (-?\d+)")
_MAX_ARROW_ERRORS = 16  # per block; past that the line reader takes the rest (e.g. when every id is a number)
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # the C scanner behind json.loads, without its checks


def prepare(inputs: list[Path], out: Path, cfg: DataConfig, overwrite: bool = False) -> dict[str, Any]:
    """Clean `inputs` and write `out`/{train,val,test}.parquet, stats.json, config.resolved.yaml; return stats."""
    started = time.perf_counter()
    out = Path(out)
    sources = [s for p in inputs for s in _open_source(Path(p), cfg)]  # every input checked before any work
    if out.exists() and not overwrite:
        raise ProdescError(f"output {out} already exists: pass --overwrite to replace it, or pick another --out")
    if cfg.val_fraction + cfg.test_fraction > 1:
        raise ProdescError("data.val_fraction + data.test_fraction > 1: lower them so train keeps a share")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with terminate_as_interrupt():
            stats = _prepare_in(tmp, sources, cfg)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename
    _print_summary(stats, out, time.perf_counter() - started)
    return stats


def _prepare_in(tmp: Path, sources: list[_Source], cfg: DataConfig) -> dict[str, Any]:
    """Both passes, writing every output file into `tmp`."""
    scan = _scan(sources, cfg, tmp / "work")
    keep = _dedupe(scan)
    if not keep.any():
        raise ProdescError(
            f"no records left in {', '.join(s.label for s in sources)} ({scan.read} read, dropped "
            f"{_fmt_counts(scan.counts)}): check --title-field/--content-field or lower --min-content-chars"
        )
    rep = _families(scan.fkey[keep], scan.chash[keep])
    splits = _write_splits(scan, keep, rep, cfg, tmp)
    shutil.rmtree(tmp / "work")
    stats = _stats(sources, scan, keep, splits, rep, cfg)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    dumped = yaml.safe_dump({"data": cfg.model_dump(mode="json")}, sort_keys=False)
    (tmp / "config.resolved.yaml").write_text(dumped, encoding="utf-8")
    return stats


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, docker stop) unwinds like Ctrl-C, so the temporary directory is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class _Source:
    """One stream of records: a file, or one member of a zip."""

    path: Path
    kind: str  # jsonl | array | csv | parquet
    member: str | None = None
    fields: tuple[str, str, str | None] = ("title", "content", None)

    @property
    def label(self) -> str:  # how locations name it: "trn.json.gz:17"
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    @property
    def stem(self) -> str:  # prefix of generated ids
        name = Path(self.member or self.path.name).name
        return re.sub(r"\.(json|jsonl|ndjson|csv|parquet)(\.gz)?$", "", name, flags=re.IGNORECASE)


def _open_source(path: Path, cfg: DataConfig) -> list[_Source]:
    """Check that `path` exists and has a known format; resolve its fields from the header or first record."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ProdescError(f"input {path} {what}: pass a catalog file ({KNOWN_FORMATS})")
    name = path.name.lower()
    if name.endswith(".zip"):
        sources = [_Source(path, "jsonl", m) for m in _zip_members(path)]
    elif name.endswith((".json", ".json.gz")):
        sources = [_Source(path, _sniff_json(_Source(path, "jsonl")))]
    elif name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
        sources = [_Source(path, "jsonl")]
    elif name.endswith((".csv", ".csv.gz")):
        sources = [_Source(path, "csv")]
    elif name.endswith(".parquet"):
        sources = [_Source(path, "parquet")]
    else:
        raise ProdescError(f"input {path}: unknown format; known extensions: {KNOWN_FORMATS}")
    for src in sources:
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


def _sniff_json(src: _Source) -> str:
    """A .json file is a JSON array when it starts with "[", JSON lines otherwise (LF-Amazon trn.json)."""
    with _open_stream(src) as (stream, _):
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "array" if head.startswith(b"[") else "jsonl"


def _field_names(src: _Source) -> list[str]:
    """Column names of a CSV/Parquet header, or the keys of the first JSON object (first 1000 records)."""
    if src.kind == "parquet":
        return pq.ParquetFile(src.path).schema_arrow.names
    with _open_stream(src) as (stream, _):
        if src.kind == "csv":
            return next(csv.reader(_text(stream)), [])
        rows = _json_array_rows(_text(stream), src) if src.kind == "array" else enumerate(stream)
        for i, (_, item) in enumerate(rows):
            if i >= 1000:
                break
            try:
                obj = json.loads(item) if isinstance(item, bytes) else item
            except ValueError:
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def _resolve_fields(src: _Source, names: list[str], cfg: DataConfig) -> tuple[str, str, str | None]:
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
def _open_stream(src: _Source) -> Iterator[tuple[IO[bytes], Callable[[], int]]]:
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


# ------------------------------------------------------------------------------------------ pass 1: scan


@dataclass
class _Chunk:
    """A unit of work for a worker: a block of JSON lines, or rows (no, uid, title, content, error)."""

    label: str
    stem: str
    fields: tuple[str, str, str | None]
    first_no: int
    lines: bytes = b""
    n_lines: int = 0  # of `lines`, when known
    rows: list[tuple] = field(default_factory=list)


@dataclass
class _Scan:
    """Pass-1 result: counts, and per valid record (one that passed the empty/short checks) hashes and lengths."""

    read: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed_at: list[str] = field(default_factory=list)
    parts: list[tuple[Path, int]] = field(default_factory=list)
    thash: Any = None  # uint64 per valid record: exact cleaned title
    chash: Any = None  # uint64: exact cleaned content
    tkey: Any = None  # uint64: title_key (case/space-insensitive title)
    fkey: Any = None  # uint64: blake2b(split_salt, family_key); of the family's first record, it picks the split
    tlen: Any = None  # int32: title chars
    clen: Any = None  # int32: content chars


def _scan(sources: list[_Source], cfg: DataConfig, work: Path) -> _Scan:
    """Stream every source in chunks through `_process_chunk` (in worker processes when large)."""
    from tqdm import tqdm

    work.mkdir()
    total = sum(s.path.stat().st_size for s in sources)
    opts = (cfg.min_content_chars, cfg.lossy_ascii_lower, cfg.strict, cfg.split_salt.encode() + b"\0")
    scan, workers = _Scan(), _worker_count(total)
    with (
        worker_pool(workers) as pool,
        tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None, file=sys.stderr) as bar,
    ):
        tasks = ((c, opts, work / f"part-{i:06d}.arrow") for i, c in enumerate(_chunks(sources, bar)))
        for res in ordered_map(pool, _process_chunk, tasks, 2 * workers):
            scan.read += res["read"]
            for k, v in res["counts"].items():
                scan.counts[k] += v
            scan.malformed_at += res["malformed_at"][: _MAX_LOCATIONS - len(scan.malformed_at)]
            if res["n"]:
                scan.parts.append((res["part"], res["n"]))
    tables = [_read_part(part, _HASH_COLUMNS) for part, _ in scan.parts]
    for name, dtype in zip(_HASH_COLUMNS, (np.uint64,) * 4 + (np.int32,) * 2, strict=True):
        setattr(scan, name, np.concatenate([t.column(name).to_numpy() for t in tables] or [np.zeros(0, dtype)]))
    return scan


def _read_part(part: Path, columns: list[str]) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(part))).read_all().select(columns)


def _chunks(sources: list[_Source], bar: Any) -> Iterator[_Chunk]:
    """Cut every source into chunks; advance the progress bar by bytes of the files on disk."""
    done = 0
    for src in sources:
        with _open_stream(src) as (stream, tell):
            new = partial(_Chunk, src.label, src.stem, src.fields)
            text = _text(stream) if src.kind in ("array", "csv") else None
            if src.kind == "jsonl":
                chunks = _line_blocks(stream, new)
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


def _line_blocks(stream: IO[bytes], new: Callable[..., _Chunk]) -> Iterator[_Chunk]:
    """Blocks of whole lines; a worker splits them, so the reading process only moves bytes."""
    rest, line_no = b"", 1
    while block := stream.read(_BLOCK_BYTES):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a block: keep reading
            rest = block
            continue
        rest = block[cut:]
        n = block.count(b"\n", 0, cut)
        yield new(line_no, lines=block[:cut], n_lines=n)
        line_no += n
    if rest:
        yield new(line_no, lines=rest)


def _record_rows(src: _Source, text: IO[str] | None) -> Iterator[tuple]:
    """(no, uid, title, content, error) of a JSON array, CSV or Parquet source."""
    tf, cf, idf = src.fields
    if src.kind == "parquet" or text is None:
        yield from _parquet_rows(src)
        return
    if src.kind == "array":
        items = _json_array_rows(text, src)
    else:
        csv.field_size_limit(1 << 30)  # product descriptions can exceed the 128 KiB default
        items = _csv_items(text)
    for no, obj in items:
        if isinstance(obj, str):  # an error message
            yield no, None, None, None, obj
        elif not isinstance(obj, dict):
            yield no, None, None, None, "not a JSON object"
        else:
            values = (obj.get(idf) if idf else None, obj.get(tf), obj.get(cf))
            bad = any(isinstance(v, str) and _BAD_BYTES_RE.search(v) for v in values)
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


def _json_array_rows(text: IO[str], src: _Source) -> Iterator[tuple[int, Any]]:
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
        if buf.startswith("]", pos) or (pos >= len(buf) and eof):
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if eof:
                line = lines_before + buf.count("\n", 0, e.pos) + 1
                raise ProdescError(
                    f"{src.label}:{line}: invalid JSON ({e.msg}): fix the file, or convert it to JSON lines "
                    f"(bad lines are then skipped and counted)"
                ) from None
            more = text.read(max(1 << 20, len(buf)))  # an element longer than the buffer: read more
            buf, eof = buf + more, not more
            continue
        index += 1
        yield index, obj
        pos = end


def _parquet_rows(src: _Source) -> Iterator[tuple]:
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


def _role(src: _Source, name: str) -> str:
    return ("title", "content", "id")[src.fields.index(name)]


def _process_chunk(task: tuple[_Chunk, tuple[int, bool, bool, bytes], Path]) -> dict[str, Any]:
    """Worker: clean one chunk, write its valid records to an Arrow file, return counts (hashes stay in the file)."""
    chunk, (min_chars, lossy, strict, salt), part = task
    raw, read, bad = _raw_records(chunk, strict)
    raw = {name: raw.column(name).combine_chunks() for name in raw.column_names}
    counts = dict.fromkeys(DROP_REASONS[:4], 0)
    counts["malformed"] = len(bad)
    pre = raw["pre"]
    title = pc.if_else(pre, raw["title"], columns.clean_column(raw["title"]))
    content = pc.if_else(pre, raw["content"], columns.clean_column(raw["content"]))
    if lossy:
        title, content = (
            pa.array([lossy_ascii_lower(v) for v in col.to_pylist()], pa.string()) for col in (title, content)
        )
    tlen, clen = pc.utf8_length(title).to_numpy(), pc.utf8_length(content).to_numpy()
    empty_title = tlen == 0
    empty_content = ~empty_title & (clen == 0)
    short = ~empty_title & ~empty_content & (clen < min_chars)
    counts["empty_title"], counts["empty_content"] = int(empty_title.sum()), int(empty_content.sum())
    counts["short_content"] = int(short.sum())
    valid = ~(empty_title | empty_content | short)
    n = int(valid.sum())
    if n:  # hashes and lengths travel in the part file too: results sent back must stay small
        mask = pa.array(valid)
        title, content = title.filter(mask), content.filter(mask)
        fkeys = columns.family_keys(title)
        uid = raw["uid"].filter(mask)
        uids = pc.if_else(pre.filter(mask), pc.fill_null(uid, ""), columns.strip_ids(uid))
        no = raw["no"].filter(mask)
        missing = pc.equal(pc.utf8_length(uids), 0)
        if pc.any(missing).as_py():
            made = [f"{chunk.stem}-{i:09d}" for i in no.filter(missing).to_pylist()]
            uids = pc.replace_with_mask(uids, missing, pa.array(made, pa.string()))
        table = pa.table(
            {
                "uid": uids,
                "title": title,
                "content": content,
                "fkey_text": fkeys,
                "thash": columns.hash64(title),
                "chash": columns.hash64(content),
                "tkey": columns.hash64(columns.title_keys(title)),  # = title_key(t): t is collapsed
                "fkey": columns.salted_blake2b64(fkeys, salt),  # salted: it also picks the split
                "tlen": tlen[valid].astype(np.int32),
                "clen": clen[valid].astype(np.int32),
            }
        )
        with pa.OSFile(str(part), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
    return {"read": read, "counts": counts, "malformed_at": bad[:_MAX_LOCATIONS], "part": part, "n": n}


def _raw_records(chunk: _Chunk, strict: bool) -> tuple[pa.Table, int, list[str]]:
    """The chunk's well-formed records as a table (no, uid, title, content; text or null), records read, and
    the locations of malformed ones."""
    pieces, read, bad = [], 0, []
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
    return pa.concat_tables(pieces) if pieces else _RAW_SCHEMA.empty_table(), read, bad


def _rows_table(rows: list[tuple]) -> pa.Table:
    """(no, uid, title, content, False) rows as a raw table. A row with a lone surrogate ("\\ud800" in JSON) cannot be
    UTF-8: it is cleaned here, in Python, which drops the surrogate, and marked `pre`."""
    if not rows:
        return _RAW_SCHEMA.empty_table()
    try:
        cols = [pa.array(c, t) for c, t in zip(zip(*rows, strict=True), _RAW_SCHEMA.types, strict=True)]
    except UnicodeEncodeError:
        rows = [_pre_clean(r) if not all(_utf8able(v) for v in r[1:4]) else r for r in rows]
        cols = [pa.array(c, t) for c, t in zip(zip(*rows, strict=True), _RAW_SCHEMA.types, strict=True)]
    return pa.table(cols, schema=_RAW_SCHEMA)


def _utf8able(value: str | None) -> bool:
    return value is None or value.isascii() or not _SURROGATE_RE.search(value)


def _pre_clean(row: tuple) -> tuple:
    no, uid, title, content, _ = row
    uid = uid or ""
    return (no, uid.strip() if uid.isascii() else clean_text(uid), clean_text(title), clean_text(content), True)


def _jsonl_pieces(chunk: _Chunk) -> Iterator[pa.Table | Iterator[tuple]]:
    """A block of JSON lines as tables parsed by Arrow's JSON reader, and, for the lines Arrow would not read
    exactly like `json.loads` (bad JSON, a value that is not a string, bad UTF-8, a blank line, a BOM not on
    line 1), row iterators of the per-line reader `_jsonl_rows`. Pieces come in line order."""
    tf, cf, idf = chunk.fields
    names = [n for n in (idf, tf, cf) if n]
    if not _ARROW_JSON or len(set(names)) < len(names):
        yield _jsonl_rows(chunk)
        return
    schema = pa.schema([(n, pa.string()) for n in names])
    block, no, errors = chunk.lines, chunk.first_no, 0
    while block:
        lines = chunk.n_lines if block is chunk.lines and chunk.n_lines else _count_lines(block)
        table, bad = None, None  # bad: index of the first line that needs the line reader
        if block.startswith(b"\xef\xbb\xbf") and no != 1:  # json.loads refuses a BOM: not a record
            bad = 0
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
                yield from _jsonl_pieces(replace(chunk, first_no=no, lines=block[:cut], n_lines=0))
            yield _jsonl_rows(replace(chunk, first_no=no + bad, lines=block[cut:end]))
            block, no = block[end:], no + bad + 1
            continue
        if table.num_rows != lines or _BLANK_LINE.search(block) or block[: block.find(b"\n") + 1].isspace():
            yield _jsonl_rows(replace(chunk, first_no=no, lines=block))  # rows and lines do not pair up
            return
        cols = {"no": pa.array(np.arange(no, no + lines, dtype=np.int64))}
        for role, name in (("uid", idf), ("title", tf), ("content", cf)):
            cols[role] = table.column(name).combine_chunks() if name else pa.nulls(lines, pa.string())
        cols["pre"] = pa.array(np.zeros(lines, bool))
        yield pa.table(cols, schema=_RAW_SCHEMA)
        return


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


def _jsonl_rows(chunk: _Chunk) -> Iterator[tuple]:
    tf, cf, idf = chunk.fields
    try:
        text, check_bytes = chunk.lines.decode("utf-8"), False
    except UnicodeDecodeError:  # rare: find the bad lines one by one
        text, check_bytes = chunk.lines.decode("utf-8", "surrogateescape"), True
    for no, line in enumerate(text.split("\n"), chunk.first_no):
        if not line or line.isspace():
            continue
        if check_bytes and _BAD_BYTES_RE.search(line):
            yield no, None, None, None, "not UTF-8"
            continue
        try:
            obj = _parse_line(line.lstrip("\ufeff") if no == 1 else line, tf, cf)
        except ValueError as e:
            yield no, None, None, None, f"invalid JSON: {getattr(e, 'msg', e)}"
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


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes (None for 1), started now: before the caller opens files or starts threads.

    fork on Linux: spawn would re-run the caller's __main__ (scripts without an `if __name__ == "__main__"`
    guard break). Workers ignore Ctrl-C: the parent stops them, after their current task. Keep task results
    small (a few KiB pickled): a worker killed while sending a large one leaves half a message in the pipe,
    and concurrent.futures then waits for the rest forever.
    """
    if workers <= 1:
        yield None
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_worker_init)
    try:
        pool.submit(int).result()
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits terminate_as_interrupt's handler


def ordered_map(pool: ProcessPoolExecutor | None, fn: Callable, tasks: Iterator, in_flight: int) -> Iterator:
    """fn over tasks, results in task order; at most `in_flight` tasks queued, so memory stays bounded."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _worker_count(total_bytes: int) -> int:
    if total_bytes < _PARALLEL_MIN_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 4))


# ------------------------------------------------------------------------ dedupe, families, pass 2: write


def _dedupe(scan: _Scan) -> np.ndarray:
    """Mask of kept valid records; counts duplicate_record and duplicate_title into scan.counts."""
    n = len(scan.thash)
    with np.errstate(over="ignore"):
        record = scan.thash * np.uint64(0x9E3779B97F4A7C15) ^ scan.chash  # (title, content) in one uint64
    first_record = np.zeros(n, bool)
    first_record[np.unique(record, return_index=True)[1]] = True
    # The first record with a title key is never an exact duplicate of an earlier one, so it is always kept.
    keep = np.zeros(n, bool)
    keep[np.unique(scan.tkey, return_index=True)[1]] = True
    keep &= first_record
    scan.counts["duplicate_record"] = int((~first_record).sum())
    scan.counts["duplicate_title"] = int((first_record & ~keep).sum())
    return keep


def _families(fkey: np.ndarray, chash: np.ndarray) -> np.ndarray:
    """Per kept record, the index of the first record of its family (same family key or same content)."""
    _, key_first, key_of = np.unique(fkey, return_index=True, return_inverse=True)
    _, content_of, content_count = np.unique(chash, return_inverse=True, return_counts=True)
    # Only contents shared by several records can join keys: union-find over those few edges.
    shared = np.flatnonzero(content_count[content_of] > 1)
    shared = shared[np.argsort(content_of[shared], kind="stable")]
    a, b = shared[:-1], shared[1:]
    linked = (content_of[a] == content_of[b]) & (key_of[a] != key_of[b])
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    first = key_first.tolist()
    for u, v in zip(key_of[a][linked].tolist(), key_of[b][linked].tolist(), strict=True):
        ru, rv = find(u), find(v)
        if ru != rv:  # the root is the key seen first, so it names the family
            ru, rv = (ru, rv) if first[ru] < first[rv] else (rv, ru)
            parent[rv] = ru
    root = np.arange(len(key_first))
    for x in parent:
        root[x] = find(x)
    return key_first[root[key_of]]


def _write_splits(scan: _Scan, keep: np.ndarray, rep: np.ndarray, cfg: DataConfig, tmp: Path) -> dict:
    """Pass 2: stream the Arrow parts into train/val/test.parquet; return records and families per split."""
    kept_key = scan.fkey[keep]
    u = (kept_key[rep] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the family's hash, uniform in [0, 1)
    bounds = (cfg.test_fraction, cfg.test_fraction + cfg.val_fraction)
    which = np.where(u < bounds[0], 2, np.where(u < bounds[1], 1, 0)).astype(np.int8)  # index into SPLITS
    own = kept_key[rep] == kept_key  # family named by the record's own key (else by an earlier record's)
    needed = np.zeros(len(rep), bool)
    needed[rep[~own]] = True
    names: dict[int, str] = {}  # keys of first records that name other records' family too
    first = rep == np.arange(len(rep))
    counts = {
        s: {"records": int((which == i).sum()), "families": int((which[first] == i).sum())}
        for i, s in enumerate(SPLITS)
    }
    writers = {s: _SplitWriter(tmp / f"{s}.parquet") for s in SPLITS}
    k = offset = 0
    try:
        for part, n in scan.parts:
            table = _read_part(part, ["uid", "title", "content", "fkey_text"]).filter(
                pa.array(keep[offset : offset + n])
            )
            offset, span = offset + n, slice(k, k + len(table))
            family = table.column("fkey_text")
            for i in np.flatnonzero(needed[span]).tolist():
                names[k + i] = family[i].as_py()
            others = np.flatnonzero(~own[span])
            if len(others):
                values = family.to_pylist()
                for i, r in zip(others.tolist(), rep[span][others].tolist(), strict=True):
                    values[i] = names[r]
                family = pa.array(values, pa.string())
            table = table.drop_columns(["fkey_text"]).append_column("family", family)
            for i, s in enumerate(SPLITS):
                writers[s].add(table.filter(pa.array(which[span] == i)))
            k += len(table)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return counts


class _SplitWriter:
    """ParquetWriter with fixed options and fixed-size row groups, so equal inputs give equal bytes.

    Row groups are encoded and compressed by a thread of its own (Arrow releases the GIL), in order, while the
    caller filters the next parts."""

    def __init__(self, path: Path) -> None:
        self.writer = pq.ParquetWriter(path, _SCHEMA, compression="zstd", use_dictionary=False, write_statistics=False)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="parquet")
        self.pending: deque = deque()
        self.buffer: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.rows += len(table)
        if self.rows >= _ROW_GROUP:
            self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)
        while self.pending:
            self.pending.popleft().result()
        self.thread.shutdown()
        self.writer.close()

    def abort(self) -> None:
        self.thread.shutdown(cancel_futures=True)
        with suppress(Exception):  # keep the caller's error; the temporary directory goes anyway
            self.writer.close()

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.buffer) if self.buffer else _SCHEMA.empty_table()
        full = len(table) if final else len(table) - len(table) % _ROW_GROUP
        if full:
            while len(self.pending) > 1:  # at most two row groups in memory ahead of the disk
                self.pending.popleft().result()
            self.pending.append(self.thread.submit(self.writer.write_table, table.slice(0, full), _ROW_GROUP))
        self.buffer, self.rows = [table.slice(full)], len(table) - full


def _stats(
    sources: list[_Source], scan: _Scan, keep: np.ndarray, splits: dict, rep: np.ndarray, cfg: DataConfig
) -> dict:
    return {
        "records_read": scan.read,
        "kept": int(keep.sum()),
        "dropped": dict(scan.counts),
        "splits": splits,
        "families": {"total": int((rep == np.arange(len(rep))).sum()), "largest": int(np.bincount(rep).max())},
        "lengths": {"title_chars": _percentiles(scan.tlen[keep]), "content_chars": _percentiles(scan.clen[keep])},
        "malformed": {"count": scan.counts["malformed"], "first": scan.malformed_at},
        "inputs": [
            {
                "name": s.path.name + (f":{s.member}" if s.member else ""),
                "format": s.kind,
                "bytes": s.path.stat().st_size,
            }
            for s in sources
        ],
        "config": cfg.model_dump(mode="json"),
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp dir to out; an old out is moved aside first and deleted only after."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _print_summary(stats: dict, out: Path, seconds: float) -> None:
    splits = ", ".join(f"{s} {v['records']:,} ({v['families']:,} families)" for s, v in stats["splits"].items())
    print(f"prepared {out} in {seconds:.1f} s: kept {stats['kept']:,} of {stats['records_read']:,} records")
    print(f"  {splits}")
    print(f"  dropped: {_fmt_counts(stats['dropped'])}")
    if stats["malformed"]["count"]:
        print(f"  malformed records skipped, first at: {', '.join(stats['malformed']['first'][:3])}")


# -------------------------------------------------------------------------------------------------- helpers


def _as_text(value: Any) -> str | None:
    """A field as text: None -> "", numbers -> str; lists and objects -> None (malformed)."""
    if value is None or isinstance(value, str):
        return value or ""
    return str(value) if isinstance(value, int | float) else None


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {"p5": 0, "p50": 0, "p95": 0, "max": 0}
    p5, p50, p95 = np.percentile(values, [5, 50, 95], method="lower").tolist()
    return {"p5": int(p5), "p50": int(p50), "p95": int(p95), "max": int(values.max())}


def _batched(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v) or "nothing"


def _preview(names: list[str], n: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return (", ".join(names[:n]) + more) if names else "none"

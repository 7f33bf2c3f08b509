"""Pass 1 of `data prepare`: every chunk cleaned (in worker processes when the input is large), its valid
records written to an Arrow file, and what the later steps need kept in memory: per record a few hashes and
lengths (and, for the near-duplicate pass, a MinHash signature).

    scan = scan_sources(sources, cfg, work_dir)    # Scan: counts, parts, thash/chash/tkey/fkey/tlen/clen[, sig...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prodesc.config import DataConfig
from prodesc.data import columns, neardup, parse, readers
from prodesc.data.clean import lossy_ascii_lower
from prodesc.data.parallel import ordered_map, shared_slots, worker_count, worker_pool
from prodesc.data.readers import Chunk, Source

DROP_REASONS = ("malformed", "empty_title", "long_title", "empty_content", "short_content", "duplicate_record",
                "duplicate_title")
_MAX_LOCATIONS = 10
_HASH_COLUMNS = ["thash", "chash", "tkey", "fkey", "tlen", "clen"]  # what pass 1 keeps in memory per record




@dataclass
class Scan:
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
    sig: Any = None  # uint16 [n, neardup.NUM_PERM]: MinHash of the content (near_dup only)
    shingles: Any = None  # int32: word pairs in the content (near_dup only)
    nhash: Any = None  # uint64: the content's normalised word sequence, 0 without words (near_dup only)


def scan_sources(sources: list[Source], cfg: DataConfig, work: Path) -> Scan:
    """Stream every source in chunks through `_process_chunk` (in worker processes when large)."""
    from tqdm import tqdm

    work.mkdir()
    total = sum(s.path.stat().st_size for s in sources)
    opts = (cfg.min_content_chars, cfg.lossy_ascii_lower, cfg.strict, cfg.split_salt.encode() + b"\0", cfg.near_dup,
            cfg.max_title_chars)
    scan, workers = Scan(), worker_count(total, cfg.workers)
    in_flight = 2 * workers
    with (
        shared_slots(in_flight, 2 * readers.BLOCK_BYTES, workers) as slots,  # before the pool forks
        worker_pool(workers) as pool,
        tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None, file=sys.stderr) as bar,
    ):
        tasks = (
            (readers.to_shared(c, slots, i), opts, work / f"part-{i:06d}.arrow")
            for i, c in enumerate(readers.chunks(sources, bar))
        )
        for res in ordered_map(pool, _process_chunk, tasks, in_flight):
            scan.read += res["read"]
            for k, v in res["counts"].items():
                scan.counts[k] += v
            scan.malformed_at += res["malformed_at"][: _MAX_LOCATIONS - len(scan.malformed_at)]
            if res["n"]:
                scan.parts.append((res["part"], res["n"]))
    tables = [read_part(part, _HASH_COLUMNS) for part, _ in scan.parts]
    for name, dtype in zip(_HASH_COLUMNS, (np.uint64,) * 4 + (np.int32,) * 2, strict=True):
        setattr(scan, name, np.concatenate([t.column(name).to_numpy() for t in tables] or [np.zeros(0, dtype)]))
    if cfg.near_dup:
        del tables  # signatures are the big columns: read them one part at a time
        scan.sig, scan.shingles, scan.nhash = _read_signatures(scan.parts)
    return scan


def _read_signatures(parts: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sig = np.empty((sum(n for _, n in parts), neardup.NUM_PERM), np.uint16)
    shingles, nhash = np.empty(len(sig), np.int32), np.empty(len(sig), np.uint64)
    row = 0
    for part, n in parts:
        table = read_part(part, ["nd_sig", "nd_shingles", "nd_hash"])
        column = table.column("nd_sig").combine_chunks()
        width = neardup.NUM_PERM
        values = np.frombuffer(column.buffers()[1], np.uint16, n * width, column.offset * 2 * width)
        sig[row : row + n] = values.reshape(n, width)
        shingles[row : row + n] = table.column("nd_shingles").to_numpy()
        nhash[row : row + n] = table.column("nd_hash").to_numpy()
        row += n
    return sig, shingles, nhash


def read_part(part: Path, columns: list[str]) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(part))).read_all().select(columns)


def _process_chunk(task: tuple[Chunk, tuple[int, bool, bool, bytes, bool, int], Path]) -> dict[str, Any]:
    """Worker: clean one chunk, write its valid records to an Arrow file, return counts (hashes stay in the file)."""
    chunk, (min_chars, lossy, strict, salt, near_dup, max_title), part = task
    raw, read, bad = parse.raw_records(chunk, strict)
    raw = {name: raw.column(name).combine_chunks() for name in raw.column_names}
    counts = dict.fromkeys(DROP_REASONS[:5], 0)
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
    long_title = tlen > max_title  # data.max_title_chars: the cap every verb applies
    no_title = empty_title | long_title
    empty_content = ~no_title & (clen == 0)
    short = ~no_title & ~empty_content & (clen < min_chars)
    counts["empty_title"], counts["empty_content"] = int(empty_title.sum()), int(empty_content.sum())
    counts["long_title"], counts["short_content"] = int(long_title.sum()), int(short.sum())
    valid = ~(no_title | empty_content | short)
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
        if near_dup:  # MinHash here, in the workers: the pass's main cost, spread over the cores
            sk = neardup.sketch(content)
            width = 2 * neardup.NUM_PERM
            sig = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(sk.sig.tobytes())])
            table = table.append_column("nd_sig", sig).append_column("nd_shingles", pa.array(sk.shingles))
            table = table.append_column("nd_hash", pa.array(sk.chash))
        with pa.OSFile(str(part), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
    return {"read": read, "counts": counts, "malformed_at": bad[:_MAX_LOCATIONS], "part": part, "n": n}


# ------------------------------------------------------------------------ dedupe, families, pass 2: write

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
(bad JSON, not UTF-8, not an object), `empty_title`, `long_title` (> max_title_chars), `empty_content`,
`short_content` (< min_content_chars),
`duplicate_record` (same cleaned title and content as an earlier record), `duplicate_title` (same title,
case/whitespace-insensitive, other content: the first one is kept).

Split: records are grouped into title families so product variants never straddle train/val/test. Two records
are one family when their titles have the same family key (`clean.family_key`: lowercase, no accents, no
(parentheticals)/[brackets], no "Vol. 2"/"Part 3"/"Book 4"/"#5"/"2nd edition", no "12 oz"/"3-pack", no colour
or size words, no punctuation or trailing numbers), or when their cleaned contents are identical (series
blurbs), transitively (union-find). A family is named by the key of its first record, and goes to test when
blake2b(split_salt, family) / 2**64 < test_fraction, to val when below test_fraction + val_fraction, else train.
With data.near_dup (default), families are also joined when their contents are near-duplicates (`neardup`:
MinHash over word pairs, signatures made in pass 1 by the workers, LSH bands and verification in the parent) or
equal up to case and punctuation, never past data.near_dup_max_family records; stats.json["near_dup"] counts
them and shows 10 pairs, stats.json["families"]["largest_families"] the 5 largest families.

Two passes: (1) stream the inputs in chunks (`readers`; on large inputs 2 worker processes, which get the blocks
through shared memory, `parallel`), clean whole columns (`columns`: Arrow kernels where they give clean.py's
exact result, clean.py for the other rows), write kept records to Arrow files in a temporary directory and keep
only hashes; dedupe and union-find on the hashes; (2) stream the Arrow files into DIR/{train,val,test}.parquet
(uid, title, content, family), encoded by a thread while the next part is filtered. Also DIR/stats.json and
DIR/config.resolved.yaml. Same inputs and options give byte-identical files. DIR appears only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from prodesc.config import DataConfig
from prodesc.data import neardup, readers
from prodesc.data.readers import Source
from prodesc.data.scan import DROP_REASONS, Scan, read_part, scan_sources
from prodesc.errors import ProdescError
from prodesc.rundir import atomic_dir

__all__ = ["prepare", "DROP_REASONS", "SPLITS"]

SPLITS = ("train", "val", "test")
_SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string()), ("family", pa.string())])
_ROW_GROUP = 100_000  # fixed row groups: the output does not depend on chunking or worker count


def prepare(inputs: list[Path], out: Path, cfg: DataConfig, overwrite: bool = False) -> dict[str, Any]:
    """Clean `inputs` and write `out`/{train,val,test}.parquet, stats.json, config.resolved.yaml; return stats."""
    started = time.perf_counter()
    out = Path(out)
    sources = [s for p in inputs for s in readers.open_source(Path(p), cfg)]  # every input checked before any work
    if cfg.val_fraction + cfg.test_fraction > 1:
        raise ProdescError("data.val_fraction + data.test_fraction > 1: lower them so train keeps a share")
    with atomic_dir(out, overwrite, "output") as tmp:
        stats = _prepare_in(tmp, sources, cfg)
    _print_summary(stats, out, time.perf_counter() - started)
    return stats


def _prepare_in(tmp: Path, sources: list[Source], cfg: DataConfig) -> dict[str, Any]:
    """Both passes, writing every output file into `tmp`."""
    scan = scan_sources(sources, cfg, tmp / "work")
    keep = _dedupe(scan)
    if not keep.any():
        raise ProdescError(
            f"no records left in {', '.join(s.label for s in sources)} ({scan.read} read, dropped "
            f"{_fmt_counts(scan.counts)}): check --title-field/--content-field or lower --min-content-chars"
        )
    rep = _families(scan.fkey[keep], scan.chash[keep])
    near = _near_dup(scan, keep, rep, cfg) if cfg.near_dup else None
    if near is not None:
        rep = near.pop("rep")
    splits = _write_splits(scan, keep, rep, cfg, tmp)
    stats = _stats(sources, scan, keep, splits, rep, cfg)
    stats["families"]["largest_families"] = _largest(scan, keep, rep)
    if near is not None:
        stats["near_dup"] = _near_dup_stats(scan, keep, near, cfg)
    shutil.rmtree(tmp / "work")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    dumped = yaml.safe_dump({"data": cfg.model_dump(mode="json")}, sort_keys=False)
    (tmp / "config.resolved.yaml").write_text(dumped, encoding="utf-8")
    return stats


def _dedupe(scan: Scan) -> np.ndarray:
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
    find = partial(neardup.find_root, parent)

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


def _near_dup(scan: Scan, keep: np.ndarray, rep: np.ndarray, cfg: DataConfig) -> dict[str, Any]:
    """Verified near-duplicate pairs among kept records with enough content; their families joined (capped)."""
    kept = np.flatnonzero(keep)
    long_enough = (scan.clen[kept] >= cfg.near_dup_min_chars) & (scan.shingles[kept] >= neardup.MIN_SHINGLES)
    eligible = np.flatnonzero(long_enough)  # kept-record numbers
    sig, scan.sig = scan.sig[kept[eligible]], None  # the full matrix is not needed again
    i, j, sim = neardup.similar_pairs(sig, cfg.near_dup_threshold)
    del sig
    # Contents equal up to case, punctuation and spacing (any length: as the leak guard reads "same content")
    same_i, same_j = neardup.equal_pairs(scan.nhash[kept])
    i, j = np.concatenate([eligible[i], same_i]), np.concatenate([eligible[j], same_j])
    sim = np.concatenate([sim, np.ones(len(same_i))])
    order = np.lexsort((j, i))
    first = np.concatenate([[True], (np.diff(i[order]) != 0) | (np.diff(j[order]) != 0)]) if len(i) else order > 0
    i, j, sim = i[order][first], j[order][first], sim[order][first]
    new_rep, merged, skipped = neardup.merge_families(rep, i, j, cfg.near_dup_max_family)
    across = rep[i] != rep[j]  # pairs the title-key and same-content rules had left in two families
    return {"rep": new_rep, "compared": len(eligible), "i": i[across], "j": j[across], "sim": sim[across],
            "pairs": len(i), "merged": merged, "skipped": skipped}  # fmt: skip


def _write_splits(scan: Scan, keep: np.ndarray, rep: np.ndarray, cfg: DataConfig, tmp: Path) -> dict:
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
        for part, n in scan.parts:  # each row is copied once, into its split (filters copy every row they keep)
            table = read_part(part, ["uid", "title", "content", "fkey_text"])
            kept = np.flatnonzero(keep[offset : offset + n])  # part rows of kept records k, k + 1, ...
            offset, span = offset + n, slice(k, k + len(kept))
            family = table.column("fkey_text").combine_chunks()
            for i in np.flatnonzero(needed[span]).tolist():
                names[k + i] = family[int(kept[i])].as_py()
            others = np.flatnonzero(~own[span])
            if len(others):
                mask = np.zeros(n, bool)
                mask[kept[others]] = True
                values = pa.array([names[r] for r in rep[span][others].tolist()], pa.string())
                family = pc.replace_with_mask(family, pa.array(mask), values)
            table = table.drop_columns(["fkey_text"]).append_column("family", family)
            split = np.full(n, -1, np.int8)  # dropped records: no split
            split[kept] = which[span]
            for i, s in enumerate(SPLITS):
                writers[s].add(table.filter(pa.array(split == i)))
            k += len(kept)
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
            self.pending.append(self.thread.submit(self._write, table.slice(0, full)))
        self.buffer, self.rows = [table.slice(full)], len(table) - full

    def _write(self, table: pa.Table) -> None:
        """Row groups of one contiguous chunk each: Parquet cuts pages at Arrow chunk boundaries too, so the
        bytes would otherwise depend on how the input was cut into parts."""
        for start in range(0, len(table), _ROW_GROUP):
            self.writer.write_table(table.slice(start, _ROW_GROUP).combine_chunks(), _ROW_GROUP)


def _stats(
    sources: list[Source], scan: Scan, keep: np.ndarray, splits: dict, rep: np.ndarray, cfg: DataConfig
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


def _near_dup_stats(scan: Scan, keep: np.ndarray, near: dict, cfg: DataConfig) -> dict[str, Any]:
    """The pass's parameters and counts, and 10 pairs it joined, spread from the weakest to the strongest."""
    bands, rows = neardup.bands_for(cfg.near_dup_threshold)
    order = np.lexsort((near["j"], near["i"], near["sim"]))
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(10, len(order))).round().astype(int))]
    rows_at = _rows_at(scan, keep, [int(x) for p in picks for x in (near["i"][p], near["j"][p])])
    examples = [
        {"similarity": round(float(s), 3), "a": rows_at[int(a)], "b": rows_at[int(b)]}
        for a, b, s in zip(near["i"][picks], near["j"][picks], near["sim"][picks], strict=True)
    ]
    return {
        "shingle": f"{neardup.SHINGLE} words",
        "permutations": neardup.NUM_PERM,
        "bands": bands,
        "rows_per_band": rows,
        "threshold": cfg.near_dup_threshold,
        "min_chars": cfg.near_dup_min_chars,
        "max_family": cfg.near_dup_max_family,
        "records_compared": near["compared"],
        "pairs_found": near["pairs"],
        "pairs_across_families": len(near["i"]),
        "families_merged": near["merged"],
        "pairs_skipped_by_max_family": near["skipped"],
        "examples": examples,
    }


def _largest(scan: Scan, keep: np.ndarray, rep: np.ndarray, top: int = 5) -> list[dict[str, Any]]:
    """The `top` largest families: records and their first record's title."""
    size = np.bincount(rep, minlength=len(rep))
    firsts = np.argsort(-size, kind="stable")[:top]
    firsts = firsts[size[firsts] > 0]
    rows = _rows_at(scan, keep, firsts.tolist())
    return [{"records": int(size[f]), "title": rows[f]["title"], "uid": rows[f]["uid"]} for f in firsts.tolist()]


def _rows_at(scan: Scan, keep: np.ndarray, wanted: list[int]) -> dict[int, dict[str, str]]:
    """uid, title and content (cut at 300 chars) of kept records by number, read back from the pass-1 parts."""
    valid = np.flatnonzero(keep)[np.asarray(wanted, np.int64)] if wanted else np.zeros(0, np.int64)
    ends = np.cumsum([n for _, n in scan.parts])
    out: dict[int, dict[str, str]] = {}
    for k, v in zip(wanted, valid.tolist(), strict=True):
        p = int(np.searchsorted(ends, v, side="right"))
        row = read_part(scan.parts[p][0], ["uid", "title", "content"]).slice(v - (ends[p - 1] if p else 0), 1)
        uid, title, content = (row.column(c)[0].as_py() for c in ("uid", "title", "content"))
        out[k] = {"uid": uid, "title": title, "content": content if len(content) <= 300 else content[:299] + "…"}
    return out


def _print_summary(stats: dict, out: Path, seconds: float) -> None:
    splits = ", ".join(f"{s} {v['records']:,} ({v['families']:,} families)" for s, v in stats["splits"].items())
    print(f"prepared {out} in {seconds:.1f} s: kept {stats['kept']:,} of {stats['records_read']:,} records")
    print(f"  {splits}")
    print(f"  dropped: {_fmt_counts(stats['dropped'])}")
    if stats["malformed"]["count"]:
        print(f"  malformed records skipped, first at: {', '.join(stats['malformed']['first'][:3])}")


# -------------------------------------------------------------------------------------------------- helpers


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {"p5": 0, "p50": 0, "p95": 0, "max": 0}
    p5, p50, p95 = np.percentile(values, [5, 50, 95], method="lower").tolist()
    return {"p5": int(p5), "p50": int(p50), "p95": int(p95), "max": int(values.max())}


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v) or "nothing"

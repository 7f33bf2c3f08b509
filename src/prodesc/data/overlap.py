"""The leak guard: what a run trained on, kept compactly in the run dir, and the check of evaluated items against it.

    write_index(run_dir, train_rows, cfg.data)           # prodesc train: RUN_DIR/train_index.npz
    check_overlap(run_dir, items, allow_overlap=False)   # prodesc eval, generate --data: refuse items seen in training

Family names alone cannot do this: within one prepare a family never straddles splits, and across two prepares
(another split_salt, min_content_chars, input) the same product's family can be named after another record. So
per training record the index keeps what does not depend on how the data was prepared: the xxh3 of its title's
family key (`clean.family_key`, no salt), the hash of its content's normalised word sequence (equal up to case,
punctuation and spacing) and its near-duplicate signature (`neardup.sketch`: 128 16-bit MinHash minima), plus
its title for the error message: ~300 bytes a record (3 MB per 10,000). An evaluated item overlaps when its
family key or content hash is a training one, or when its content (>= data.near_dup_min_chars) is a near-duplicate
(estimated similarity >= data.near_dup_threshold) of a training content: LSH bands find the candidates, all 128
minima confirm them, as in `prepare`. The near-duplicate settings are the training data's own (its
config.resolved.yaml: `data_settings`), not the train command's; for data prepared with --no-near-dup "same
content" means identical, as prepare read it, and no near-duplicate is looked for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodesc.config import DataConfig
from prodesc.data import columns, neardup
from prodesc.errors import ProdescError
from prodesc.rundir import train_families

INDEX = "train_index.npz"
_FORMAT = 1
_MAX_PER_BUCKET = 64  # training records compared per item and band: a boilerplate bucket cannot blow up the check


def data_settings(data: Path, default: DataConfig) -> DataConfig:
    """The settings a prepared data dir was made with (its config.resolved.yaml), else `default`: the leak guard
    uses the data's own near-duplicate definition, so data prepared with --no-near-dup or another threshold does
    not have its own held-out split refused."""
    from prodesc.config import resolve
    from prodesc.rundir import RESOLVED

    return resolve(base=data / RESOLVED).data if (data / RESOLVED).is_file() else default


def write_index(run: Path, rows: list[dict[str, Any]], cfg: DataConfig) -> Path:
    """Write RUN_DIR/train_index.npz for the training `rows` (dicts with title and content); `cfg`: the training
    data's settings (`data_settings`)."""
    fp = _fingerprints([r["title"] for r in rows], [r["content"] for r in rows])
    titles = "\n".join(r["title"].replace("\n", " ") for r in rows).encode("utf-8", "surrogatepass")
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", suffix=".npz", dir=run)
    os.close(fd)
    try:
        np.savez_compressed(
            tmp,
            format=np.int32(_FORMAT),
            num_perm=np.int32(neardup.NUM_PERM),
            near_dup=np.bool_(cfg.near_dup),
            threshold=np.float64(cfg.near_dup_threshold),
            min_chars=np.int64(cfg.near_dup_min_chars),
            fkey=fp.fkey,
            chash=fp.chash,
            xhash=fp.xhash,
            sig=fp.sig,
            comparable=fp.comparable(cfg.near_dup_min_chars),
            titles=np.frombuffer(titles, np.uint8),
        )
        os.replace(tmp, run / INDEX)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return run / INDEX


def check_overlap(run: Path, items: list[dict[str, Any]], allow_overlap: bool, flag: str = "--allow-overlap") -> int:
    """Refuse (ProdescError) when evaluated items (title, content) overlap the run's training records, unless
    `allow_overlap`; then only warn. Returns how many items overlap."""
    path = run / INDEX
    if not path.exists():
        return _check_family_names(run, items, allow_overlap, flag)
    index = _load(path)
    found = _find(index, [it["title"] for it in items], [it.get("content") or "" for it in items])
    hits = [k for k, f in enumerate(found) if f]
    if not hits:
        return 0
    kinds = {kind: sum(1 for f in found if f and f[0] == kind) for kind in ("family key", "content", "near-duplicate")}
    why = ", ".join(f"{v} by {k}" for k, v in kinds.items() if v)
    examples = "; ".join(_example(items[k]["title"], found[k], index) for k in hits[:3])
    if not allow_overlap:
        raise ProdescError(
            f"{len(hits)} of {len(items)} evaluated items overlap the run's training data ({why}), e.g. {examples}: "
            f"evaluate on data prepared together with the run's training data, or pass {flag}"
        )
    print(f"warning: {len(hits)} of {len(items)} evaluated items overlap the training data ({why}; {flag})")
    return len(hits)


@dataclass
class _Fingerprints:
    fkey: np.ndarray  # uint64: xxh3 of the title's family key
    chash: np.ndarray  # uint64: normalised word sequence (0: no word)
    xhash: np.ndarray  # uint64: the content exactly (prepare's "same content" when near-duplicates are off)
    sig: np.ndarray  # uint16 [n, NUM_PERM]
    shingles: np.ndarray  # int32
    chars: np.ndarray  # int64: content length

    def comparable(self, min_chars: int) -> np.ndarray:
        return (self.chars >= min_chars) & (self.shingles >= neardup.MIN_SHINGLES)


def _fingerprints(titles: list[str], contents: list[str]) -> _Fingerprints:
    titles_arr = pa.array([t or " " for t in titles], pa.string())  # family_keys wants non-empty titles
    sk = neardup.sketch(pa.array(contents, pa.string()))
    chars = np.fromiter(map(len, contents), np.int64, len(contents))
    xhash = columns.hash64(pa.array(contents, pa.string()))
    return _Fingerprints(columns.hash64(columns.family_keys(titles_arr)), sk.chash, xhash, sk.sig, sk.shingles, chars)


def _load(path: Path) -> dict[str, Any]:
    try:
        with np.load(path) as z:
            index = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        raise ProdescError(f"{path} is unreadable ({e}): re-train the run, or pass --allow-overlap") from None
    if int(index.get("format", 0)) != _FORMAT or int(index["num_perm"]) != neardup.NUM_PERM:
        raise ProdescError(f"{path} was written by another prodesc version: re-train the run, or pass --allow-overlap")
    return index


def _find(index: dict[str, Any], titles: list[str], contents: list[str]) -> list[tuple | None]:
    """Per item: None, or (kind, training record number, similarity) of its first reason to overlap."""
    fp = _fingerprints(titles, contents)
    found: list[tuple | None] = [None] * len(titles)
    key_at = _lookup(index["fkey"], fp.fkey)
    near_dup = bool(index.get("near_dup", True))  # off in the training data: "same content" meant identical
    content_at = _lookup(index["chash"], fp.chash) if near_dup else _lookup(index["xhash"], fp.xhash)
    near_at, near_sim = _near(index, fp)
    for k in range(len(titles)):
        if key_at[k] >= 0:
            found[k] = ("family key", int(key_at[k]), None)
        elif content_at[k] >= 0 and (fp.chash[k] != 0 or not near_dup):
            found[k] = ("content", int(content_at[k]), None)
        elif near_at[k] >= 0:
            found[k] = ("near-duplicate", int(near_at[k]), float(near_sim[k]))
    return found


def _lookup(trained: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per value, the number of a training record with that value, or -1."""
    order = np.argsort(trained, kind="stable")
    at = np.searchsorted(trained[order], values)
    at = np.minimum(at, len(order) - 1)
    hit = (len(order) > 0) & (trained[order][at] == values) if len(order) else np.zeros(len(values), bool)
    return np.where(hit, order[at], -1)


def _near(index: dict[str, Any], fp: _Fingerprints) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the most similar training record at or above the run's threshold (-1: none) and the similarity."""
    threshold, n = float(index["threshold"]), len(fp.sig)
    best, best_sim = np.full(n, -1, np.int64), np.zeros(n)
    items = np.flatnonzero(fp.comparable(int(index["min_chars"])))
    trained = np.flatnonzero(index["comparable"])
    if not len(items) or not len(trained) or not bool(index.get("near_dup", True)):  # off in the training data
        return best, best_sim
    bands, rows = neardup.bands_for(threshold)
    tsig, isig = index["sig"][trained], fp.sig[items]
    pairs = []
    for band in range(bands):
        tk = neardup.band_keys(tsig, band, rows)
        order = np.argsort(tk, kind="stable")
        ik = neardup.band_keys(isig, band, rows)
        lo = np.searchsorted(tk[order], ik, "left")
        count = np.minimum(np.searchsorted(tk[order], ik, "right") - lo, _MAX_PER_BUCKET)
        item = np.repeat(np.arange(len(items)), count)
        step = np.arange(len(item)) - np.repeat(np.cumsum(count) - count, count)
        pairs.append(item * len(trained) + order[np.repeat(lo, count) + step])
    code = np.unique(np.concatenate(pairs))
    i, t = code // len(trained), code % len(trained)
    sim = neardup.similarity(isig[i], tsig[t])
    for a, b, s in zip(i.tolist(), t.tolist(), sim.tolist(), strict=True):
        if s >= threshold and s > best_sim[items[a]]:
            best[items[a]], best_sim[items[a]] = trained[b], s
    return best, best_sim


def _example(title: str, found: tuple, index: dict[str, Any]) -> str:
    kind, at, sim = found
    trained = _title_at(index, at)
    how = f"near-duplicate content, similarity {sim:.2f}" if kind == "near-duplicate" else f"same {kind}"
    return f"{title!r} ~ training {trained!r} ({how})"


def _title_at(index: dict[str, Any], at: int) -> str:
    if "_titles" not in index:
        index["_titles"] = index["titles"].tobytes().decode("utf-8", "surrogatepass").split("\n")
    return index["_titles"][at]


def _check_family_names(run: Path, items: list[dict[str, Any]], allow_overlap: bool, flag: str) -> int:
    """Runs trained before train_index.npz: only the family names can be compared (the old, weaker check)."""
    trained = train_families(run)
    overlap = sorted({it.get("family") for it in items} & trained)
    print(f"warning: {run} has no {INDEX} (trained by an older prodesc): only family names are checked")
    if overlap and not allow_overlap:
        raise ProdescError(
            f"{len(overlap)} of the evaluated families were in the run's training data (e.g. {overlap[0]!r}): "
            f"evaluate on a split prepared together with the training data, or pass {flag}"
        )
    return len(overlap)

"""The catalog index: unit vectors of catalog titles and the texts they lead to, searched with faiss.

    prodesc data index demo/data                         # DATA/index/: every split's title vectors, embedded once
    catalog = Catalog.build(train_rows, TitleVectors.for_data(data, cfg.retrieval), cfg.retrieval)
    catalog.save(run / "catalog");  catalog = Catalog.load(run / "catalog", cfg.retrieval)
    catalog.neighbours(["Red Mug"], k=2)       # [[{"uid", "title", "content", "family", "score"}, ...]]

Two stores, the same format (vectors.npy: unit vectors in fp16, items.parquet, meta.json):
- DATA/index/ (`prodesc data index`): the titles of every split. Embedding is the slow part on a CPU and needs the
  embedder's weights; with the vectors stored, train, generate and eval on a machine without the embedder (the GPU
  study) look titles up, and load the embedder only for titles the index lacks (free text).
- RUN/catalog/ (`prodesc train` with retrieval.k > 0): the train split with its descriptions, which generate, eval,
  serve and export search.

Search is cosine similarity (the inner product of unit vectors): exact (faiss IndexFlatIP) up to EXACT_MAX items,
approximate (HNSW) beyond; on a CUDA GPU the exact search is one matrix product there.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodesc.config import RetrievalConfig
from prodesc.errors import ProdescError
from prodesc.rundir import atomic_dir

INDEX_DIR = "index"  # in a prepared data dir
CATALOG_DIR = "catalog"  # in a run dir (and a merged export)
SPLITS = ("train", "val", "test")
# Measured on the 2-core dev box (bench/results/catalog_search.json), every title of the catalog searched once (as
# training does): 20k items 18 s exact vs 19 s HNSW (build included; recall@10 0.97), 50k 79 s vs 68 s, 100k 613 s
# vs 78 s (recall 1.0). Exact costs N^2: past ~50k approximate wins, and one query stays under 7 ms either way.
EXACT_MAX = 50_000
FAISS_FILE = "hnsw.faiss"  # an approximate catalog's search graph, saved beside its vectors
MAX_EXTRA = 256
SEARCH_CHUNK = 8192  # titles searched at a time: the k + MAX_EXTRA candidates are held for one chunk, not for all
GPU_SCORES = 1 << 28  # query x item scores per GPU matrix product (512 MiB in fp16), whatever the catalog's size
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
ITEM_COLUMNS = ("uid", "title", "content", "family")


def index_data(data: Path, embedder: str, overwrite: bool = False) -> Path:
    """`prodesc data index DATA`: embed the titles of every split once into DATA/index/."""
    present = [s for s in SPLITS if (data / f"{s}.parquet").exists()]
    if not present:
        raise ProdescError(f"no train/val/test.parquet in {data}: run `prodesc data prepare ... --out {data}` first")
    if (data / INDEX_DIR).exists() and not overwrite:  # before the titles are embedded, not after
        raise ProdescError(f"{data / INDEX_DIR} already exists: pass --overwrite to embed the titles again")
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for split in present:
        t = pq.read_table(data / f"{split}.parquet", columns=["uid", "title"])
        tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    titles = pa.concat_tables(tables)
    vectors = TitleVectors(embedder).encode(titles.column("title").to_pylist(), progress=True)
    with atomic_dir(data / INDEX_DIR, overwrite, "data index") as tmp:
        _write(tmp, titles, vectors, embedder)
    print(f"indexed {titles.num_rows} titles of {', '.join(present)} with {embedder} into {data / INDEX_DIR}")
    return data / INDEX_DIR


class TitleVectors:
    """Unit vectors of titles: stored ones first (a data index, a catalog), the embedder for the rest."""

    def __init__(self, embedder: str) -> None:
        self.embedder = embedder
        self._rows: dict[str, int] = {}
        self._stored = np.zeros((0, 0), np.float16)

    @classmethod
    def for_data(cls, data: Path | None, cfg: RetrievalConfig) -> TitleVectors:
        """With DATA/index/ when it exists (built with the same embedder), else the embedder alone."""
        vectors = cls(cfg.embedder)
        index = data / INDEX_DIR if data is not None else None
        if index is not None and (index / "meta.json").exists():
            vectors.add_store(index)
        return vectors

    def add_store(self, path: Path) -> None:
        """Add the vectors of an index dir (DATA/index/ or RUN/catalog/) built with the same embedder."""
        meta, table, matrix = _read(path)
        if meta["embedder"] != self.embedder:
            raise ProdescError(
                f"{path} was built with {meta['embedder']!r}, not retrieval.embedder={self.embedder!r}: set "
                f"retrieval.embedder={meta['embedder']} or rebuild it (prodesc data index ... --overwrite)"
            )
        self.add(table.column("title").to_pylist(), matrix)

    def add(self, titles: list[str], matrix: np.ndarray) -> None:
        start = len(self._stored)
        matrix = matrix.astype(np.float16)
        self._stored = matrix if start == 0 else np.concatenate([self._stored, matrix])
        for i, title in enumerate(titles):
            self._rows.setdefault(title, start + i)

    def encode(self, titles: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 unit vectors, one row per title."""
        missing = sorted({t for t in titles if t not in self._rows})
        fresh: dict[str, np.ndarray] = {}
        if missing:
            from prodesc.embedder import load_embedder

            model = load_embedder(self.embedder)
            rows = model.encode(
                missing, batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=progress and len(missing) > 5000,
            )  # fmt: skip
            fresh = dict(zip(missing, rows, strict=True))
        if not titles:
            return np.zeros((0, self._stored.shape[1] if self._stored.size else 0), np.float32)
        return np.stack([fresh[t] if t in fresh else self._stored[self._rows[t]] for t in titles]).astype(np.float32)


class Catalog:
    """Catalog items (uid, title, content, family) and their title vectors, searchable by title."""

    def __init__(self, items: Any, vectors: np.ndarray, cfg: RetrievalConfig) -> None:
        self.items, self.cfg = items, cfg  # items: a pyarrow Table (rows fetched by index, never all as dicts)
        self.vectors = vectors.astype(np.float32)
        self.queries = TitleVectors(cfg.embedder)  # a catalog title is looked up, not embedded again
        self.queries.add(items.column("title").to_pylist(), vectors)
        families = Counter(items.column("family").to_pylist())
        self.largest_family = max(families.values(), default=0)
        self._index: Any = None

    @classmethod
    def build(cls, rows: list[dict], vectors: TitleVectors, cfg: RetrievalConfig) -> Catalog:
        import pyarrow as pa

        if not rows:
            raise ProdescError("the catalog is empty: prepare a train split with records")
        items = pa.table({c: [str(r.get(c) or "") for r in rows] for c in ITEM_COLUMNS})
        return cls(items, vectors.encode([r["title"] for r in rows], progress=True), cfg)

    @classmethod
    def load(cls, path: Path, cfg: RetrievalConfig) -> Catalog:
        if not (path / "meta.json").exists():
            raise ProdescError(
                f"no catalog index in {path}: it is written by `prodesc train` with retrieval.k > 0; retrain "
                "with --set retrieval.k=2, or set retrieval.k=0"
            )
        meta, items, matrix = _read(path)
        if meta["embedder"] != cfg.embedder:
            cfg = cfg.model_copy(update={"embedder": meta["embedder"]})  # queries must use the catalog's embedder
        catalog = cls(items, matrix, cfg)
        if (path / FAISS_FILE).exists() and not catalog._exact():  # the graph train built: not built again
            import faiss

            try:
                catalog._index = faiss.read_index(str(path / FAISS_FILE))
            except RuntimeError as e:  # faiss' own errors: a file cut short or overwritten
                raise ProdescError(f"{path / FAISS_FILE} is damaged ({str(e).splitlines()[0][:80]}): delete it (the "
                                   "search graph is built again) or train the run again") from None
        return catalog

    def save(self, out: Path) -> None:
        """Items, vectors and, for an approximate (HNSW) catalog, its search graph: ~30 s to build at a million
        items, built once here and read back by generate, eval, serve and export."""
        out.mkdir(parents=True, exist_ok=True)
        _write(out, self.items, self.vectors, self.cfg.embedder)
        if not self._exact():
            import faiss

            self.ready()
            faiss.write_index(self._index, str(out / FAISS_FILE))

    def __len__(self) -> int:
        return self.items.num_rows

    def use_data_index(self, data: Path | None) -> None:
        """Titles of a prepared data dir are looked up in its index (`prodesc data index`), not embedded."""
        if data is not None and (data / INDEX_DIR / "meta.json").exists():
            self.queries.add_store(data / INDEX_DIR)

    def share_graph(self, data: Path | None) -> None:
        """An approximate catalog of a prepared data dir's items: its search graph read from DATA/index/ when an
        earlier train or eval of the same items saved it, else built now and saved there (if writable). Training
        and eval's retrieval baseline on a million items then build it once per data dir, not each time."""
        if data is None or self._exact() or not (data / INDEX_DIR / "meta.json").exists():
            return
        import hashlib

        import faiss

        key = hashlib.sha256("\n".join(self.items.column("uid").to_pylist()).encode())
        key.update(f"{self.cfg.embedder} {self.vectors.shape} {HNSW_M} {HNSW_EF_CONSTRUCTION}".encode())
        path = data / INDEX_DIR / f"graph-{key.hexdigest()[:16]}.faiss"
        if path.exists():
            self._index = faiss.read_index(str(path))
            return
        self.ready()
        if os.access(path.parent, os.W_OK):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            faiss.write_index(self._index, str(tmp))
            tmp.replace(path)  # whole or absent: a killed write leaves only the temp file

    def neighbours(
        self, titles: Sequence[str], k: int, exclude_families: Sequence[str | None] | None = None
    ) -> list[list[dict[str, Any]]]:
        """The k nearest items of each title, best first; items of `exclude_families[i]` are skipped (training:
        never the record itself, never its own family)."""
        if k == 0 or not titles:
            return [[] for _ in titles]
        # enough candidates that k survive the exclusion (capped: a generic blurb can join hundreds of records)
        extra = min(self.largest_family, MAX_EXTRA) if exclude_families is not None else 0
        fetch = min(len(self), k + extra)
        families = self.items.column("family")
        out = []
        for start in range(0, len(titles), SEARCH_CHUNK):  # memory bounded by the chunk, whatever the sizes
            scores, idx = self._search(self.queries.encode(titles[start : start + SEARCH_CHUNK]), fetch)
            for i in range(len(idx)):
                skip = exclude_families[start + i] if exclude_families is not None else None
                picked = [(j, s) for j, s in zip(idx[i], scores[i], strict=True) if j >= 0]
                picked = [(j, s) for j, s in picked if skip is None or families[int(j)].as_py() != skip][:k]
                rows = self.items.take([int(j) for j, _ in picked]).to_pylist() if picked else []
                out.append([{**r, "score": round(float(s), 4)} for r, (_, s) in zip(rows, picked, strict=True)])
        return out

    def ready(self) -> None:
        """Build the search index now rather than at the first search (eval times its queries alone)."""
        if self._index is None and not (self._exact() and _cuda()):
            self._index = _faiss_index(self.vectors, self._exact())

    def _exact(self) -> bool:
        return self.cfg.search == "exact" or (self.cfg.search == "auto" and len(self) <= EXACT_MAX)

    def _search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        exact = self._exact()
        if exact and _cuda():
            return _search_torch(self.vectors, queries, fetch)
        self.ready()
        if not exact:
            self._index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * fetch)
        scores, idx = self._index.search(queries, fetch)
        return scores, idx


def _faiss_index(vectors: np.ndarray, exact: bool) -> Any:
    import faiss

    dim = vectors.shape[1]
    if exact:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index


def _search_torch(vectors: np.ndarray, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search on the GPU: what faiss' GPU flat index does, without needing faiss-gpu."""
    import torch

    base = torch.from_numpy(vectors).to("cuda", torch.float16)
    scores, idx = [], []
    rows = max(1, min(4096, GPU_SCORES // max(len(vectors), 1)))  # bounded memory: rows x N scores at a time
    for start in range(0, len(queries), rows):
        q = torch.from_numpy(queries[start : start + rows]).to("cuda", torch.float16)
        top = (q @ base.T).float().topk(fetch, dim=1)
        scores.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return np.concatenate(scores), np.concatenate(idx)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _write(out: Path, table: Any, vectors: np.ndarray, embedder: str) -> None:
    import pyarrow.parquet as pq

    np.save(out / "vectors.npy", vectors.astype(np.float16))  # fp16 halves the size; cosine ranks barely move
    pq.write_table(table, out / "items.parquet")
    meta = {"embedder": embedder, "count": table.num_rows, "dim": int(vectors.shape[1]) if vectors.size else 0}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_store(path: Path) -> None:
    """A user error naming the file when an index dir (DATA/index/, RUN/catalog/) is damaged (`_read`)."""
    _read(path)


def _read(path: Path) -> tuple[dict, Any, np.ndarray]:
    """meta.json, items.parquet and vectors.npy of an index dir, each checked: meta parses with its keys, the items
    have their columns, the vectors are fp16 unit vectors of meta's width, one per item."""
    import pyarrow.parquet as pq

    from prodesc.files import read_json

    fix = (f"rebuild it: prodesc data index {path.parent} --overwrite" if path.name == INDEX_DIR
           else "it is written by `prodesc train` with retrieval.k > 0: train the run again")
    meta = read_json(path / "meta.json", fix)
    if not (isinstance(meta.get("embedder"), str) and isinstance(meta.get("dim"), int)
            and isinstance(meta.get("count"), int)):
        raise ProdescError(f"{path / 'meta.json'} is damaged (embedder, count and dim expected): {fix}")
    try:
        table = pq.read_table(path / "items.parquet")
        matrix = np.load(path / "vectors.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ProdescError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}): {fix}") from None
    problem = _store_problem(meta, table, matrix, ("title",) if path.name == INDEX_DIR else ITEM_COLUMNS)
    if problem is not None:
        raise ProdescError(f"{path} is damaged ({problem}): {fix}")
    return meta, table, matrix


def _store_problem(meta: dict, table: Any, matrix: np.ndarray, columns: Sequence[str]) -> str | None:
    missing = sorted(set(columns) - set(table.column_names))
    if missing:
        return f"items.parquet lacks the columns {missing}"
    if matrix.dtype != np.float16 or matrix.shape != (meta["count"], meta["dim"]):
        return f"vectors.npy is {matrix.dtype} {matrix.shape}, meta.json says float16 ({meta['count']}, {meta['dim']})"
    if len(matrix) != table.num_rows:
        return f"{len(matrix)} vectors for {table.num_rows} items"
    sample = matrix[:1024].astype(np.float32)  # the embedder writes unit vectors; other numbers are damage
    if len(sample) and not np.all(np.abs(np.linalg.norm(sample, axis=1) - 1) < 0.01):
        return "vectors.npy holds vectors that are not unit length"
    return None

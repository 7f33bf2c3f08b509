"""Where exact catalog search stops paying: faiss IndexFlatIP vs IndexHNSWFlat on unit vectors shaped like
MiniLM title embeddings (384-d, clustered), for the two uses of the catalog index.

    python bench/catalog_search.py --sizes 20000 50000 100000 200000 --out bench/results/catalog_search.json

- training: every train title queries the catalog once (N queries over N items; flat costs N^2 d);
- serving: one title at a time (1 query over N items).
Recall@10 of HNSW is measured against the flat result on the same queries. Synthetic vectors: 4,000 cluster
centres plus noise (catalog titles come in families and categories), normalised; real embeddings are not needed to
time a matrix product, and the recall on clustered data is the pessimistic side for HNSW.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(sizes: list[int], dim: int, queries: int, out: Path | None) -> list[dict]:
    import faiss

    rows = []
    for n in sizes:
        x = _vectors(n, dim)
        q = x[np.random.default_rng(1).choice(n, size=min(queries, n), replace=False)]
        flat = faiss.IndexFlatIP(dim)
        flat.add(x)
        t0 = time.perf_counter()
        _, truth = flat.search(q, 10)
        flat_s = (time.perf_counter() - t0) / len(q)
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.add(x)
        build_s = time.perf_counter() - t0
        hnsw.hnsw.efSearch = 64
        t0 = time.perf_counter()
        _, got = hnsw.search(q, 10)
        hnsw_s = (time.perf_counter() - t0) / len(q)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)]))
        row = dict(
            n=n,
            flat_ms_per_query=round(flat_s * 1e3, 3),
            flat_self_search_s=round(flat_s * n, 1),
            hnsw_build_s=round(build_s, 1),
            hnsw_ms_per_query=round(hnsw_s * 1e3, 3),
            hnsw_self_search_s=round(build_s + hnsw_s * n, 1),
            hnsw_recall_at_10=round(recall, 4),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    if out is not None:
        meta = {"cpus": len(os.sched_getaffinity(0)), "faiss": faiss.__version__, "dim": dim, "queries": queries}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


def _vectors(n: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 4000, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000, 200_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    main(a.sizes, a.dim, a.queries, a.out)

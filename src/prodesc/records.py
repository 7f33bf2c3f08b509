"""Records on disk: a prepared split (Parquet) in, prediction JSONL out. Shared by generate, eval and serve.

    rows = read_split(Path("data"), "test", limit=100)
    write_jsonl(records, Path("preds.jsonl"))      # atomic: never a half-written file
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prodesc.errors import ProdescError


def write_jsonl(records: list[dict[str, Any]], out: Path) -> None:
    """Write JSONL atomically (temp file in the same dir, then rename): never a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_split(data: Path, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = data / f"{split}.parquet"
    if not path.exists():
        raise ProdescError(
            f"{path} not found: pass the --out dir of `prodesc data prepare` and a split (train, val, test)"
        )
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ProdescError(f"{path} is empty: prepare with a larger --test-fraction")
    return rows[:limit] if limit is not None else rows

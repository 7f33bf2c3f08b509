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
    rows = rows[:limit] if limit is not None else rows
    check_split_titles(path, [r["title"] for r in rows], title_cap(data))
    return rows


def title_cap(data: Path) -> int:
    """The data.max_title_chars a prepared data dir was made with (its config.resolved.yaml), else the default."""
    import yaml

    from prodesc.config import MAX_TITLE_CHARS

    try:
        recorded = yaml.safe_load((data / "config.resolved.yaml").read_text(encoding="utf-8"))["data"]
        return int(recorded.get("max_title_chars") or MAX_TITLE_CHARS)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
        return MAX_TITLE_CHARS


def check_split_titles(path: Path, titles: list[str], cap: int) -> None:
    """Prepared data never holds a title over its cap (prepare drops them); data prepared before the cap might."""
    for n, title in enumerate(titles, 1):
        if len(title) > cap:
            raise ProdescError(f"{path}: row {n} has a title of {len(title):,} characters, over data.max_title_chars="
                               f"{cap}: prepare the data again (prepare drops longer titles and counts them)")


def check_title(title: str, where: str, cap: int) -> None:
    """One title of a verb's input against data.max_title_chars, before any model loads."""
    if len(title) > cap:
        raise ProdescError(f"{where}: a title of {len(title):,} characters, over data.max_title_chars={cap}: a title "
                           "is one line; shorten it, or raise the cap with --set data.max_title_chars=N")

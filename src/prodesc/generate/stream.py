"""Titles in, predictions out, any number of them: read as a stream, generated a chunk at a time, each chunk
appended to the output as it completes, so memory stays flat and a killed run continues where it stopped.

    prodesc generate --run runs/smol --input titles.txt --out preds.jsonl            # writes as it goes
    prodesc generate --run runs/smol --input titles.txt --out preds.jsonl --resume   # after an interruption

The output keeps the input's order, one line per title. Beside it, `OUT.settings.json` records what made it (the
model, adapter on or off, the decoding and prompt settings). `--resume` checks those are unchanged (another
`--max-new-tokens`, `--temperature` or `--base` would append answers of another decoding or model), that every
complete line is a prediction of the input's first titles, and only then drops a line cut by the kill and skips
that many; chunks are the same as in an uninterrupted run, so its lines are the same too (greedy decoding). Items
are checked in a first pass over the input (bad lines stop the run before any model loads), then read again while
generating.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from prodesc.config import MAX_TITLE_CHARS
from prodesc.errors import ProdescError
from prodesc.records import check_title, read_split

Items = Callable[[], Iterator[dict[str, Any]]]  # a fresh pass over the items, each {"title", "reference"?}


def item_source(input: Path | None, data: Path | None, split: str, limit: int | None,
                max_title_chars: int = MAX_TITLE_CHARS) -> tuple[Items, int]:
    """A re-readable source of the items of `--input FILE` or `--data DIR --split`, and how many there are
    (every item checked once here, before any model loads: not empty, not over the title cap)."""
    if input is not None:
        if not input.is_file():
            raise ProdescError(f"input file not found: {input}: pass a .txt (one title a line) or .jsonl file")
        def items() -> Iterator[dict[str, Any]]:
            return islice(_file_items(input), limit)
    else:
        def items() -> Iterator[dict[str, Any]]:
            rows = read_split(data, split, limit)
            return ({"title": r["title"], "reference": r["content"]} for r in rows)
    total = 0
    for total, item in enumerate(items(), 1):
        if not str(item["title"]).strip():
            raise ProdescError(f"{input or data}: empty title at item {total}: remove it or give a title")
        check_title(item["title"], f"{input or data}: item {total}", max_title_chars)
    if total == 0:
        raise ProdescError(f"{input or data} holds no titles")
    return items, total


def generate_to_file(describe: Callable[[list[str]], list[dict]], items: Items, total: int, out: Path,
                     chunk: int, done: int = 0) -> int:
    """Describe the items after the first `done` (`resume_point`), appending each finished chunk to `out`;
    returns how many lines `out` holds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress(total, done)
    with out.open("a", encoding="utf-8") as f:
        it = islice(items(), done, None)
        while batch := list(islice(it, chunk)):
            records = describe([x["title"] for x in batch])
            lines = []
            for rec, item in zip(records, batch, strict=True):
                if item.get("reference") is not None:
                    rec["reference"] = item["reference"]
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            f.write("".join(lines))  # one write per chunk: a kill leaves whole chunks and at most one cut line
            f.flush()
            os.fsync(f.fileno())
            done += len(batch)
            bar.update(len(batch))
    bar.close()
    return done


def resume_point(out: Path, items: Items, resume: bool, made_with: dict[str, Any]) -> int:
    """How many items `out` holds already (0 for a new file, whose `settings_path` is then written); a file that
    `--resume` cannot continue is refused before anything in it changes."""
    if out.is_dir():
        raise ProdescError(f"--out {out} is a directory: pass a file path for the JSONL predictions")
    meta = settings_path(out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(made_with, indent=2, sort_keys=True) + "\n")
        return 0
    if not resume:
        raise ProdescError(f"{out} already exists: pass --resume to continue it, or remove it to start over")
    _check_made_with(out, meta, made_with)
    raw = out.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]  # a line cut by the kill is dropped and generated again
    lines = _check_lines(out, keep, items)
    if len(keep) != len(raw):  # only now: a file this verb did not write is refused untouched
        with out.open("r+b") as f:
            f.truncate(len(keep))
    print(f"resuming {out}: {len(lines)} predictions already written", file=sys.stderr)
    return len(lines)


def settings_path(out: Path) -> Path:
    """`OUT.settings.json`: what the predictions in `out` were made with (`resume_point`)."""
    return out.with_name(out.name + ".settings.json")


def _check_made_with(out: Path, meta: Path, made_with: dict[str, Any]) -> None:
    try:
        before = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProdescError(f"{out}: no {meta.name} beside it, so what made its predictions is unknown: --resume "
                           "continues a file `prodesc generate --out` wrote; remove it to start over") from None
    except (ValueError, UnicodeDecodeError):
        raise ProdescError(f"{meta} is damaged (not JSON): remove {out} and it to start over") from None
    changed = sorted(k for k in before.keys() | made_with.keys() if before.get(k) != made_with.get(k))
    if changed:
        what = "; ".join(f"{k}: {before.get(k)!r} then, {made_with.get(k)!r} now" for k in changed)
        raise ProdescError(f"{out} was written with other settings ({what}): --resume appends only answers of the "
                           "same model and decoding; use the same options, or write to another --out")


def _check_lines(out: Path, keep: bytes, items: Items) -> list[str]:
    try:
        lines = keep.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ProdescError(f"{out}: not UTF-8 text: --resume continues a file this verb wrote") from None
    for n, (line, item) in enumerate(zip(lines, items(), strict=False), 1):
        try:
            title = json.loads(line)["title"]
        except (ValueError, KeyError, TypeError):
            raise ProdescError(f"{out}:{n}: not a prediction line: --resume continues a file this verb wrote") from None
        if title != item["title"]:
            raise ProdescError(f"{out}:{n} is for {title!r}, the input's item {n} is {item['title']!r}: "
                               "--resume needs the same input (and --limit) as the interrupted run")
    return lines


class _Progress:
    """A line on stderr every few seconds: done/total, rate and ETA (tqdm's bar on a terminal)."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 5 or self.done == self.total:
            self.last = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.done}/{self.total} titles, {rate:.1f} titles/s, ETA {_clock(eta)}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, done: int) -> Any:
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=done, file=sys.stderr, unit="title")
    return _Progress(total, done)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _file_items(path: Path) -> Iterator[dict[str, Any]]:
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_item(path, n, line) if jsonl else {"title": line.strip()}
        except UnicodeDecodeError as e:
            raise ProdescError(f"{path}: not UTF-8 text ({e.reason}): save it as UTF-8") from None


def _jsonl_item(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise ProdescError(f"{path}:{n}: not valid JSON; one object per line with a 'title'") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("title"), str):
        raise ProdescError(f"{path}:{n}: no 'title' string; one object per line with a 'title'")
    ref = obj.get("reference", obj.get("content"))
    return {"title": obj["title"], "reference": ref if isinstance(ref, str) else None}

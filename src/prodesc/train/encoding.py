"""The training examples as `datasets` tables: encoded in parallel once per data, tokenizer and settings, cached on
disk beside the prepared data, read by every rank.

    train_ds, val_ds, lengths = encoding.build(tok, cfg, rows, near, data)   # near: dict, or a callable run on a miss

DATA/encoded/KEY/ holds train/ and val/ (`Dataset.save_to_disk`, memory-mapped when read; an empty split is
absent) and stats.json (what was cut, token totals, answer-length percentiles); an entry that does not read back
whole is encoded again. KEY hashes all the examples depend on: the train and val split files
(and DATA/index/ when neighbours are on), the tokenizer (vocabulary, merges, special tokens, chat template), the
prompt settings, retrieval.k/chars/embedder/search, train.max_length, train.max_eval_samples and
train.drop_unsupported (answers without their clauses whose specifics neither the title nor the neighbours shown
state: specs.keep_supported). The data dir,
because the examples derive from it: any run on that data reuses them, they are deleted with it and sit on the disk
that already holds the splits; a data dir that cannot be written falls back to model.cache_dir/encoded/. Under
`accelerate launch` rank 0 encodes while the others wait (dist.main_first), then every rank maps the same files.

The work per example is joining strings around the user text and tokenizing many at a time (prompts.Layout found
the template's facts once); `datasets.map(batched=True, num_proc=train.encode_workers)` spreads it over processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prodesc import dist, models, prompts, rundir, specs
from prodesc.config import ProdescConfig
from prodesc.errors import ProdescError
from prodesc.train.examples import CUT_KEYS, describe_cuts

ENCODED_DIR = "encoded"
FORMAT = 2  # bump when what is stored changes: old entries are then never read (2: answer_tokens percentiles)
ANSWER_PERCENTILES = (50, 60, 75, 90)
SMALL = 20_000  # examples per process at least: on 2 cores 2 processes were slower than 1 on 20k (encode_examples)
BATCH = 1000
Near = dict[str, list[list[dict]]]


def build(
    tok: Any,
    cfg: ProdescConfig,
    rows: dict[str, list[dict]],
    near: Near | Callable[[], Near] | None = None,
    data: Path | None = None,
) -> tuple[Any, Any, dict]:
    """Train and val datasets (val None when empty) and the lengths summary; read from the cache when `data` has
    them for these settings, else encoded (`near` called only then) and, with `data`, stored."""
    if data is None:
        splits, stats = _encode_splits(tok, cfg, rows, near)
    else:
        path = cache_root(data, cfg) / cache_key(tok, cfg, data)
        with dist.main_first():  # rank 0 encodes and stores; the others then find it stored
            stored = _load_whole(path)
            fresh = stored is None
            if fresh:
                t = time.perf_counter()
                splits, stats = _encode_splits(tok, cfg, rows, near)
                _store(path, splits, stats)
                print(f"encoded {stats['examples']:,} examples in {time.perf_counter() - t:.1f} s into {path} "
                      "(later runs with the same data and settings read them back)")
                stored = _load(path)
            splits, stats = stored
        if not fresh:
            print(f"examples read from {path} (encoded earlier with the same data and settings)")
    note = describe_cuts(stats["cut"], stats["records"], cfg.train.max_length)
    if note:
        print(note)
    val = splits["val"] if len(splits["val"]) else None
    if val is None:
        print("val split is empty: no eval loss, no early stopping (prepare with --val-fraction > 0)")
    return splits["train"], val, {k: stats[k] for k in ("examples", "truncated", "cut", "tokens", "supervised_tokens",
                                                     "answer_tokens")}


def workers(cfg: ProdescConfig, n: int) -> int:
    """train.encode_workers, else min(8, CPUs) for large inputs and 1 for small ones."""
    if cfg.train.encode_workers:
        return cfg.train.encode_workers
    return max(1, min(8, os.cpu_count() or 1, n // SMALL))  # one process per SMALL examples at least


def cache_root(data: Path, cfg: ProdescConfig) -> Path:
    """DATA/encoded/, or model.cache_dir/encoded/ when the data dir cannot be written."""
    if os.access(data, os.W_OK):
        return data / ENCODED_DIR
    return models.cache_dir(cfg.model.cache_dir) / ENCODED_DIR


def cache_key(tok: Any, cfg: ProdescConfig, data: Path) -> str:
    """Hash of everything the encoded examples depend on (the module docstring lists it)."""
    r = cfg.retrieval
    files = ["train.parquet", "val.parquet"]
    if r.k:
        files += [f"index/{name}" for name in ("meta.json", "items.parquet", "vectors.npy")]
    parts = {
        "format": FORMAT,
        "files": {f: rundir.file_sha256(data / f) for f in files if (data / f).is_file()},
        "tokenizer": tokenizer_hash(tok),
        "prompt": cfg.prompt.model_dump(mode="json"),
        "retrieval": r.model_dump(mode="json", include={"k", "chars", "embedder", "search"}) if r.k else {"k": 0},
        "max_length": cfg.train.max_length,
        "max_eval_samples": cfg.train.max_eval_samples,
        **({"drop_unsupported": cfg.train.drop_unsupported} if cfg.train.drop_unsupported != "off" else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_hash(tok: Any) -> str:
    """What tokenizes and renders: the fast tokenizer's full JSON (else its vocabulary), special tokens, template."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    template = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template)
    specials = [type(tok).__name__, tok.bos_token, tok.eos_token, tok.pad_token, str(template)]
    return hashlib.sha256("\x00".join([body, *map(str, specials)]).encode()).hexdigest()


def _encode_splits(
    tok: Any, cfg: ProdescConfig, rows: dict[str, list[dict]], near: Near | Callable[[], Near] | None
) -> tuple[dict[str, Any], dict]:
    near = near() if callable(near) else near
    near = near or {split: [[] for _ in split_rows] for split, split_rows in rows.items()}
    n_val = cfg.train.max_eval_samples or len(rows.get("val", []))
    layout = prompts.Layout.of(tok, cfg.prompt)
    train, cut = encode(layout, cfg, rows["train"], near["train"])
    val, _ = encode(layout, cfg, rows.get("val", [])[:n_val], near.get("val", [])[:n_val])
    if not len(train):
        raise ProdescError(f"no training example fits train.max_length={cfg.train.max_length}: raise it")
    stats = {"records": len(rows["train"]), "examples": len(train), "truncated": cut["examples_cut"], "cut": cut,
             **_token_totals(train)}  # fmt: skip
    return {"train": train, "val": val}, stats


def encode(layout: prompts.Layout, cfg: ProdescConfig, rows: list[dict], near: list[list[dict]]) -> tuple[Any, dict]:
    """One split's examples (a Dataset of input_ids, completion_mask) within train.max_length, and what was cut."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not rows:  # `map` over no rows never runs _fit_batch, so its columns would not exist (an empty val split)
        return _empty(), dict.fromkeys([*CUT_KEYS, "examples_cut"], 0)
    columns: dict[str, list] = {"title": [r["title"] for r in rows], "content": [r["content"] for r in rows]}
    k, chars = cfg.retrieval.k, cfg.retrieval.chars
    if k:  # each neighbour's description kept only as far as any cut of it can reach (prompts.clip)
        columns["near"] = [[{"title": n["title"], "content": _reach(n.get("content"), chars)} for n in nb]
                           for nb in near]  # fmt: skip
    fit = {"layout": layout, "max_length": cfg.train.max_length, "chars": chars, "drop": cfg.train.drop_unsupported}
    n_proc = workers(cfg, len(rows))
    # A fingerprint of our own: Dataset.from_dict would hash the whole table with dill (seconds at a million rows,
    # and "Can't pickle MonthDayNano" with pyarrow 26 on Python 3.12). The cache key (cache_key) is ours anyway.
    rows_ds = Dataset(InMemoryTable.from_pydict(columns), fingerprint=f"prodesc-rows-{uuid.uuid4().hex}")
    ds = rows_ds.map(
        _fit_batch, batched=True, batch_size=BATCH, fn_kwargs=fit, remove_columns=list(columns),
        num_proc=n_proc if n_proc > 1 else None, desc="encoding examples" if len(rows) >= SMALL else None,
        new_fingerprint=f"prodesc-encode-{uuid.uuid4().hex}",  # hashing the tokenizer in fn_kwargs costs seconds
    )  # fmt: skip
    table = ds.data.table
    cut = {key: int(table.column(key).to_numpy().sum()) for key in CUT_KEYS}
    cut["examples_cut"] = int(table.column("any_cut").to_numpy().sum())
    ds = ds.select_columns(["input_ids", "completion_mask"])
    if cut["dropped"]:
        import numpy as np

        ds = ds.select(np.flatnonzero(table.column("dropped").to_numpy() == 0))
    return ds, cut


def _fit_batch(
    batch: dict[str, list], layout: prompts.Layout, max_length: int, chars: int, drop: str
) -> dict[str, list]:
    contents, near = batch["content"], batch.get("near")
    if drop != "off":  # answers keep only what the title (and the neighbours shown) support. Here, in the workers:
        # ~0.2 ms an answer, ~4 min of one core for the whole corpus (`near` is cut by _reach: `shown` reads the same)
        shown = near if drop == "prompt" and near else [[]] * len(contents)
        contents = [specs.keep_supported(c, prompts.shown(t, nb, chars))
                    for t, c, nb in zip(batch["title"], contents, shown, strict=True)]  # fmt: skip
    exs, cuts = layout.fit_batch(batch["title"], contents, max_length, near, chars)
    out: dict[str, list] = {
        "input_ids": [ex["input_ids"] if ex else [] for ex in exs],
        "completion_mask": [ex["completion_mask"] if ex else [] for ex in exs],
        "any_cut": [int(any(c.values())) for c in cuts],
    }
    for key in CUT_KEYS:
        out[key] = [c[key] for c in cuts]
    return out


def _reach(content: str | None, chars: int) -> str:
    """The start of a description that `prompts.clip(_, c)` cuts exactly as the whole for every c <= chars: the
    collapsed text up to chars + 2 characters (one past the cut, and a space there does not make it shorter)."""
    return " ".join(str(content or "").split())[: chars + 2].rstrip()


def _token_totals(ds: Any) -> dict[str, Any]:
    """Token totals, and percentiles of the answer lengths in tokens (EOS included: what the loss sees), which
    `generate.stop_boost_after: auto` reads from the run's manifest (rundir.length_prior)."""
    import numpy as np
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    per_example = np.concatenate([_answer_lengths(batch.column("completion_mask"))
                                  for batch in table.to_batches(max_chunksize=BATCH * 64)] or [np.zeros(0)])
    quantiles = {f"p{q}": int(np.percentile(per_example, q)) for q in ANSWER_PERCENTILES} if len(table) else {}
    return {
        "tokens": int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0),
        "supervised_tokens": int(per_example.sum()),
        "answer_tokens": quantiles,
    }


def _answer_lengths(mask: Any) -> Any:
    """Supervised tokens per example of one record batch (its completion_mask lists); a batch at a time, so the
    whole corpus's masks (~180M tokens) never sit in memory as one array."""
    import numpy as np
    import pyarrow.compute as pc

    flat = pc.list_flatten(mask).to_numpy(zero_copy_only=False)
    return np.bincount(pc.list_parent_indices(mask).to_numpy(), weights=flat, minlength=len(mask)).astype(np.int64)


def _store(path: Path, splits: dict[str, Any], stats: dict) -> None:
    """Written beside, then swapped into place (rundir.atomic_dir): a killed run leaves no half entry to read."""
    with rundir.atomic_dir(path, overwrite=True, what="encoded examples") as tmp:
        for name, ds in splits.items():
            if len(ds):  # an empty split is stored as its absence: datasets cannot read a table of no shards back
                ds.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _load_whole(path: Path) -> tuple[dict[str, Any], dict] | None:
    """The stored examples, or None when there are none or they are damaged (said, then encoded again: a cache)."""
    if not path.exists():
        return None
    try:
        splits, stats = _load(path)
        if len(splits["train"]) != stats["examples"]:
            raise ValueError(f"{len(splits['train'])} train examples, stats.json says {stats['examples']}")
        return splits, stats
    except Exception as e:  # noqa: BLE001 - whatever datasets or pyarrow raise on a damaged cache: rebuild it
        print(f"note: {path} is damaged ({type(e).__name__}: {str(e)[:100]}): encoding the examples again")
        return None


def _load(path: Path) -> tuple[dict[str, Any], dict]:
    from datasets import load_from_disk

    splits = {name: load_from_disk(str(path / name)) if (path / name).is_dir() else _empty()
              for name in ("train", "val")}
    return splits, json.loads((path / "stats.json").read_text())


def _empty() -> Any:
    """A split of no examples, with the columns of an encoded one."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "completion_mask": Sequence(Value("int8"))})
    return Dataset.from_dict({"input_ids": [], "completion_mask": []}, features=features)

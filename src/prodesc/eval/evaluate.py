"""`prodesc eval`: fine-tuned vs base vs retrieval on held-out items, with intervals and a report.

    prodesc eval --run runs/smol --data demo/data --split test --out reports/smol
    prodesc eval --predictions a.jsonl b.jsonl --out reports/ab      # score any system's predictions

Systems, all on the same items:
- finetuned: the run's base model with its adapter;
- base: the same model with the adapter switched off (the notebook's "before");
- retrieval: the description of the nearest training title by title embedding (retrieval.embedder, MiniLM by
  default), found by the same catalog search that gives a run with retrieval.k > 0 its neighbours: the top
  neighbour's text, as is (a trivial system to beat).
Runs with retrieval.k > 0 put the neighbours in the prompt of both finetuned and base (so base is "neighbours, no
training"). Test titles are looked up in DATA/index/ when `prodesc data index` wrote one.
Leak guard (`data.overlap`): refuses items whose family key, content or near-duplicate content the run trained on
(RUN_DIR/train_index.npz), unless --allow-overlap.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prodesc import rundir
from prodesc.catalog import Catalog, TitleVectors
from prodesc.config import EvalConfig, ProdescConfig, RetrievalConfig
from prodesc.data import check_overlap
from prodesc.errors import ProdescError
from prodesc.eval import metrics, report
from prodesc.generate import Generator
from prodesc.records import read_split


def evaluate_cli(
    out: Path,
    run: Path | None,
    data: Path | None,
    split: str,
    predictions: list[Path],
    allow_overlap: bool,
    overwrite: bool,
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> dict:
    """The `prodesc eval` verb: settings and arguments checked before any model loads."""
    if predictions:
        if run or data:
            raise ProdescError("--predictions scores files on their own: drop --run/--data")
        cfg = rundir.settings(None, config, flags, sets)
        return score_files(predictions, out, cfg.eval, overwrite=overwrite, settings=cfg)
    if run is None or data is None:
        raise ProdescError("pass --run RUN_DIR and --data DIR (or --predictions FILE.jsonl ...)")
    rundir.refuse_existing(out, overwrite, "report dir")
    cfg = rundir.settings(run, config, flags, sets)
    return evaluate(run, data, split, out, cfg, allow_overlap=allow_overlap, overwrite=overwrite)


def evaluate(
    run: Path,
    data: Path,
    split: str,
    out: Path,
    cfg: ProdescConfig,
    allow_overlap: bool = False,
    overwrite: bool = False,
) -> dict:
    """Generate with each system on `data/split`, score, write `out`; returns metrics.json's content."""
    items = read_split(data, split, cfg.eval.limit)
    check_overlap(run, items, allow_overlap)
    systems = _predict(run, data, items, cfg)
    scores, diffs = metrics.score_and_compare(systems, cfg.eval)
    meta = {
        "run": str(run),
        "data": str(data),
        "split": split,
        "items": len(items),
        "decoding": cfg.generate.model_dump(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report.write_report(out, scores, systems, diffs, meta, overwrite=overwrite, cfg=cfg)
    print_table(scores)
    print(f"report: {out / 'report.html'}")
    return scores


def score_files(
    files: list[Path], out: Path, cfg: EvalConfig, overwrite: bool = False, settings: ProdescConfig | None = None
) -> dict:
    """`prodesc eval --predictions A.jsonl B.jsonl`: score JSONL files (system = file stem), write a report.

    Files that hold different items are aligned on the items they share (same title, same occurrence of
    it), in the first file's order, so the comparison stays paired; the report's meta says how many were kept.
    `cfg.limit` keeps the first N aligned items; `cfg.systems` does not apply here.
    """
    if not files:
        raise ProdescError(
            "no prediction files given: pass --predictions FILE.jsonl (repeat for more systems)"
        )
    names = [Path(f).stem for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProdescError(
            f"two prediction files share the name {dupes[0]!r}: rename one (system = file stem)"
        )
    metrics.refuse_existing(out, overwrite)
    systems = {name: metrics.read_predictions(Path(f)) for name, f in zip(names, files, strict=True)}
    systems, note = metrics.align(systems, files)
    if cfg.limit is not None:
        systems = {k: v[: cfg.limit] for k, v in systems.items()}
    scores, diffs = metrics.score_and_compare(systems, cfg)
    meta = {
        "predictions": ", ".join(str(f) for f in files),
        "items": f"{len(next(iter(systems.values())))} ({note})",
        "embedder": cfg.embedder,
        "bootstrap": f"{cfg.bootstrap_samples} resamples, seed {cfg.seed}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    report.write_report(out, scores, systems, diffs, meta=meta, overwrite=overwrite, cfg=settings)
    return scores


def _predict(run: Path, data: Path, items: list[dict], cfg: ProdescConfig) -> dict[str, list[dict]]:
    titles = [it["title"] for it in items]
    systems: dict[str, list[dict]] = {}
    wanted = cfg.eval.systems
    if "finetuned" in wanted or "base" in wanted:
        # merge=False keeps the adapter separable, so `base` reuses the same weights with it switched off
        gen = Generator.from_run(run, cfg, merge=False)
        gen.use_data_index(data)
        for name, adapter in (("finetuned", True), ("base", False)):
            if name in wanted:
                print(f"generating {len(titles)} descriptions with {name}")
                systems[name] = gen.describe(titles, cfg.generate, progress=True, adapter=adapter)
        catalog = gen.catalog
        del gen
    else:
        catalog = Generator.catalog_of(run, cfg)
    if "retrieval" in wanted:
        systems["retrieval"] = retrieval(read_split(data, "train"), titles, cfg.retrieval.embedder, catalog, data)
    # copy_rate reads, for every system, the neighbours the model's prompts showed (none for a run without them)
    shown = next(([metrics.neighbour_texts(r) for r in systems[n]] for n in ("finetuned", "base") if n in systems),
                 [[] for _ in items])
    for recs in systems.values():
        for rec, it, texts in zip(recs, items, shown, strict=True):
            rec["reference"] = it["content"]
            rec["neighbour_texts"] = texts
    return {name: systems[name] for name in wanted if name in systems}


def retrieval(
    train_rows: list[dict],
    titles: list[str],
    embedder: str,
    catalog: Catalog | None = None,
    data: Path | None = None,
) -> list[dict[str, Any]]:
    """Nearest training title (cosine of title embeddings) → that record's description. Searches `catalog` (a
    run's own) when given, else one built from `train_rows`; titles of `data` are looked up in its index (DATA/index/:
    no title embedded again). The search goes SEARCH_CHUNK titles at a time, so memory does not grow with
    test size x train size."""
    if catalog is None:
        cfg = RetrievalConfig(embedder=embedder)
        catalog = Catalog.build(train_rows, TitleVectors.for_data(data, cfg), cfg)
        catalog.share_graph(data)  # the graph training (or an earlier eval) built for the same train split
    catalog.use_data_index(data)
    catalog.ready()  # the index is built before the clock starts: latency_ms is the queries' alone
    t0 = time.perf_counter()
    near = catalog.neighbours(titles, 1)
    ms = (time.perf_counter() - t0) * 1000 / max(len(titles), 1)
    return [
        {
            "title": t,
            "prediction": nb[0]["content"] if nb else "",
            "n_tokens": None,
            "stopped_by_eos": None,
            "latency_ms": round(ms, 1),
            "neighbour": nb[0]["title"] if nb else None,
            "neighbours": [{"uid": n["uid"], "title": n["title"], "score": n["score"]} for n in nb],
        }
        for t, nb in zip(titles, near, strict=True)
    ]


def print_table(scores: dict) -> None:
    cols = [
        "rougeL",
        "semantic_similarity",
        "chrf",
        "eos_stop_rate",
        "length_ratio",
        "spec_precision",
        "spec_recall",
        "false_spec_rate",
        "attribute_contradiction_rate",
    ]
    short = ["rougeL", "semantic", "chrF", "eos%", "len%", "specP%", "specR%", "falseS%", "contra%"]
    print("\n" + f"{'system':<12}" + "".join(f"{c:>10}" for c in short))
    for name, s in scores.items():
        vals = [s.get(c) for c in cols]
        print(
            f"{name:<12}"
            + "".join(f"{v:>10.1f}" if isinstance(v, int | float) else f"{'-':>10}" for v in vals)
        )

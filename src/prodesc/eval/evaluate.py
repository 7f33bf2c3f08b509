"""`prodesc eval`: fine-tuned vs base vs retrieval on held-out items, with intervals and a report.

    prodesc eval --run runs/smol --data demo/data --split test --out reports/smol
    prodesc eval --predictions a.jsonl b.jsonl --out reports/ab      # score any system's predictions

Systems, all on the same items:
- finetuned: the run's base model with its adapter;
- base: the same model with the adapter switched off (the notebook's "before");
- retrieval: the description of the nearest training title by MiniLM embedding (a trivial system to beat).
Leak guard: refuses when test families appear in the run's training families (manifest), unless --allow-overlap.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prodesc import config as configmod
from prodesc.config import EvalConfig, ProdescConfig
from prodesc.embedder import load_embedder
from prodesc.errors import ProdescError
from prodesc.eval import metrics, report
from prodesc.generate import Generator
from prodesc.records import read_split
from prodesc.rundir import train_families


def evaluate_cli(
    out: Path,
    run: Path | None,
    data: Path | None,
    split: str,
    predictions: list[Path],
    allow_overlap: bool,
    overwrite: bool,
    config: Path | None,
    overrides: list[str],
    trust_remote_code: bool = False,
) -> dict:
    """The `prodesc eval` verb."""
    if predictions:
        if run or data:
            raise ProdescError("--predictions scores files on their own: drop --run/--data")
        cfg = configmod.load(config, overrides)
        return score_files(predictions, out, cfg.eval, overwrite=overwrite)
    if run is None or data is None:
        raise ProdescError("pass --run RUN_DIR and --data DIR (or --predictions FILE.jsonl ...)")
    if out.exists() and not overwrite:
        raise ProdescError(f"report dir {out} already exists: pass --overwrite or choose another --out")
    cfg = configmod.load(config or run / "config.yaml", overrides)
    opts = dict(allow_overlap=allow_overlap, overwrite=overwrite, trust_remote_code=trust_remote_code)
    return evaluate(run, data, split, out, cfg, **opts)


def evaluate(
    run: Path,
    data: Path,
    split: str,
    out: Path,
    cfg: ProdescConfig,
    allow_overlap: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Generate with each system on `data/split`, score, write `out`; returns metrics.json's content."""
    items = read_split(data, split, cfg.eval.limit)
    _leak_guard(run, items, allow_overlap)
    systems = _predict(run, data, items, cfg, trust_remote_code)
    scores, diffs = metrics.score_and_compare(systems, cfg.eval)
    meta = {
        "run": str(run),
        "data": str(data),
        "split": split,
        "items": len(items),
        "decoding": cfg.generate.model_dump(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report.write_report(out, scores, systems, diffs, meta, overwrite=overwrite)
    print_table(scores)
    print(f"report: {out / 'report.html'}")
    return scores


def score_files(files: list[Path], out: Path, cfg: EvalConfig, overwrite: bool = False) -> dict:
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
    report.write_report(out, scores, systems, diffs, meta=meta, overwrite=overwrite)
    return scores


def _leak_guard(run: Path, items: list[dict], allow_overlap: bool) -> None:
    trained = train_families(run)
    overlap = sorted({it["family"] for it in items} & trained)
    if overlap and not allow_overlap:
        raise ProdescError(
            f"{len(overlap)} of the evaluated families were in the run's training data (e.g. {overlap[0]!r}): "
            "evaluate on a split prepared together with the training data, or pass --allow-overlap"
        )
    if overlap:
        print(f"warning: {len(overlap)} evaluated families were trained on (--allow-overlap)")


def _predict(run: Path, data: Path, items: list[dict], cfg: ProdescConfig, trust: bool) -> dict[str, list[dict]]:
    titles = [it["title"] for it in items]
    systems: dict[str, list[dict]] = {}
    wanted = cfg.eval.systems
    if "finetuned" in wanted or "base" in wanted:
        # merge=False keeps the adapter separable, so `base` reuses the same weights with it switched off
        gen = Generator.from_run(run, merge=False, trust_remote_code=trust)
        gen.cfg = cfg
        for name, adapter in (("finetuned", True), ("base", False)):
            if name in wanted:
                print(f"generating {len(titles)} descriptions with {name}")
                systems[name] = gen.describe(titles, cfg.generate, progress=True, adapter=adapter)
        del gen
    if "retrieval" in wanted:
        systems["retrieval"] = retrieval(read_split(data, "train"), titles, cfg.eval.embedder)
    for recs in systems.values():
        for rec, it in zip(recs, items, strict=True):
            rec["reference"] = it["content"]
    return {name: systems[name] for name in wanted if name in systems}


def retrieval(train_rows: list[dict], titles: list[str], embedder: str) -> list[dict[str, Any]]:
    """Nearest training title by cosine of MiniLM embeddings → that record's description."""
    model = load_embedder(embedder)
    t0 = time.perf_counter()
    train_emb = model.encode(
        [r["title"] for r in train_rows],
        batch_size=256,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(train_rows) > 5000,
    )
    query = model.encode(titles, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    best = (query @ train_emb.T).argmax(axis=1)
    ms = (time.perf_counter() - t0) * 1000 / max(len(titles), 1)
    return [
        {
            "title": t,
            "prediction": train_rows[j]["content"],
            "n_tokens": None,
            "stopped_by_eos": None,
            "latency_ms": round(ms, 1),
            "neighbour": train_rows[j]["title"],
        }
        for t, j in zip(titles, best, strict=True)
    ]


def print_table(scores: dict) -> None:
    cols = [
        "rougeL",
        "semantic_similarity",
        "chrf",
        "bleu",
        "eos_stop_rate",
        "length_ratio",
        "attribute_contradiction_rate",
    ]
    short = ["rougeL", "semantic", "chrF", "BLEU", "eos%", "len%", "contra%"]
    print("\n" + f"{'system':<12}" + "".join(f"{c:>10}" for c in short))
    for name, s in scores.items():
        vals = [s.get(c) for c in cols]
        print(
            f"{name:<12}"
            + "".join(f"{v:>10.1f}" if isinstance(v, int | float) else f"{'-':>10}" for v in vals)
        )

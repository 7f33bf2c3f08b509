"""Score prediction records against references, with bootstrap 95% intervals and paired differences.

    prodesc eval --predictions finetuned.jsonl base.jsonl --out report/    # -> score_files(...)
    scores, diffs = score_and_compare({"finetuned": recs_a, "base": recs_b}, cfg.eval)

A record is `{"title", "prediction", "reference", "n_tokens", "stopped_by_eos", "latency_ms"}`; every
system's list holds the same items in the same order. All metrics are on a 0-100 scale:

- rouge1, rouge2, rougeL: rouge-score F1 with Porter stemming, mean over items (its tokenizer keeps
  [a-z0-9] only, so accented words split).
- bleu, chrf: sacrebleu corpus BLEU (13a, exp smoothing) and chrF (char order 6), computed from summed
  per-item sufficient statistics, which gives exactly `corpus_score` and makes resampling cheap.
- semantic_similarity: mean cosine x 100 of normalized MiniLM embeddings, prediction vs reference
  (an empty prediction scores 0).
- distinct1, distinct2: unique word n-grams / all word n-grams over all predictions (lowercased \\w+ words).
  For resampling, each occurrence of an n-gram seen c times in the whole corpus is credited 1/c, so the
  point value is exactly unique/total and a drawn-twice item does not look repetitive to itself.
- length_ratio: mean of prediction chars / reference chars x 100 (items with an empty reference skipped).
- eos_stop_rate: % of items whose generation stopped on EOS (not on max_new_tokens); items with
  stopped_by_eos None are skipped, and a system with no such item (retrieval) has no value.
- title_copy_rate: % of predictions that merely copy the title: the prediction has at most twice the title's
  words AND either contains the whole title (case- and whitespace-insensitive) or has ROUGE-L F1 >= 0.9
  against it. A long description that quotes the title is not a copy.
- attribute_contradiction_rate: % of all items whose prediction contradicts an attribute the title states
  (an item whose title states none counts as not contradicting). Rules: attributes.py. Per kind,
  the text contradicts the title when it states that kind of attribute and none of what it states agrees:
  * quantity: a number directly followed by a unit ("12 oz", "1.5 L", '10"'); compared within a unit family
    (mass, volume, length, power...) after conversion, 3% tolerance. "in" before a digit ("2 in 1") and an
    upper-case "M" ("3M") are not units.
  * colour: colour words mapped to families (navy -> blue, teal -> blue+green); they agree when families
    overlap. Titles saying multicolor/assorted are not checked.
  * size: "size X"/"size: X" (letters, words or numbers), "(Large)", and letter codes XS/XL/XXL/2XL anywhere.
  * pack count: "3-pack", "3 pk", "12 count", "6 pieces", "pack/set/box/case of 3" (number words too).
  A heuristic: brand names ("Black & Decker") and prose ("holds two pieces") can raise false alarms.
- spec_precision, spec_recall, false_spec_rate: the specifics of a text (numbers with or without units, model and
  part codes, colours, platforms) and when a text supports one are defined in `prodesc/specs.py`. Precision: all
  distinct specifics the predictions state, the share their own title or reference supports (items stating none
  carry no weight). Recall: all distinct specifics of the references that their title does not already state, the
  share the prediction states. False-spec rate: % of items whose prediction states at least one specific that
  neither its title nor its reference supports (an item stating none counts as clean).
- copy_rate: all word 4-grams of the predictions (lowercased \\w+ words), the share found in the texts of the item's
  catalog neighbours: the record's `neighbour_texts`, else the `text` of its `neighbours` (what the prompt showed).
  `prodesc eval` gives every system the same neighbours (the run's catalog, k >= 2), so the systems compare; items
  without neighbour texts carry no weight.

Intervals: percentile bootstrap over items (`bootstrap_samples` resamples, seeded). Every system is
resampled with the same item draws, so A - B differences are paired; corpus metrics are recomputed on
each draw from the summed statistics.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from prodesc import specs
from prodesc.config import EvalConfig
from prodesc.embedder import load_embedder
from prodesc.errors import ProdescError
from prodesc.eval.attributes import attribute_contradictions

METRICS = {
    "rouge1": "ROUGE-1 F1 (stemmed), mean over items",
    "rouge2": "ROUGE-2 F1 (stemmed), mean over items",
    "rougeL": "ROUGE-L F1 (stemmed), mean over items",
    "bleu": "sacrebleu corpus BLEU",
    "chrf": "sacrebleu corpus chrF",
    "semantic_similarity": "mean MiniLM cosine x 100, prediction vs reference",
    "distinct1": "unique / total words over all predictions",
    "distinct2": "unique / total word bigrams over all predictions",
    "length_ratio": "mean prediction chars / reference chars (100 = same length)",
    "eos_stop_rate": "% of generations that stopped on EOS, not on the token cap",
    "title_copy_rate": "% of predictions that only repeat the title (lower is better)",
    "attribute_contradiction_rate": "% of items contradicting a colour/size/quantity/pack count of the title",
    "spec_precision": "% of the specifics predictions state that their title or reference supports",
    "spec_recall": "% of the references' specifics (those not in the title) that the predictions state",
    "false_spec_rate": "% of predictions stating a specific found in neither the title nor the reference",
    "copy_rate": "% of the predictions' word 4-grams found in the item's catalog neighbours' texts",
}
LOWER_IS_BETTER = ("title_copy_rate", "attribute_contradiction_rate", "false_spec_rate")
REQUIRED_FIELDS = ("title", "prediction", "reference")
_CHUNK = 100  # resamples per matrix product: bounds memory at _CHUNK x n_items


def read_predictions(path: Path) -> list[dict]:
    """Read a predictions JSONL file; each line needs title, prediction and reference (strings).

    Anything else is a one-line error naming file:line: text that is not UTF-8 (UTF-16 from a Windows editor),
    bad JSON, JSON nested too deeply to parse, NaN/Infinity (not JSON: writing them back would make the report's
    prediction files invalid JSON)."""
    if not path.is_file():
        raise ProdescError(
            f"predictions file not found: {path}: pass a JSONL file written by `prodesc generate`"
        )
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            rec = _parse_prediction(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, f"{path}:{lineno}")
            if rec is not None:
                _check_record(rec, f"{path}:{lineno}")
                records.append(rec)
    if not records:
        raise ProdescError(f"no predictions in {path}: the file is empty")
    return records


def _parse_prediction(raw: bytes, where: str) -> Any:
    """One JSONL line as an object (None for a blank line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw
        raise ProdescError(
            f"{where}: not UTF-8 ({'UTF-16?' if utf16 else f'byte {e.start}'}): save the file as UTF-8 JSON lines"
        ) from None
    if not line.strip():
        return None
    try:
        return json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        hint = " (UTF-16?)" if "\x00" in line else ""
        raise ProdescError(f"bad JSON at {where}{hint} ({e.msg}): fix or delete that line") from None
    except _NotJSON as e:
        raise ProdescError(f"bad JSON at {where} ({e} is not JSON): write null or a number instead") from None
    except RecursionError:
        raise ProdescError(f"bad JSON at {where} (nested too deeply): fix or delete that line") from None


class _NotJSON(Exception):
    pass


def _no_constant(name: str) -> None:
    raise _NotJSON(name)


def score_and_compare(
    systems: dict[str, list[dict]], cfg: EvalConfig, pairs: list[tuple[str, str]] | None = None
) -> tuple[dict, dict]:
    """Scores (metrics.json shape) and paired differences, sharing one embedding pass and one set of draws."""
    stats = _all_stats(systems, cfg)
    draws = _bootstrap(stats, cfg.bootstrap_samples, cfg.seed)
    n = len(next(iter(systems.values())))
    scores = {name: _summary(n, stats[name], draws[name]) for name in systems}
    diffs = {}
    for a, b in pairs if pairs is not None else default_pairs(list(systems)):
        diffs[f"{a} - {b}"] = {
            m: _diff(stats[a][m], stats[b][m], m, draws[a][m], draws[b][m])
            for m in METRICS
            if m in stats[a] and m in stats[b]
        }
    return scores, diffs


def score_systems(systems: dict[str, list[dict]], cfg: EvalConfig) -> dict:
    """`{"<system>": {"n": int, "<metric>": float, ..., "ci95": {"<metric>": [lo, hi]}}}` (metrics.json)."""
    return score_and_compare(systems, cfg, pairs=[])[0]


def paired_table(
    systems: dict[str, list[dict]], cfg: EvalConfig, pairs: list[tuple[str, str]] | None = None
) -> dict:
    """`{"A - B": {"<metric>": {"diff": float, "ci95": [lo, hi]}}}` for `pairs` (default: `default_pairs`)."""
    return score_and_compare(systems, cfg, pairs=pairs)[1]


def default_pairs(names: list[str]) -> list[tuple[str, str]]:
    """finetuned minus every other system when there is one, else the first system minus the others."""
    first = "finetuned" if "finetuned" in names else names[0]
    return [(first, other) for other in names if other != first]


def item_stats(
    records: list[dict], embedder: Any = None, embeddings: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Per-item sufficient statistics `{metric: array (n_items, k)}`; a metric's value is `aggregate(sum)`.

    Pass `embeddings` (text -> unit vector) or an `embedder` with `.encode`; with neither,
    semantic_similarity is left out.
    """
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    stats = _rouge_stats(preds, refs)
    stats.update(_sacrebleu_stats(preds, refs))
    if embeddings is None and embedder is not None:
        embeddings = _embed(embedder, preds + refs)
    if embeddings is not None:
        sims = [
            0.0 if not p.strip() else 100.0 * float(embeddings[p] @ embeddings[r])
            for p, r in zip(preds, refs, strict=True)
        ]
        stats["semantic_similarity"] = _mean_stats(sims)
    for order in (1, 2):
        stats[f"distinct{order}"] = _distinct_stats(preds, order)
    stats["length_ratio"] = _mean_stats(
        [100.0 * len(p) / len(r) if r else None for p, r in zip(preds, refs, strict=True)]
    )
    eos = [r.get("stopped_by_eos") for r in records]
    if any(e is not None for e in eos):
        stats["eos_stop_rate"] = _mean_stats([None if e is None else 100.0 * bool(e) for e in eos])
    stats["title_copy_rate"] = _mean_stats(
        [100.0 * is_title_copy(r["title"], p) for r, p in zip(records, preds, strict=True)]
    )
    flags = [attribute_contradictions(r["title"], p) for r, p in zip(records, preds, strict=True)]
    for r, f in zip(records, flags, strict=True):
        r["contradictions"] = f  # kept on the record: the report lists them without recomputing
    stats["attribute_contradiction_rate"] = _mean_stats([100.0 * bool(f) for f in flags])
    stats.update(_spec_stats(records))
    return {m: stats[m] for m in METRICS if m in stats}


def _spec_stats(records: list[dict]) -> dict[str, np.ndarray]:
    """Ratio metrics as [100 x hits, count] rows (aggregate: summed hits / summed counts); see the docstring."""
    counts = [specs.support_counts(r["prediction"], r["title"], r["reference"]) for r in records]
    for r, c in zip(records, counts, strict=True):
        r["invented"] = c["invented"]  # kept on the record: the report marks them without recomputing
    out = {
        "spec_precision": np.array([[100.0 * c["supported"], c["stated"]] for c in counts]).reshape(-1, 2),
        "spec_recall": np.array([[100.0 * c["ref_new_stated"], c["ref_new"]] for c in counts]).reshape(-1, 2),
        "false_spec_rate": _mean_stats([100.0 * (c["stated"] > c["supported"]) for c in counts]),
    }
    copied = [_copied(r["prediction"], texts) if (texts := neighbour_texts(r)) else None for r in records]
    if any(c is not None for c in copied):
        out["copy_rate"] = np.array([[100.0 * c[0], c[1]] if c else [0.0, 0.0] for c in copied]).reshape(-1, 2)
    return out


def neighbour_texts(record: dict) -> list[str]:
    """The neighbour texts copy_rate reads: `neighbour_texts`, else the `text` of each of `neighbours`."""
    if record.get("neighbour_texts"):
        return [str(t) for t in record["neighbour_texts"]]
    return [str(n["text"]) for n in record.get("neighbours") or [] if isinstance(n, dict) and n.get("text")]


def aggregate(metric: str, summed: np.ndarray) -> np.ndarray:
    """Metric values from summed statistics, shape (..., k) -> (...); NaN where undefined (no weight)."""
    summed = np.atleast_2d(summed)
    if metric in ("bleu", "chrf"):
        scorer = _sacrebleu_metrics()[metric]
        return np.array([scorer._compute_score_from_stats(row.tolist()).score for row in summed])
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = 100.0 if metric.startswith("distinct") else 1.0
        return np.where(summed[:, 1] > 0, scale * summed[:, 0] / summed[:, 1], np.nan)


def paired_diff(
    stats_a: np.ndarray, stats_b: np.ndarray, metric: str, samples: int = 1000, seed: int = 0
) -> dict:
    """Mean difference A - B of one metric on the same items and its paired 95% percentile interval.

    `stats_a`/`stats_b` are `item_stats(...)[metric]` of the two systems; corpus metrics are recomputed
    on each joint resample of item indices.
    """
    if len(stats_a) != len(stats_b):
        raise ValueError(f"paired_diff needs the same items: {len(stats_a)} vs {len(stats_b)}")
    draws = _bootstrap({"a": {metric: stats_a}, "b": {metric: stats_b}}, samples, seed)
    return _diff(stats_a, stats_b, metric, draws["a"][metric], draws["b"][metric])


def bootstrap_ci(stats: np.ndarray, metric: str, samples: int = 1000, seed: int = 0) -> list[float]:
    """Percentile 95% interval of one metric from its per-item statistics."""
    return _ci(_bootstrap({"s": {metric: stats}}, samples, seed)["s"][metric])


def is_title_copy(title: str, prediction: str) -> bool:
    """True when the prediction only repeats the title (see the module docstring for the exact rule)."""
    t, p = " ".join(title.casefold().split()), " ".join(prediction.casefold().split())
    if not t or not p or len(p.split()) > 2 * len(t.split()):
        return False
    return t in p or _rouge_scorers()[1].score(title, prediction)["rougeL"].fmeasure >= 0.9


# --- validation and alignment ---


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise ProdescError(f"{where}: expected a JSON object with title, prediction and reference")
    for field in REQUIRED_FIELDS:
        if field not in rec:
            raise ProdescError(
                f"{where}: missing field {field!r}: every record needs title, prediction, reference"
            )
        if not isinstance(rec[field], str):
            raise ProdescError(f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}")


def _validate(systems: dict[str, list[dict]]) -> None:
    if not systems:
        raise ProdescError("no systems to score: pass at least one list of predictions")
    first, ref = next(iter(systems.items()))
    if not ref:
        raise ProdescError(f"system {first!r} has no items: nothing to score")
    for name, records in systems.items():
        for i, rec in enumerate(records):
            _check_record(rec, f"system {name!r} item {i + 1}")
        if len(records) != len(ref):
            raise ProdescError(
                f"systems {first!r} and {name!r} have {len(ref)} and {len(records)} items: score the same"
            )
        for i, (a, b) in enumerate(zip(ref, records, strict=True)):
            for field in ("title", "reference"):
                if a[field] != b[field]:
                    raise ProdescError(
                        f"system {name!r} item {i + 1}: {field} differs from {first!r} ({b[field][:60]!r}): "
                        "every system must hold the same items in the same order"
                    )


def align(systems: dict[str, list[dict]], files: list[Path]) -> tuple[dict[str, list[dict]], str]:
    """Keep the items every file has, keyed by (title, k-th occurrence), in the first file's order."""

    def keyed(records: list[dict]) -> dict[tuple[str, int], dict]:
        seen: Counter = Counter()
        out = {}
        for r in records:
            out[(r["title"], seen[r["title"]])] = r
            seen[r["title"]] += 1
        return out

    by_key = {name: keyed(recs) for name, recs in systems.items()}
    first = next(iter(by_key.values()))
    common = [k for k in first if all(k in other for other in by_key.values())]
    if not common:
        raise ProdescError(
            f"{', '.join(map(str, files))} share no title: predictions must describe the same items"
        )
    sizes = {name: len(recs) for name, recs in systems.items()}
    if all(s == len(common) for s in sizes.values()):
        return {name: [by_key[name][k] for k in common] for name in systems}, "same items in every file"
    note = "aligned on shared titles; file sizes " + ", ".join(f"{k} {v}" for k, v in sizes.items())
    return {name: [by_key[name][k] for k in common] for name in systems}, note


def refuse_existing(out: Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise ProdescError(f"output directory {out} already exists: pass --overwrite or choose another --out")


# --- statistics per item ---


def _all_stats(systems: dict[str, list[dict]], cfg: EvalConfig) -> dict[str, dict[str, np.ndarray]]:
    _validate(systems)
    texts = {t for recs in systems.values() for r in recs for t in (r["prediction"], r["reference"])}
    embeddings = _embed(load_embedder(cfg.embedder), sorted(texts))
    return {name: item_stats(recs, embeddings=embeddings) for name, recs in systems.items()}


def _embed(embedder: Any, texts: list[str]) -> dict[str, np.ndarray]:
    unique = sorted(set(texts))
    vectors = embedder.encode(unique, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    return dict(zip(unique, np.asarray(vectors, dtype=np.float64), strict=True))


def _mean_stats(values: list[float | None]) -> np.ndarray:
    """[value, weight] rows; None (not applicable) gets weight 0 so it is skipped by the mean."""
    return np.array([[0.0, 0.0] if v is None else [float(v), 1.0] for v in values])


def _rouge_stats(preds: list[str], refs: list[str]) -> dict[str, np.ndarray]:
    scorer = _rouge_scorers()[0]
    rows = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {m: _mean_stats([100.0 * row[m].fmeasure for row in rows]) for m in ("rouge1", "rouge2", "rougeL")}


def _sacrebleu_stats(preds: list[str], refs: list[str]) -> dict[str, np.ndarray]:
    return {
        name: np.array(scorer._extract_corpus_statistics(preds, [refs]), dtype=np.float64)
        for name, scorer in _sacrebleu_metrics().items()
    }


def _distinct_stats(preds: list[str], order: int) -> np.ndarray:
    grams = [_ngrams(re.findall(r"\w+", p.lower()), order) for p in preds]
    corpus = Counter(g for gs in grams for g in gs)
    return np.array([[sum(1.0 / corpus[g] for g in gs), float(len(gs))] for gs in grams]).reshape(-1, 2)


def _copied(prediction: str, texts: list[str], order: int = 4) -> tuple[int, int]:
    """(the prediction's word n-grams found in `texts`, all its word n-grams), words as distinct-n reads them."""
    grams = _ngrams(re.findall(r"\w+", prediction.lower()), order)
    pool = {g for t in texts for g in _ngrams(re.findall(r"\w+", t.lower()), order)}
    return sum(g in pool for g in grams), len(grams)


def _ngrams(words: list[str], order: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + order]) for i in range(len(words) - order + 1)]


@functools.cache
def _rouge_scorers():
    from rouge_score import rouge_scorer

    return (
        rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True),
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True),
    )


@functools.cache
def _sacrebleu_metrics() -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(), "chrf": CHRF()}


# --- bootstrap ---


def _bootstrap(
    stats: dict[str, dict[str, np.ndarray]], samples: int, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """Metric values on `samples` resamples of the items, the same draws for every system and metric."""
    n = len(next(iter(next(iter(stats.values())).values())))
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, list[np.ndarray]]] = {s: {m: [] for m in st} for s, st in stats.items()}
    for start in range(0, samples, _CHUNK):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, samples - start)).astype(
            np.float64
        )
        for system, per_metric in stats.items():
            for metric, arr in per_metric.items():
                parts[system][metric].append(aggregate(metric, weights @ arr))
    return {s: {m: np.concatenate(v) for m, v in per.items()} for s, per in parts.items()}


def _summary(n: int, stats: dict[str, np.ndarray], draws: dict[str, np.ndarray]) -> dict:
    out: dict[str, Any] = {"n": n, "ci95": {}}
    for metric, arr in stats.items():
        value = float(aggregate(metric, arr.sum(axis=0))[0])
        if np.isnan(value):
            continue  # no item carries this metric (e.g. only empty references)
        out[metric] = value
        out["ci95"][metric] = _ci(draws[metric])
    return out


def _diff(
    stats_a: np.ndarray, stats_b: np.ndarray, metric: str, draws_a: np.ndarray, draws_b: np.ndarray
) -> dict:
    point = aggregate(metric, stats_a.sum(axis=0))[0] - aggregate(metric, stats_b.sum(axis=0))[0]
    return {"diff": float(point), "ci95": _ci(draws_a - draws_b)}


def _ci(values: np.ndarray) -> list[float]:
    if np.all(np.isnan(values)):
        return [float("nan"), float("nan")]
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]

"""Score one catalog's study (bench/quality_gpu.sh `score`): retrieval on the same items, every system's metrics with
paired intervals against retrieval and the plain fine-tune, a report, and bench/results/quality-<catalog>-DATE.json.

    python bench/quality_score.py --data .qgpu/data/abt --results .qgpu/results/qgpu-abt-preset-plain \
        --catalog abt --preset preset --plain plain [--json bench/results/quality-abt-20261206.json]

Every system is scored on the items all its files share. copy_rate reads the same neighbour texts for every system:
those the preset's prompts showed (its records' `neighbours[].text`), so a system without neighbours (the plain
fine-tune, retrieval) is measured against the same catalog items.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from prodesc.config import EvalConfig
from prodesc.eval import metrics, report
from prodesc.eval.evaluate import retrieval
from prodesc.records import read_split

SHOWN = ["rougeL", "semantic_similarity", "chrf", "spec_precision", "spec_recall", "false_spec_rate", "copy_rate",
         "eos_stop_rate", "length_ratio"]
JSON_METRICS = ["rougeL", "semantic_similarity", "chrf", "spec_precision", "spec_recall", "false_spec_rate",
                "copy_rate", "eos_stop_rate"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the prepared data dir the predictions come from")
    p.add_argument("--results", type=Path, required=True, help="a dir of <system>.jsonl files (an unpacked tarball)")
    p.add_argument("--catalog", required=True, help="catalog name for the results file (abt, lf_amazon, ...)")
    p.add_argument("--preset", default="preset", help="the system the paired differences start from")
    p.add_argument("--plain", default="plain", help="the plain fine-tune (k=0) to compare with")
    p.add_argument("--skip", default="base_k", help="leave out systems whose name starts with this")
    p.add_argument("--json", type=Path, help="write the issue's results shape here")
    p.add_argument("--bootstrap", type=int, default=1000)
    a = p.parse_args()

    systems = {f.stem: metrics.read_predictions(f) for f in sorted(a.results.glob("*.jsonl"))
               if f.stem != "retrieval" and not (a.skip and f.stem.startswith(a.skip))}
    if a.preset not in systems:
        sys.exit(f"no {a.preset}.jsonl in {a.results}: pass --preset NAME")
    items = {r["title"]: r["content"] for r in read_split(a.data, "test")}
    titles = [r["title"] for r in systems[a.preset]]
    recs = retrieval(read_split(a.data, "train"), titles, "embedded:all-minilm-l6-v2", data=a.data)
    systems["retrieval"] = recs
    shown = {r["title"]: [n["text"] for n in r.get("neighbours") or [] if n.get("text")] for r in systems[a.preset]}
    for rs in systems.values():
        for r in rs:
            r["reference"] = items[r["title"]]
            r["neighbour_texts"] = shown.get(r["title"]) or []
    names = [a.preset, *(n for n in systems if n != a.preset)]
    systems, note = metrics.align({n: systems[n] for n in names}, [a.results / f"{n}.jsonl" for n in names])
    pairs = [(a.preset, "retrieval")] + ([(a.preset, a.plain)] if a.plain in systems and a.plain != a.preset else [])
    pairs += [(n, "retrieval") for n in systems if n not in (a.preset, "retrieval")]
    pairs += [(n, a.plain) for n in systems if n not in (a.preset, a.plain, "retrieval") and a.plain in systems]
    cfg = EvalConfig(bootstrap_samples=a.bootstrap)
    scores, diffs = metrics.score_and_compare(systems, cfg, pairs)
    out = a.results / "report"
    meta = {"catalog": a.catalog, "items": f"{len(titles)} ({note})", "date": datetime.now(UTC).strftime("%Y-%m-%d")}
    report.write_report(out, scores, systems, diffs, meta, overwrite=True)
    _print(scores, diffs)
    if a.json:
        _write_json(a.json, a.catalog, scores, diffs, a.preset, a.plain)
        print(f"wrote {a.json}")
    print(f"report: {out / 'report.html'}")


def _print(scores: dict, diffs: dict) -> None:
    print(f"\n{'system':<22}" + "".join(f"{c[:10]:>11}" for c in SHOWN))
    for s, v in scores.items():
        print(f"{s:<22}" + "".join(f"{v[c]:>11.1f}" if isinstance(v.get(c), int | float) else f"{'-':>11}"
                                   for c in SHOWN))
    for pair, v in diffs.items():
        print(f"{pair:<28}" + "  ".join(f"{c[:8]} {v[c]['diff']:+.1f} [{v[c]['ci95'][0]:+.1f}, {v[c]['ci95'][1]:+.1f}]"
                                       for c in SHOWN[:6] if c in v))


def _write_json(path: Path, catalog: str, scores: dict, diffs: dict, preset: str, plain: str) -> None:
    """The issue's shape: systems renamed preset/plain/retrieval (others kept), paired preset-retrieval/-plain."""
    rename = {preset: "preset", plain: "plain"}
    body = {
        "catalog": catalog,
        "n": next(iter(scores.values()))["n"],
        "systems": {rename.get(s, s): {m: round(v[m], 2) for m in JSON_METRICS if m in v} for s, v in scores.items()},
        "paired": {},
    }
    for key, other in (("preset-retrieval", "retrieval"), ("preset-plain", plain)):
        d = diffs.get(f"{preset} - {other}")
        if d:
            body["paired"][key] = {m: {"diff": round(d[m]["diff"], 2), "ci95": [round(x, 2) for x in d[m]["ci95"]]}
                                   for m in JSON_METRICS if m in d}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")


if __name__ == "__main__":
    main()

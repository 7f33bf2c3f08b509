"""`prodesc demo`, the end of `make demo`: before-vs-after examples and the eval table of the demo run.

    prodesc demo --run demo/run --data demo/data --out demo/report
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from prodesc import rundir
from prodesc.eval.evaluate import evaluate, print_table


def main(run: Path, data: Path, out: Path, limit: int = 12, max_new_tokens: int = 128) -> None:
    """Score base vs fine-tuned vs retrieval on `limit` test items; print 3 examples side by side (with the
    catalog neighbours both saw), then the table."""
    flags = {"eval.limit": limit, "generate.max_new_tokens": max_new_tokens, "eval.bootstrap_samples": 200}
    cfg = rundir.settings(run, flags=flags)
    scores = evaluate(run, data, "test", out, cfg, overwrite=True)
    preds = {s: _read(out / "predictions" / f"{s}.jsonl") for s in ("base", "finetuned")}
    print("\n=== before (base) vs after (fine-tuned), first 3 test titles ===")
    for before, after in list(zip(preds["base"], preds["finetuned"], strict=True))[:3]:
        print(f"\n# {after['title']}")
        for i, n in enumerate(after.get("neighbours", []), 1):  # what both saw in the prompt
            print(_block(f"[{i}]", f"{n['title']} (cosine {n['score']:.2f})"))
        print(_block("before", before["prediction"]))
        print(_block("after", after["prediction"]))
        if after.get("unsupported"):
            print(_block("check", ", ".join(after["unsupported"])))
        print(_block("reference", after["reference"]))
    print(f"\n=== eval on {limit} held-out items (full report: {out / 'report.html'}) ===")
    print_table(scores)
    flagged = [r for r in preds["finetuned"] if r.get("unsupported")]
    print(f"\nflagged for review: {len(flagged)} of {len(preds['finetuned'])} fine-tuned answers state specifics "
          "found neither in their title nor in the neighbours shown (`unsupported`, marked in report.html)")
    for r in flagged[:3]:
        print(_block("check", f"{', '.join(r['unsupported'])}  ({r['title']})"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _block(label: str, text: str) -> str:
    body = textwrap.shorten(text or "(empty)", width=300, placeholder=" ...")
    return textwrap.fill(body, width=100, initial_indent=f"  {label:>9}: ", subsequent_indent=" " * 13)

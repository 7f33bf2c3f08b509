"""The `eval` stage: fine-tuned vs base vs retrieval on held-out items, with paired bootstrap intervals.

    prodesc eval --run runs/smol --data demo/data --out reports/smol      # evaluate.evaluate_cli
    prodesc eval --predictions a.jsonl b.jsonl --out reports/ab           # evaluate.score_files

Inside: `evaluate` (systems, leak guard, retrieval baseline, the verb), `metrics` (per-item statistics, bootstrap),
`attributes` (attribute contradictions and their word tables), `report` (report.md, report.html, JSON files).
Imports go one way: evaluate → metrics/report → metrics → attributes.
"""

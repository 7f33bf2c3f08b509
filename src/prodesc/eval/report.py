"""Write an eval report directory atomically: metrics, predictions, a Markdown and a self-contained HTML page.

    write_report(Path("demo/report"), scores, systems, diffs, meta={"model": "...", "split": "test"})

Layout of `out/`:
    metrics.json        {"<system>": {"n": int, "<metric>": float, ..., "ci95": {"<metric>": [lo, hi]}}}
    paired_diffs.json   {"A - B": {"<metric>": {"diff": float, "ci95": [lo, hi]}}}
    predictions/<system>.jsonl
    report.md, report.html   (the HTML embeds its charts as base64 PNGs; nothing is fetched)

Everything is written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written report and `--overwrite` swaps the old one out only once the new one is complete.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from prodesc.config import ProdescConfig
from prodesc.eval.metrics import METRICS
from prodesc.rundir import atomic_dir, write_resolved

MD_EXAMPLES = 5
HTML_EXAMPLES = 10
FLAGGED_EXAMPLES = 10  # attribute contradictions (and invented specifics) listed per report
TEXT_CHARS = 600  # longer texts are cut in the examples (predictions/ keeps them whole)


def write_report(
    out: Path,
    scores: dict,
    systems: dict[str, list[dict]],
    diffs: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
    cfg: ProdescConfig | None = None,
) -> Path:
    """Write the report directory `out` (layout above, plus config.resolved.yaml when `cfg` is given); an existing
    one is refused unless overwrite."""
    out = Path(out)
    with atomic_dir(out, overwrite, "report dir") as tmp:
        _write_contents(tmp, scores, systems, diffs or {}, meta or {})
        if cfg is not None:
            write_resolved(cfg, tmp)
    return out


def _write_contents(
    folder: Path, scores: dict, systems: dict[str, list[dict]], diffs: dict, meta: dict
) -> None:
    (folder / "metrics.json").write_text(_json(scores), encoding="utf-8")
    (folder / "paired_diffs.json").write_text(_json(diffs), encoding="utf-8")
    (folder / "predictions").mkdir()
    for name, records in systems.items():
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (folder / "predictions" / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(scores, systems, diffs, meta), encoding="utf-8")
    (folder / "report.html").write_text(render_html(scores, systems, diffs, meta), encoding="utf-8")


# --- Markdown ---


def render_markdown(scores: dict, systems: dict[str, list[dict]], diffs: dict, meta: dict) -> str:
    """The report as Markdown: meta, metric table, paired differences, a few examples."""
    names = list(scores)
    lines = ["# prodesc eval report", ""]
    lines += [f"- **{k}**: {_one_line(_meta_value(v))}" for k, v in meta.items()] + [""]
    lines += ["## Metrics (value [95% CI])", "", _md_table(*_metric_rows(scores, names)), ""]
    if diffs:
        lines += ["## Paired differences (A - B on the same items, [95% CI]; * = interval excludes 0)", ""]
        lines += [_md_table(*_diff_rows(diffs)), ""]
    lines += ["## Metric definitions", ""] + [f"- `{m}`: {d}" for m, d in METRICS.items()] + [""]
    lines += ["## Examples", ""]
    for k, i in enumerate(_spread(len(next(iter(systems.values()))), MD_EXAMPLES), 1):
        first = systems[names[0]][i]
        lines += [
            f"### {k}. {_one_line(first['title'])}",
            "",
            f"- **reference**: {_one_line(first['reference'])}",
        ]
        for name in names:
            pred = systems[name][i]["prediction"]
            flags = systems[name][i].get("contradictions") or []
            lines.append(
                f"- **{name}**: {_one_line(pred)}" + (f" _(contradicts {'; '.join(flags)})_" if flags else "")
            )
        lines.append("")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), row(["---"] * len(header))] + [row(r) for r in rows])


# --- HTML ---


def render_html(scores: dict, systems: dict[str, list[dict]], diffs: dict, meta: dict) -> str:
    """The report as one self-contained HTML page (charts embedded as base64 PNGs, all text escaped)."""
    names = list(scores)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>prodesc eval report</title>", _CSS]
    parts += ["</head><body><h1>prodesc eval report</h1>"]
    parts.append(
        _html_table(["", ""], [[k, _meta_value(v)] for k, v in meta.items()], cls="meta") if meta else ""
    )
    parts += ["<h2>Metrics (value [95% CI])</h2>", _html_table(*_metric_rows(scores, names))]
    if diffs:
        parts += [
            "<h2>Paired differences</h2><p>A - B on the same items, [95% CI]; * = interval excludes 0.</p>"
        ]
        parts.append(_html_table(*_diff_rows(diffs)))
    parts += ["<h2>Charts</h2>", _img(_bar_chart(scores, names), "metrics with 95% intervals")]
    parts.append(_img(_length_histogram(systems), "prediction length vs reference"))
    parts += ["<h2>Metric definitions</h2><ul>"]
    parts += [f"<li><code>{_e(m)}</code>: {_e(d)}</li>" for m, d in METRICS.items()] + ["</ul>"]
    parts += ["<h2>Examples</h2>", _html_examples(systems, names), _html_invented(systems, names)]
    parts.append(_html_flagged(systems, names))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_examples(systems: dict[str, list[dict]], names: list[str]) -> str:
    out = []
    for i in _spread(len(systems[names[0]]), HTML_EXAMPLES):
        first = systems[names[0]][i]
        rows = [f"<tr><th>reference</th><td>{_e(_cut(first['reference']))}</td></tr>"]
        for name in names:
            rec = systems[name][i]
            flags = rec.get("contradictions") or []
            note = f"<div class='flag'>contradicts {_e('; '.join(flags))}</div>" if flags else ""
            rows.append(f"<tr><th>{_e(name)}</th><td>{marked(_cut(rec['prediction']), _to_mark(rec))}{note}</td></tr>")
        out.append(f"<div class='ex'><h3>{_e(first['title'])}</h3><table>{''.join(rows)}</table></div>")
    return "\n".join(out)


def marked(text: str, words: list[str]) -> str:
    """`text` escaped for HTML, each of `words` (as written in it) wrapped in <mark>: the specifics to check."""
    import re

    words = sorted({w for w in words if w}, key=len, reverse=True)
    if not words:
        return _e(text)
    pattern = re.compile("(" + "|".join(rf"(?<![\w]){re.escape(w)}(?![\w])" for w in words) + ")")
    parts = pattern.split(text)
    return "".join(f"<mark>{_e(p)}</mark>" if k % 2 else _e(p) for k, p in enumerate(parts))


def _to_mark(rec: dict) -> list[str]:
    """Specifics to mark: found in neither title nor reference (eval), else not in the prompt (generate's flag)."""
    return list(rec.get("invented") or rec.get("unsupported") or [])


def _html_invented(systems: dict[str, list[dict]], names: list[str]) -> str:
    rows = []
    for name in names:
        flagged = [r for r in systems[name] if r.get("invented")]
        for rec in flagged[:FLAGGED_EXAMPLES]:
            rows.append((name, rec["title"], rec["invented"], rec["prediction"]))
    if not rows:
        return "<h2>Invented specifics</h2><p>None found.</p>"
    head = (f"<h2>Invented specifics (first {FLAGGED_EXAMPLES} per system)</h2><p>Specifics a prediction states that "
            "neither its title nor its reference supports (<code>prodesc/specs.py</code>), marked.</p>")
    hdr = "".join(f"<th>{h}</th>" for h in ("system", "title", "invented", "prediction"))
    body = "".join(
        f"<tr><td>{_e(n)}</td><td>{_e(t)}</td><td>{_e(', '.join(i))}</td><td>{marked(_cut(p, 300), i)}</td></tr>"
        for n, t, i, p in rows
    )
    return f"{head}<table><thead><tr>{hdr}</tr></thead><tbody>{body}</tbody></table>"


def _html_flagged(systems: dict[str, list[dict]], names: list[str]) -> str:
    rows = []
    for name in names:
        for rec in systems[name]:
            flags = rec.get("contradictions") or []
            if flags and len(rows) < FLAGGED_EXAMPLES:
                rows.append([name, rec["title"], "; ".join(flags), _cut(rec["prediction"], 200)])
    if not rows:
        return "<h2>Attribute contradictions</h2><p>None found.</p>"
    head = f"<h2>Attribute contradictions (first {FLAGGED_EXAMPLES})</h2>"
    return head + _html_table(["system", "title", "contradicted", "prediction"], rows)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">"


def _bar_chart(scores: dict, names: list[str]) -> bytes:
    """One panel per metric: a bar per system with its 95% interval as the error bar."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    metrics = [m for m in METRICS if any(m in scores[s] for s in names)]
    cols = 4
    fig = Figure(figsize=(3.3 * cols, 2.6 * math.ceil(len(metrics) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(metrics) / cols), cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        have = [s for s in names if metric in scores[s]]
        values = [scores[s][metric] for s in have]
        ci = [scores[s]["ci95"].get(metric, [v, v]) for s, v in zip(have, values, strict=True)]
        err = [[_gap(v, lo) for v, (lo, _) in zip(values, ci, strict=True)]]
        err.append([_gap(hi, v) for v, (_, hi) in zip(values, ci, strict=True)])
        ax.bar(range(len(have)), values, yerr=err, capsize=4, color=[f"C{names.index(s)}" for s in have])
        ax.set_xticks(range(len(have)), have, rotation=15, fontsize=8)
        ax.set_title(metric, fontsize=9)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return _png(fig)


def _length_histogram(systems: dict[str, list[dict]]) -> bytes:
    """Words per prediction, one outline per system, over the references' distribution (grey)."""
    from matplotlib.figure import Figure

    first = next(iter(systems.values()))
    lengths = {name: [len(r["prediction"].split()) for r in recs] for name, recs in systems.items()}
    ref = [len(r["reference"].split()) for r in first]
    top = max([1] + ref + [x for v in lengths.values() for x in v])
    step = max(1, math.ceil(top / 30))  # whole words per bin, about 30 bins
    bins = list(range(0, top + 2 * step, step))
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.hist(ref, bins=bins, color="0.8", label="reference")
    for k, (name, values) in enumerate(lengths.items()):
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, color=f"C{k}", label=name)
    ax.set_xlabel("words")
    ax.set_ylabel("items")
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


# --- shared helpers ---


def _metric_rows(scores: dict, names: list[str]) -> tuple[list[str], list[list[str]]]:
    rows = [["n"] + [str(scores[s].get("n", "")) for s in names]]
    for metric in METRICS:
        if any(metric in scores[s] for s in names):
            rows.append(
                [metric] + [_with_ci(scores[s].get(metric), scores[s]["ci95"].get(metric)) for s in names]
            )
    return ["metric", *names], rows


def _diff_rows(diffs: dict) -> tuple[list[str], list[list[str]]]:
    labels = list(diffs)
    rows = []
    for metric in METRICS:
        if any(metric in diffs[label] for label in labels):
            cells = [_signed(diffs[label].get(metric)) for label in labels]
            rows.append([metric, *cells])
    return ["metric", *labels], rows


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and not any(map(math.isnan, ci)) else "")


def _signed(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{entry['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]{star}"


def _json(obj: Any) -> str:
    return json.dumps(_rounded(obj), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _rounded(obj: Any) -> Any:
    """Floats to 2 decimals; NaN (an undefined interval) and infinities to null, since JSON has neither."""
    if isinstance(obj, float):
        return round(obj, 2) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v) for v in obj]
    return obj


def _meta_value(value: Any) -> str:
    if isinstance(value, dict):  # e.g. decoding settings: "max_new_tokens=256, temperature=0.0"
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _spread(n: int, k: int) -> list[int]:
    """k item indices spread evenly over n (deterministic, so reports of one run are comparable)."""
    m = min(k, n)
    return sorted({round(j * (n - 1) / max(m - 1, 1)) for j in range(m)})


def _gap(a: float, b: float) -> float:
    return 0.0 if math.isnan(a - b) else max(a - b, 0.0)


def _one_line(text: Any) -> str:
    return _cut(" ".join(str(text).split()))


def _cut(text: str, limit: int = TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CSS = """<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top;font-size:.92em}thead th{background:#f2f2f2}table.meta thead{display:none}
img{max-width:100%;display:block;margin:1em 0}.ex{margin-bottom:1.5em}.ex h3{margin:.2em 0;font-size:1em}
.ex th{width:8em;background:#fafafa}.flag{color:#b00;font-size:.85em;margin-top:.3em}
mark{background:#ffd6d6;color:#900;padding:0 .1em}
</style>"""

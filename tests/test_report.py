"""`prodesc eval --predictions` end to end: JSONL in, report directory out; and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prodesc.config import EvalConfig
from prodesc.errors import ProdescError
from prodesc.eval.evaluate import score_files
from prodesc.eval.metrics import METRICS, read_predictions
from prodesc.eval.report import write_report

ITEMS = [
    ("Girls Ballet Tutu Neon Pink", "A neon pink tutu with soft tulle layers and an elastic waist."),
    ("Coffee Beans 12 oz", "Whole bean medium roast coffee in a resealable 12 oz bag."),
    ("Gel Pens, 3-Pack", "Three smooth gel pens with quick-drying ink and 0.7 mm tips."),
    ("Men's T-Shirt, Size M", "A classic crew neck cotton tee, size M, pre-shrunk."),
]
CFG = EvalConfig(bootstrap_samples=100)


def _write_jsonl(path: Path, predictions: list[str], items=ITEMS, eos: bool | None = True) -> Path:
    lines = [
        json.dumps(
            {
                "title": t,
                "prediction": p,
                "reference": r,
                "n_tokens": 9,
                "stopped_by_eos": eos,
                "latency_ms": 3.0,
                "neighbour_texts": ["A neon green tutu with soft tulle layers for dress-up play."],
            }
        )
        for (t, r), p in zip(items, predictions, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def two_files(tmp_path: Path) -> list[Path]:
    finetuned = [r for _, r in ITEMS[:3]] + ["A blue <script>alert(1)</script> shirt, size XL."]
    base = ["Girls Ballet Tutu Neon Pink", "A 16 oz bag.", "Pens.", "Shirt."]
    return [
        _write_jsonl(tmp_path / "finetuned.jsonl", finetuned),
        _write_jsonl(tmp_path / "base.jsonl", base),
    ]


def test_score_files_writes_metrics_predictions_and_reports(tmp_path, two_files):
    out = tmp_path / "report"
    score_files(two_files, out, CFG)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "paired_diffs.json", "predictions", "report.html", "report.md",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["base.jsonl", "finetuned.jsonl"]
    scores = json.loads((out / "metrics.json").read_text())
    assert set(scores) == {"finetuned", "base"}
    for entry in scores.values():
        assert set(entry) == {"n", "ci95", *METRICS} and entry["n"] == 4
        assert set(entry["ci95"]) == set(METRICS)
        assert all(round(v, 2) == v for k, v in entry.items() if k not in ("n", "ci95"))
    assert scores["base"]["title_copy_rate"] == 25.0
    assert scores["base"]["attribute_contradiction_rate"] == 25.0  # 16 oz vs 12 oz
    assert scores["base"]["false_spec_rate"] == 25.0 == scores["finetuned"]["false_spec_rate"]  # "16 oz", "blue"
    assert scores["finetuned"]["spec_recall"] == 100.0 and scores["base"]["spec_recall"] == 0.0  # "0.7 mm"
    assert scores["finetuned"]["copy_rate"] > scores["base"]["copy_rate"]  # "with soft tulle layers"
    diffs = json.loads((out / "paired_diffs.json").read_text())
    assert diffs["finetuned - base"]["rouge1"]["diff"] > 0
    page = (out / "report.html").read_text()
    assert "<img alt='metrics with 95% intervals' src=\"data:image/png;base64," in page
    assert "<table" in page and "<td>semantic_similarity</td>" in page and "finetuned - base" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "contradicts size: title M, text XL" in page
    assert "<mark>16 oz</mark>" in page  # the invented specific, marked where the prediction states it
    assert "| metric | finetuned | base |" in (out / "report.md").read_text()


def test_score_files_refuses_existing_out_unless_overwrite(tmp_path, two_files):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ProdescError, match="--overwrite"):
        score_files(two_files, out, CFG)
    score_files(two_files, out, CFG, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.jsonl", "finetuned.jsonl", "report"]


def test_score_files_aligns_files_on_shared_titles(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [r for _, r in ITEMS])
    b = _write_jsonl(tmp_path / "b.jsonl", ["x", "y"], items=[ITEMS[2], ITEMS[0]], eos=None)
    scores = score_files([a, b], tmp_path / "out", CFG)
    assert scores["a"]["n"] == scores["b"]["n"] == 2
    assert "eos_stop_rate" not in scores["b"]
    assert "aligned on shared titles" in (tmp_path / "out" / "report.md").read_text()


def test_read_predictions_names_file_and_line_of_bad_json(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", ["x"] * 4)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ProdescError, match=r"p\.jsonl:5"):
        read_predictions(path)


def test_read_predictions_requires_reference(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"title": "t", "prediction": "p"}) + "\n")
    with pytest.raises(ProdescError, match=r"p\.jsonl:1: missing field 'reference'"):
        read_predictions(path)


def test_score_files_reports_missing_file_and_duplicate_names(tmp_path, two_files):
    with pytest.raises(ProdescError, match="predictions file not found"):
        score_files([tmp_path / "nope.jsonl"], tmp_path / "out", CFG)
    with pytest.raises(ProdescError, match="share the name 'base'"):
        score_files([two_files[1], two_files[1]], tmp_path / "out", CFG)


def test_write_report_leaves_no_temp_dir_when_rendering_fails(tmp_path, monkeypatch):
    import prodesc.eval.report as report

    def boom(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "render_html", boom)
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "r", {"s": {"n": 0, "ci95": {}}}, {"s": []}, {})
    assert list(tmp_path.iterdir()) == []

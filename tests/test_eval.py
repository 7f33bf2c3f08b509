import json

import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.config import load
from prodesc.errors import ProdescError
from prodesc.eval import evaluate as evalmod


def test_eval_scores_three_systems_and_writes_the_report(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--run",
            str(tiny_run),
            "--data",
            str(tiny_data),
            "--limit",
            "6",
            "--set",
            "generate.max_new_tokens=8",
            "--set",
            "eval.bootstrap_samples=100",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {
        "config.resolved.yaml",
        "metrics.json",
        "paired_diffs.json",
        "predictions",
        "report.html",
        "report.md",
    }
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"finetuned", "base", "retrieval"}
    assert m["finetuned"]["n"] == 6 and "rougeL" in m["finetuned"]["ci95"]
    assert "eos_stop_rate" in m["finetuned"] and "eos_stop_rate" not in m["retrieval"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "base.jsonl",
        "finetuned.jsonl",
        "retrieval.jsonl",
    ]


def test_leak_guard_refuses_trained_items_with_count_and_examples(tiny_run, tiny_data, tmp_path):
    cfg = load(tiny_run / "config.resolved.yaml", ["eval.limit=3"])
    with pytest.raises(ProdescError, match=r"^3 of 3 evaluated items overlap .*--allow-overlap$") as err:
        evalmod.evaluate(tiny_run, tiny_data, "train", tmp_path / "r", cfg)
    assert str(err.value).count(" ~ training ") == 3 and not (tmp_path / "r").exists()


def test_existing_report_dir_is_refused(tiny_run, tiny_data, tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(ProdescError, match="--overwrite"):
        evalmod.evaluate_cli(tmp_path / "r", tiny_run, tiny_data, "test", [], False, False, None, [])


def test_retrieval_returns_the_nearest_training_description():
    train_rows = [
        {"title": "Girls Ballet Tutu Neon Pink", "content": "tutu text"},
        {"title": "Cast iron skillet 12 inch", "content": "skillet text"},
    ]
    recs = evalmod.retrieval(
        train_rows, ["Girls Ballet Tutu Neon Blue", "12 inch cast-iron pan"], "embedded:all-minilm-l6-v2"
    )
    assert [r["prediction"] for r in recs] == ["tutu text", "skillet text"]


def test_retrieval_looks_train_titles_up_in_the_data_index_and_times_only_the_queries(tiny_rag_data, monkeypatch):
    from prodesc import embedder
    from prodesc.catalog import Catalog
    from prodesc.records import read_split

    monkeypatch.setattr(embedder, "load_embedder", lambda *a: pytest.fail("a title of the data index embedded again"))
    built = []
    real_ready = Catalog.ready
    monkeypatch.setattr(Catalog, "ready", lambda self: built.append(self._index) or real_ready(self))
    test = read_split(tiny_rag_data, "test")[:20]
    recs = evalmod.retrieval(read_split(tiny_rag_data, "train"), [r["title"] for r in test],
                             "embedded:all-minilm-l6-v2", None, tiny_rag_data)  # fmt: skip
    assert built[0] is None  # the index was built before the clock started, not by the first query
    assert len(recs) == 20 and all(r["prediction"] and r["latency_ms"] is not None for r in recs)


def test_cli_scores_prediction_files_given_after_the_flag(tmp_path):
    recs = [{"title": f"t{i}", "prediction": f"a red bag number {i}", "reference": f"a red bag {i}"} for i in range(5)]
    for name in ("mine", "theirs"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--predictions",
            str(tmp_path / "mine.jsonl"),
            str(tmp_path / "theirs.jsonl"),
            "--set",
            "eval.bootstrap_samples=100",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert set(json.loads((out / "metrics.json").read_text())) == {"mine", "theirs"}


def test_cli_files_without_the_flag_are_refused(tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "--predictions" in res.output



_GOOD = b'{"title": "t0", "prediction": "a red bag", "reference": "a red bag"}\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_GOOD + b'{"title": "t", "prediction": "p", "reference": "caf\xe9"}\n', "mine.jsonl:2: not UTF-8 (byte 51)"),
        (_GOOD.decode().encode("utf-16"), "mine.jsonl:1: not UTF-8 (UTF-16?)"),
        (_GOOD + b'{"title": "t", "prediction": "p", "reference": "r", "latency_ms": NaN}\n', "2 (NaN is not JSON)"),
        (_GOOD + b'{"title": "t", "prediction": "p", "reference": "r", "x": ' + b"[" * 10**5 + b"]" * 10**5 + b"}",
         "mine.jsonl:2 (nested too deeply)"),
        (_GOOD + b'{"title": {"nested": "object"}, "prediction": "p", "reference": "r"}\n', "'title' must be a string"),
    ],
)
def test_bad_prediction_files_are_one_line_errors(tmp_path, body, message):
    (tmp_path / "mine.jsonl").write_bytes(body)
    res = CliRunner().invoke(
        app, ["eval", "--predictions", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "rep")]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
def test_rag_run_eval_gives_base_the_same_neighbours_and_retrieval_the_top_one(tiny_rag_run, tiny_rag_data, tmp_path):
    overrides = ["eval.limit=4", "generate.max_new_tokens=4", "eval.bootstrap_samples=100"]
    cfg = load(tiny_rag_run / "config.resolved.yaml", overrides)
    evalmod.evaluate(tiny_rag_run, tiny_rag_data, "test", tmp_path / "r", cfg)
    preds = {
        s: [json.loads(x) for x in (tmp_path / "r" / "predictions" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("finetuned", "base", "retrieval")
    }
    for tuned, base, ret in zip(preds["finetuned"], preds["base"], preds["retrieval"], strict=True):
        assert tuned["neighbours"] == base["neighbours"] and len(tuned["neighbours"]) == 2
        shown = {k: v for k, v in tuned["neighbours"][0].items() if k != "text"}  # retrieval shows no prompt
        assert ret["neighbours"] == [shown] and ret["neighbour"] == tuned["neighbours"][0]["title"]
        # copy_rate reads the same neighbour texts for every system: those the prompts showed
        assert ret["neighbour_texts"] == tuned["neighbour_texts"] == [n["text"] for n in tuned["neighbours"]]

import typer
from typer.testing import CliRunner

from prodesc.cli import app

runner = CliRunner()


def _commands(args: list[str]) -> list[str]:
    """The command names of a typer --help screen, in order."""
    group = typer.main.get_command(app)
    for name in args:
        group = group.commands[name]
    return sorted(group.commands)


def test_help_lists_every_verb():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert _commands([]) == ["data", "demo", "eval", "export", "generate", "serve", "train"]
    for verb in _commands([]):
        assert verb in res.output


def test_data_help_lists_prepare_synth_and_index():
    res = runner.invoke(app, ["data", "--help"])
    assert res.exit_code == 0 and _commands(["data"]) == ["index", "prepare", "synth"]


def test_user_error_exits_1_without_traceback(tmp_path):
    res = runner.invoke(app, ["generate", "--run", str(tmp_path), "Some title"])
    assert res.exit_code == 1
    assert "error:" in res.output and "Traceback" not in res.output


def test_demo_prints_before_after_and_the_eval_table(tiny_run, tiny_data, tmp_path, capsys):
    from prodesc import demo

    demo.main(tiny_run, tiny_data, tmp_path / "report", limit=4, max_new_tokens=6)
    out = capsys.readouterr().out
    assert "before (base) vs after (fine-tuned)" in out and "reference:" in out
    lines = out.rstrip().splitlines()
    flag = next(i for i, line in enumerate(lines) if line.startswith("flagged for review: "))
    assert [x for x in lines[:flag] if x.strip()][-1].startswith("retrieval")  # the table, then the review count
    assert "specP%" in out and "falseS%" in out  # the spec columns
    assert "finetuned" in out and (tmp_path / "report" / "report.html").exists()


def test_demo_of_a_catalog_aware_run_shows_the_neighbours_seen(tiny_rag_run, tiny_rag_data, tmp_path, capsys):
    from prodesc import demo

    demo.main(tiny_rag_run, tiny_rag_data, tmp_path / "report", limit=3, max_new_tokens=4)
    out = capsys.readouterr().out
    assert out.count("[1]: ") == 3 and out.count("[2]: ") == 3 and "(cosine 0." in out


def test_data_prepare_keeps_config_values_unless_a_flag_is_given(tmp_path):
    import yaml

    from prodesc.data.synth import synth

    catalog = tmp_path / "catalog.json.gz"
    synth(300, catalog, seed=0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  val_fraction: 0.3\n  test_fraction: 0.25\n  strict: true\n  min_content_chars: 5\n")

    def resolved(out: str, *flags: str) -> dict:
        args = ["data", "prepare", str(catalog), "--out", str(tmp_path / out), "--config", str(cfg), *flags]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        return yaml.safe_load((tmp_path / out / "config.resolved.yaml").read_text())["data"]

    from_file = resolved("a")
    assert (from_file["val_fraction"], from_file["test_fraction"], from_file["strict"]) == (0.3, 0.25, True)
    assert (from_file["min_content_chars"], from_file["workers"]) == (5, 0)
    flagged = resolved("b", "--val-fraction", "0.1", "--no-strict", "--min-content-chars", "2", "--workers", "1")
    assert (flagged["val_fraction"], flagged["test_fraction"], flagged["strict"]) == (0.1, 0.25, False)
    assert (flagged["min_content_chars"], flagged["workers"]) == (2, 1)

from typer.testing import CliRunner

from prodesc.cli import app

runner = CliRunner()


def test_help_lists_every_verb():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for verb in ("data", "train", "export", "generate", "eval", "serve"):
        assert verb in res.output


def test_data_help_lists_prepare_and_synth():
    res = runner.invoke(app, ["data", "--help"])
    assert res.exit_code == 0 and "prepare" in res.output and "synth" in res.output


def test_user_error_exits_1_without_traceback(tmp_path):
    res = runner.invoke(app, ["generate", "--run", str(tmp_path), "Some title"])
    assert res.exit_code == 1
    assert "error:" in res.output and "Traceback" not in res.output


def test_demo_prints_before_after_and_the_eval_table(tiny_run, tiny_data, tmp_path, capsys):
    from prodesc import demo

    demo.main(tiny_run, tiny_data, tmp_path / "report", limit=4, max_new_tokens=6)
    out = capsys.readouterr().out
    assert "before (base) vs after (fine-tuned)" in out and "reference:" in out
    assert out.rstrip().splitlines()[-1].startswith("retrieval")
    assert "finetuned" in out and (tmp_path / "report" / "report.html").exists()

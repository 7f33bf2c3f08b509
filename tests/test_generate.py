import json

import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.config import GenerateConfig
from prodesc.errors import ProdescError
from prodesc.generate import Generator
from prodesc.generate.generator import generate_cli


@pytest.fixture(scope="module")
def gen(tiny_run):
    return Generator.from_run(tiny_run, merge=False)


def test_batched_generation_equals_one_at_a_time(gen):
    titles = ["Girls Ballet Tutu Neon Pink", "Mog's Kittens", "A much longer title about a kitchen spice rack"]
    cfg = GenerateConfig(max_new_tokens=12, batch_size=3)
    batched = [r["prediction"] for r in gen.describe(titles, cfg)]
    single = [gen.describe([t], GenerateConfig(max_new_tokens=12, batch_size=1))[0]["prediction"] for t in titles]
    assert batched == single  # left padding + attention mask: padding never changes a greedy answer


def test_records_have_the_documented_fields(gen):
    rec = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=5))[0]
    assert set(rec) == {"title", "prediction", "n_tokens", "stopped_by_eos", "latency_ms"}
    assert 1 <= rec["n_tokens"] <= 5 and isinstance(rec["stopped_by_eos"], bool)


def test_base_answers_differ_from_finetuned(gen):
    cfg = GenerateConfig(max_new_tokens=10)
    tuned = gen.describe(["Mog's Kittens"], cfg)[0]["prediction"]
    assert tuned != gen.describe(["Mog's Kittens"], cfg, adapter=False)[0]["prediction"]
    assert tuned == gen.describe(["Mog's Kittens"], cfg)[0]["prediction"]  # the switch is undone afterwards


def test_repetition_penalty_spares_special_tokens_and_prompt(gen):
    import torch

    from prodesc.generate.processors import AnswerRepetitionPenalty

    proc = AnswerRepetitionPenalty(2.0, prompt_width=3, exempt_ids=[4])
    ids = torch.tensor([[4, 5, 6, 4, 7]])
    scores = torch.ones(1, 10)
    out = proc(ids, scores)
    assert out[0, 4] == 1 and out[0, 5] == 1 and out[0, 6] == 1  # special (4) and prompt-only (5, 6) untouched
    assert out[0, 7] == 0.5


def test_cli_generate_file_to_jsonl_with_references(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "p.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "--run",
            str(tiny_run),
            "--data",
            str(tiny_data),
            "--split",
            "test",
            "--limit",
            "4",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4 and all(r["reference"] and r["prediction"] is not None for r in recs)


def test_cli_titles_print_to_terminal(tiny_run):
    res = CliRunner().invoke(app, ["generate", "--run", str(tiny_run), "--max-new-tokens", "4", "Mog's Kittens"])
    assert res.exit_code == 0 and "# Mog's Kittens" in res.output


def test_run_and_model_together_are_refused(tiny_run):
    with pytest.raises(ProdescError, match="exactly one of --run"):
        generate_cli(["x"], tiny_run, "embedded:smollm2-135m", None, None, None, "test", None, None, None, [])


def test_no_titles_is_refused(tiny_run):
    with pytest.raises(ProdescError, match="exactly one way"):
        generate_cli([], tiny_run, None, None, None, None, "test", None, None, None, [])


def test_bad_jsonl_input_names_file_and_line(tiny_run, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"title": "a"}\nnot json\n')
    with pytest.raises(ProdescError, match=r"t.jsonl:2"):
        generate_cli([], tiny_run, None, None, f, None, "test", None, None, None, [])


def test_stop_boost_ends_runaway_answers(gen):
    free = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=200))[0]
    boosted = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=200, stop_boost_after=20))[0]
    assert not free["stopped_by_eos"] and free["n_tokens"] == 200  # the tiny model never stops by itself
    assert boosted["stopped_by_eos"] and boosted["n_tokens"] < 200


class _Loaded(Exception):
    """Raised by the stand-in for models.load once it has seen the config it was given."""


@pytest.mark.parametrize("verb", ["generate", "eval", "serve", "export", "train"])
@pytest.mark.parametrize("flag", [False, True])
def test_remote_code_needs_the_flag_whatever_the_runs_config_says(tiny_run, tiny_data, tmp_path, monkeypatch,
                                                                  verb, flag):
    import shutil
    import socket

    import yaml

    from prodesc import models

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True  # a run dir from someone else, asking to run its code
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    seen = []

    def load(model_cfg, *args, **kwargs):
        seen.append(model_cfg.trust_remote_code)
        raise _Loaded

    monkeypatch.setattr(models, "load", load)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "generate": ["generate", "--run", str(run), "A title"],
        "eval": ["eval", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "rep")],
        "serve": ["serve", "--run", str(run), "--port", str(port)],
        "export": ["export", str(run), "--out", str(tmp_path / "exp")],
        "train": ["train", "--data", str(tiny_data), "--out", str(run), "--resume"],
    }[verb]
    res = CliRunner().invoke(app, args + (["--trust-remote-code"] if flag else []))
    assert isinstance(res.exception, _Loaded), res.output
    assert seen == [flag]
    assert ("model.trust_remote_code from the config is ignored" in res.output) != flag

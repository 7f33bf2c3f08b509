"""One settings resolution for every verb on a run: the run's config < --config (keys it sets) < flags < --set;
prompt/model changes refused; checks before any model loads."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.generate import Generator

runner = CliRunner()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Loaded(Exception):
    """Raised instead of loading a model: carries the settings the verb resolved."""


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_from_run(cls, run, cfg=None, merge=None):
        seen["cfg"] = cfg
        raise _Loaded

    monkeypatch.setattr(Generator, "from_run", classmethod(fake_from_run))
    return seen


@pytest.mark.parametrize("verb", ["generate", "eval", "serve"])
def test_every_verb_resolves_settings_the_same_way(verb, tiny_run, tiny_data, tmp_path, captured):
    partial = tmp_path / "partial.yaml"
    partial.write_text("generate:\n  top_p: 0.7\n")  # the run sets max_new_tokens=48 (tiny preset): it must stay
    args = {"generate": ["generate", "--run", str(tiny_run), "--temperature", "0.5", "Red Mug"],
            "eval": ["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--out", str(tmp_path / "r")],
            "serve": ["serve", "--run", str(tiny_run), "--port", str(_free_port())]}[verb]
    res = runner.invoke(app, [*args, "--config", str(partial), "--set", "generate.batch_size=3"])
    assert isinstance(res.exception, _Loaded), res.output
    gen = captured["cfg"].generate
    assert (gen.max_new_tokens, gen.top_p, gen.batch_size) == (48, 0.7, 3)
    if verb == "generate":
        assert gen.temperature == 0.5


@pytest.mark.parametrize("verb", ["generate", "eval", "serve"])
def test_a_run_refuses_prompt_changes_before_loading(verb, tiny_run, tiny_data, tmp_path, captured):
    args = {"generate": ["generate", "--run", str(tiny_run), "Red Mug"],
            "eval": ["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--out", str(tmp_path / "r")],
            "serve": ["serve", "--run", str(tiny_run)]}[verb]
    res = runner.invoke(app, [*args, "--set", "prompt.instruction=Describe: {title}"])
    assert res.exit_code == 1 and "cfg" not in captured
    assert "prompt.instruction: the run was trained with" in res.output and "Traceback" not in res.output


def test_train_refuses_every_mistake_at_once_before_loading(tiny_data, tmp_path, monkeypatch):
    from prodesc import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", "configs/tiny.yaml", "--data", str(tiny_data), "--out", str(out),
                              "--set", "train.save_steps=30", "--set", "train.eval_steps=20",
                              "--set", "train.optim=adamw_fast", "--set", "train.lr_scheduler=cosinus",
                              "--set", "lora.target_modules=[q_proj, qkv]", "--set", "train.liger=true"])
    assert res.exit_code == 1, res.output
    for field in ("train.save_steps", "train.optim", "train.lr_scheduler", "lora.target_modules", "train.liger"):
        assert f"{field}:" in res.output
    assert "did you mean 'adamw_" in res.output and "qkv" in res.output
    assert not out.exists(), "a refused run leaves no run dir"


def test_train_refuses_an_out_that_is_a_file(tiny_data, tmp_path):
    (tmp_path / "f").write_text("x")
    res = runner.invoke(app, ["train", "--config", "configs/tiny.yaml", "--data", str(tiny_data),
                              "--out", str(tmp_path / "f")])
    assert res.exit_code == 1 and "--out:" in res.output and "is a file" in res.output


def test_train_refuses_a_max_length_shorter_than_the_prompts(shared_dir, tmp_path):
    from prodesc.config import DataConfig
    from prodesc.data.prepare import prepare

    data = tmp_path / "data"
    prepare([shared_dir / "data" / "lf_amazon_first400.json"], data, DataConfig())
    res = runner.invoke(app, ["train", "--config", "configs/smollm2-135m.yaml", "--data", str(data),
                              "--out", str(tmp_path / "r"), "--set", "train.max_length=16"])
    assert res.exit_code == 1 and "train.max_length: 16 tokens leave no room" in res.output
    assert not (tmp_path / "r").exists()


def test_resume_with_changed_settings_names_them_and_keeps_the_original(tiny_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    original = (run / "config.resolved.yaml").read_text()
    sets = ["--set", "train.max_steps=32", "--set", "train.save_steps=2", "--set", "train.eval_steps=2"]
    res = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(run), "--resume", *sets])
    assert res.exit_code == 0, res.output
    assert "resuming with changed settings: train.eval_steps, train.max_steps, train.save_steps" in res.output
    assert (run / "config.resolved.yaml").read_text() == original
    assert "max_steps: 32" in (run / "config.resume-1.yaml").read_text()
    res = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(run), "--resume",
                              "--set", "lora.r=4"])
    assert res.exit_code == 1 and "lora.r: the run was trained with 16" in res.output


def test_resume_refuses_what_inference_refuses(tiny_run, tiny_data, tmp_path):
    """One lock list: retrieval.* used to change on --resume, while generate/eval/serve refuse it."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "config.resolved.yaml", run)  # the settings are resolved before anything else is read
    for change in ("retrieval.k=2", "retrieval.chars=300", "prompt.language=pt", "lora.r=4"):
        res = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(run), "--resume", "--set", change])
        assert res.exit_code == 1 and f"{change.split('=')[0]}: the run was trained with" in res.output, res.output


@pytest.mark.parametrize("verb", ["generate", "serve"])
def test_a_run_takes_the_cache_dir_and_compile_from_this_environment(verb, tiny_run, tmp_path, monkeypatch,
                                                                   captured):
    """The run recorded the training machine's PRODESC_CACHE / PRODESC_COMPILE_GENERATE; they used to override
    this machine's environment for every later verb on the run."""
    import yaml

    recorded = yaml.safe_load((tiny_run / "config.resolved.yaml").read_text())
    assert recorded["model"]["cache_dir"] and recorded["generate"]["compile"]  # frozen into the run dir
    monkeypatch.setenv("PRODESC_CACHE", str(tmp_path / "here"))
    monkeypatch.setenv("PRODESC_COMPILE_GENERATE", "force")
    args = {"generate": ["generate", "--run", str(tiny_run), "Red Mug"],
            "serve": ["serve", "--run", str(tiny_run), "--port", str(_free_port())]}[verb]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, _Loaded), res.output
    cfg = captured["cfg"]
    assert (cfg.model.cache_dir, cfg.generate.compile) == (str(tmp_path / "here"), "force")
    res = runner.invoke(app, [*args, "--set", "generate.compile=off"])
    assert captured["cfg"].generate.compile == "off"  # a flag still wins

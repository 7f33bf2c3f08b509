import pytest
from typer.testing import CliRunner

from prodesc import config
from prodesc.cli import app
from prodesc.errors import ProdescError


def test_overrides_beat_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 0.001\n  max_steps: 5\n")
    cfg = config.load(p, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.learning_rate == 0.001 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ProdescError, match="did you mean 'train.learning_rate'"):
        config.load(None, ["train.learning_rat=0.1"])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ProdescError) as e:
        config.load(None, ["train.batch_size=zero", "lora.r=-1", "model.quantization=int3"])
    msg = str(e.value)
    assert "train.batch_size" in msg and "lora.r" in msg and "model.quantization" in msg


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(None, ["train.max_steps=3"])
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_cli_reports_config_error_in_one_line_without_traceback(tmp_path):
    res = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "train.epoch=2"]
    )
    assert res.exit_code == 1
    assert "did you mean 'train.epochs'" in res.output and "Traceback" not in res.output


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(ProdescError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_set_parses_a_value_by_its_fields_type():
    cfg = config.resolve(sets=["data.split_salt=2024", "prompt.instruction=Describe: {title}",
                               "model.revision=1234567", "train.max_steps=7", "lora.target_modules=[q_proj]"])
    assert cfg.data.split_salt == "2024" and cfg.model.revision == "1234567"
    assert cfg.prompt.instruction == "Describe: {title}"
    assert cfg.train.max_steps == 7 and cfg.lora.target_modules == ["q_proj"]


def test_config_file_merges_only_the_keys_it_sets(tmp_path):
    base = tmp_path / "run.yaml"
    config.dump(config.resolve(sets=["generate.max_new_tokens=48", "generate.top_p=0.5"]), base)
    partial = tmp_path / "partial.yaml"
    partial.write_text("generate:\n  top_p: 0.9\n")
    cfg = config.resolve(base=base, config=partial, flags={"generate.batch_size": 3},
                         sets=["generate.batch_size=4"])
    assert (cfg.generate.max_new_tokens, cfg.generate.top_p, cfg.generate.batch_size) == (48, 0.9, 4)


def test_locked_settings_refuse_prompt_and_model_changes_of_a_run(tmp_path):
    base = tmp_path / "run.yaml"
    config.dump(config.resolve(), base)
    with pytest.raises(ProdescError) as e:
        config.resolve(base=base, sets=["prompt.instruction=Say {title}", "model.name=other"], locked=True)
    assert "prompt.instruction: the run was trained with" in str(e.value) and "model.name:" in str(e.value)
    same = config.resolve(base=base, flags={"model.trust_remote_code": True}, sets=["model.name=embedded:smollm2-135m"],
                          locked=True)  # the same value, and a load permission, are no change
    assert same.model.trust_remote_code is True
    wider = config.resolve(base=base, sets=["model.dtype=float32"], locked=True)  # how it loads, not what it is
    assert wider.model.dtype == "float32"


def test_prompt_instruction_without_title_is_refused():
    with pytest.raises(ProdescError, match="prompt.instruction: .*must contain '{title}'"):
        config.resolve(sets=["prompt.instruction=Describe the product"])


def test_environment_settings_are_recorded_in_the_resolved_config(monkeypatch, tmp_path):
    monkeypatch.setenv("PRODESC_CACHE", str(tmp_path))
    monkeypatch.setenv("PRODESC_COMPILE_GENERATE", "0")
    cfg = config.resolve()
    assert cfg.model.cache_dir == str(tmp_path) and cfg.generate.compile == "off"
    assert config.resolve(sets=["generate.compile=force"]).generate.compile == "force"

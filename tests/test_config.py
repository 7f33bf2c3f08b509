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

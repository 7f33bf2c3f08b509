"""train.report_to: TensorBoard, W&B (offline), MLflow (file store) and trackio (local), through transformers' own
integrations, each recorded in manifest.json."""

import json
import sys
from pathlib import Path

import pytest

from fixtures_tiny import tiny_config
from prodesc import config
from prodesc.train import recipe as train
from prodesc.train import trackers


def test_report_to_takes_one_name_a_list_or_none():
    assert config.ProdescConfig().train.report_to == ["tensorboard"]
    assert tiny_config("train.report_to=mlflow").train.report_to == ["mlflow"]
    assert tiny_config("train.report_to=[wandb, trackio]").train.report_to == ["wandb", "trackio"]
    assert tiny_config("train.report_to=none").train.report_to == []
    with pytest.raises(config.ProdescError, match="report_to"):
        tiny_config("train.report_to=comet")


def test_a_tracker_that_is_not_installed_is_named_before_any_model_loads(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    assert trackers.problems(["wandb"]) == ["train.report_to: wandb is not installed: pip install 'prodesc[wandb]'"]


@pytest.mark.slow  # ~30 s on 2 busy cores: three trackers' imports and a tiny run
def test_a_run_logs_to_every_tracker_offline_and_records_where(tiny_data, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    early = sys.modules.get("trackio.utils")  # imported by an earlier test: it keeps the dir it read then
    cfg = tiny_config("train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1",
                      "train.report_to=[tensorboard, wandb, mlflow, trackio]")
    train.train(cfg, tiny_data, out)
    logged = {r["tracker"]: r for r in json.loads((out / "manifest.json").read_text())["training"]["logged_to"]}
    assert list(logged) == ["tensorboard", "wandb", "mlflow", "trackio"]
    assert any((out / "logs").glob("events.out.tfevents.*"))
    w = logged["wandb"]
    assert w["mode"] == "offline" and w["url"] is None and w["dir"].startswith(str(out / "wandb"))
    assert list((out / "wandb").glob(f"offline-run-*-{w['run_id']}/run-{w['run_id']}.wandb"))
    m = logged["mlflow"]
    assert m["tracking_uri"] == (out / "mlruns").resolve().as_uri() and m["run_id"]
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=m["tracking_uri"]).get_run(m["run_id"])
    assert "train_loss" in run.data.metrics or "loss" in run.data.metrics
    t = logged["trackio"]
    want = Path(early.TRACKIO_DIR) if early is not None else out / "trackio"
    assert t["project"] == "prodesc" and t["dir"] == str(want) and any(want.rglob("*"))

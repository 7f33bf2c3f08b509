"""Where a run is logged (`train.report_to`): transformers' own integrations, each kept local unless told otherwise.

    train:
      report_to: [tensorboard, mlflow]     # or one name; tensorboard is the default

- tensorboard: RUN_DIR/logs (`tensorboard --logdir RUN_DIR/logs`), written by transformers' TensorBoardCallback.
- wandb: `WANDB_MODE=offline` writes RUN_DIR/wandb/offline-run-* (`wandb sync` uploads it later); online it
  logs to `WANDB_PROJECT` (default: prodesc).
- mlflow: `MLFLOW_TRACKING_URI`, else a file store in RUN_DIR/mlruns (`mlflow ui --backend-store-uri ...`).
- trackio: `TRACKIO_DIR`, else RUN_DIR/trackio (`trackio show`), project `prodesc`.
The run dir's manifest.json lists each one and where it went (`training.logged_to`). Each tracker but TensorBoard
is an optional extra: `pip install 'prodesc[wandb]'` (mlflow, trackio).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from prodesc import dist

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # -> module
PROJECT = "prodesc"
_SET: list[str] = []  # environment variables setup() set for this run, unset by logged_to()


def problems(report_to: list[str]) -> list[str]:
    """A tracker whose package is not installed, found before any model loads."""
    return [
        f"train.report_to: {name} is not installed: pip install 'prodesc[{name}]'"
        for name in report_to
        if importlib.util.find_spec(TRACKERS[name]) is None
    ]


def setup(report_to: list[str], out: Path) -> tuple[list[str], list[Any]]:
    """(SFTConfig's `report_to`, extra callbacks). Local destinations inside the run dir unless the environment
    names others; TensorBoard gets its own callback, writing RUN_DIR/logs as before."""
    defaults = {
        "wandb": {"WANDB_DIR": str(out), "WANDB_PROJECT": PROJECT},
        "mlflow": {"MLFLOW_TRACKING_URI": (out / "mlruns").resolve().as_uri(), "MLFLOW_EXPERIMENT_NAME": PROJECT},
        "trackio": {"TRACKIO_DIR": str(out / "trackio")},
    }
    if "mlflow" in report_to and "MLFLOW_TRACKING_URI" not in os.environ:
        defaults["mlflow"]["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses a file store without it
    for name in report_to:
        for var, value in defaults.get(name, {}).items():
            if var not in os.environ:  # the caller's environment wins
                os.environ[var] = value
                _SET.append(var)
    early = sys.modules.get("trackio.utils")
    if "trackio" in report_to and early is not None and str(early.TRACKIO_DIR) != os.environ.get("TRACKIO_DIR"):
        print(f"note: trackio was imported before this run and logs to {early.TRACKIO_DIR} (it reads TRACKIO_DIR "
              "once, at import); manifest.json records that dir")
    callbacks = [_tensorboard(out)] if "tensorboard" in report_to else []
    return [name for name in report_to if name != "tensorboard"] or ["none"], [c for c in callbacks if c]


def logged_to(report_to: list[str], trainer: Any) -> list[dict[str, Any]]:
    """Where each tracker put this run, for manifest.json."""
    found = {type(c).__name__: c for c in trainer.callback_handler.callbacks}
    records = []
    for name in report_to:
        if name == "tensorboard":
            records.append({"tracker": name, "dir": "logs"})
        elif name == "wandb":
            records.append(_wandb(found.get("WandbCallback")))
        elif name == "mlflow":
            records.append(_mlflow(found.get("MLflowCallback")))
        elif name == "trackio":  # where it wrote: trackio reads TRACKIO_DIR once, when first imported
            actual = getattr(sys.modules.get("trackio.utils"), "TRACKIO_DIR", None) or os.environ.get("TRACKIO_DIR")
            records.append({"tracker": name, "project": trainer.args.project, "dir": str(actual)})
    while _SET:  # the next run in this process gets its own run dir's defaults
        os.environ.pop(_SET.pop(), None)
    return records


def _tensorboard(out: Path) -> Any:
    if not dist.is_main():  # a SummaryWriter creates its event file at once; only rank 0 logs
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "logs")))


def _wandb(callback: Any) -> dict[str, Any]:
    run = getattr(getattr(callback, "_wandb", None), "run", None)
    if run is None:
        return {"tracker": "wandb", "dir": os.environ.get("WANDB_DIR")}
    offline = bool(getattr(run.settings, "_offline", False)) or os.environ.get("WANDB_MODE") == "offline"
    return {"tracker": "wandb", "mode": "offline" if offline else "online", "project": run.project,
            "run_id": run.id, "dir": str(Path(run.dir).parent), "url": None if offline else run.url}


def _mlflow(callback: Any) -> dict[str, Any]:
    import mlflow

    run_id = getattr(callback, "_run_id", None)
    if run_id is None and mlflow.last_active_run() is not None:
        run_id = mlflow.last_active_run().info.run_id
    return {"tracker": "mlflow", "tracking_uri": mlflow.get_tracking_uri(),
            "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME"), "run_id": run_id}

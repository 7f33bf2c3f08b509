"""Trainer callbacks: metrics.jsonl, NaN/inf guard, throughput."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class MetricsLogger(TrainerCallback):
    """Append every log record (train loss, eval loss, lr, ...) to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class NanGuard(TrainerCallback):
    """Stop at the first NaN/inf train loss, before another checkpoint is written over the last good one."""

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step, self.bad_value = state.global_step, loss
            control.should_training_stop = True
            control.should_save = False


class Throughput(TrainerCallback):
    """Non-pad tokens per second over the optimizer steps after the first (which pays for warm-up)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.tokens0 = 0
        self.t_end: float | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        _sync()
        if state.global_step == 1 or self.t0 is None:
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        self.t_end = time.perf_counter()

    def summary(self, state: Any) -> dict:
        tokens = state.num_input_tokens_seen
        out: dict[str, Any] = {"tokens_seen": int(tokens)}
        if self.t0 is not None and self.t_end and self.t_end > self.t0:
            out["tokens_per_s"] = round((tokens - self.tokens0) / (self.t_end - self.t0), 1)
        return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

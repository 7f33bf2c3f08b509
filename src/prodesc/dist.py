"""Multi-process runs: which rank writes the run dir, and where the others wait for it.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m prodesc.cli train ...

Every rank runs the same `prodesc train`. Rank 0 alone writes RUN_DIR (config, tiny base, adapter, manifest); the
others wait at a barrier wherever they need its files. Without a launcher there is one process and every helper
here is a no-op. If a rank dies, the launcher (torchrun under `accelerate launch`) stops the others, so a rank that
raises never leaves the rest waiting at a barrier.
"""

from __future__ import annotations

from typing import Any


def state() -> Any:
    """accelerate's process state. The first call joins the process group and pins this rank's GPU
    (`torch.cuda.set_device(local_rank)`), so make it before any model loads onto `cuda.current_device()`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # CPU ranks (gloo) must say so, as TrainingArguments does, or accelerate treats them as one process each
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def is_main() -> bool:
    """True on global rank 0 (and in a plain single-process run)."""
    return state().is_main_process


def barrier() -> None:
    state().wait_for_everyone()


def main_first() -> Any:
    """Context manager: rank 0 runs the block, the others run it once rank 0 has left it."""
    return state().main_process_first()


def fsdp_enabled() -> bool:
    """Launched with an FSDP accelerate config: weights are placed and sharded by FSDP, not by a device_map."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")

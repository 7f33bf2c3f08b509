"""Which checkpoint `prodesc train --resume` continues from: the newest whole one, found without loading any.

    last, damaged = resumable(run / "checkpoints")    # "./checkpoint-20", [(./checkpoint-30, "no trainer_state...")]

A run killed while the Trainer saves leaves a half-written last checkpoint; transformers' get_last_checkpoint
picks it anyway and the resume ends in a traceback. Whole means: trainer_state.json is there and parses (the
Trainer writes it last), every safetensors file is as long as its header says, every torch archive (*.pt, *.pth:
optimizer, scheduler, RNG states) has its zip directory, which sits at the end of the file.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from prodesc.errors import ProdescError
from prodesc.files import safetensors_problem

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # transformers' PREFIX_CHECKPOINT_DIR + step, as get_last_checkpoint


def resumable(ckpt_dir: Path) -> tuple[str, list[tuple[Path, str]]]:
    """The newest whole checkpoint, and the damaged ones after it with what is wrong; none whole is a user error."""
    steps = {int(m[1]): p for p in ckpt_dir.glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()}
    if not steps:
        raise ProdescError(f"--resume: no checkpoint in {ckpt_dir}: train without --resume first")
    damaged = []
    for step in sorted(steps, reverse=True):
        problem = _checkpoint_problem(steps[step])
        if problem is None:
            return str(steps[step]), damaged
        damaged.append((steps[step], problem))
    newest, problem = damaged[0]
    raise ProdescError(
        f"--resume: no whole checkpoint in {ckpt_dir} ({newest.name}: {problem}"
        + (f"; {len(damaged) - 1} older ones damaged too" if len(damaged) > 1 else "")
        + "): start again with --overwrite"
    )


def _checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint unusable (see the module docstring), or None."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the save was cut short)"
    except (OSError, ValueError):
        return "trainer_state.json is damaged"
    weights = list(path.glob("*.safetensors"))
    if not weights and not list(path.glob("pytorch_model_fsdp*")):
        return "no model weights"
    for f in weights:
        if (problem := safetensors_problem(f)) is not None:
            return problem
    for f in [*path.glob("*.pt"), *path.glob("*.pth")]:
        try:
            zipfile.ZipFile(f).close()
        except (OSError, zipfile.BadZipFile):
            return f"{f.name} is truncated or damaged"
    return None

"""Structural checks of the files prodesc reads back (a run's manifest and adapter, catalog indexes, checkpoints):
a damaged file is a one-line `ProdescError` naming it and how to rebuild it, before anything loads it.

    manifest = read_json(run / "manifest.json", "it is written when training ends: train the run again")
    check_safetensors(run / "adapter" / "adapter_model.safetensors", "train the run again")

Structural, not a checksum: a file cut short, a header that does not parse, a length that does not match what
the header says. A bit flipped inside a complete file is not found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prodesc.errors import ProdescError


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing, unreadable or damaged file (or not an object) is a user error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProdescError(f"{path} is missing: {fix}") from None
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProdescError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}): {fix}") from None
    if not isinstance(data, dict):
        raise ProdescError(f"{path} is damaged (a JSON {type(data).__name__}, not an object): {fix}")
    return data


def check_safetensors(path: Path, fix: str) -> None:
    """A user error when `path` is missing or not a whole safetensors file."""
    if not path.is_file():
        raise ProdescError(f"{path} is missing: {fix}")
    problem = safetensors_problem(path)
    if problem is not None:
        raise ProdescError(f"{path.parent / problem}: {fix}")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file ("NAME is truncated ...", "NAME has a damaged header"), or None:
    its header parses and the file is exactly as long as the header's tensors say."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return f"{path.name} has a damaged header"
    return None if 8 + n + end == size else f"{path.name} is truncated ({size:,} of {8 + n + end:,} bytes)"


def check_adapter(adapter: Path, fix: str) -> None:
    """A PEFT adapter dir as `save_pretrained` writes it: adapter_config.json parses, the weights are whole."""
    read_json(adapter / "adapter_config.json", fix)
    check_safetensors(adapter / "adapter_model.safetensors", fix)

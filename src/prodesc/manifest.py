"""manifest.json of a run: what was trained, on what, with what, and how it went; read back by later verbs."""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from prodesc.errors import ProdescError

LIBRARIES = (
    "prodesc",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "liger-kernel",
)


def build_manifest(base: dict, data: dict, stats: dict) -> dict[str, Any]:
    return {
        "base_model": base,
        "data": data,
        "training": stats,
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "git_commit": _git_commit(),
        "hardware": _hardware(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def data_fingerprint(data: Path, families: list[str]) -> dict[str, Any]:
    """sha256 of each split file, plus the training families (their list sits in train_families.txt.gz)."""
    digest = hashlib.sha256("\n".join(families).encode()).hexdigest()
    files = {p.name: _sha256(p) for p in sorted(data.glob("*.parquet"))}
    return {
        "dir": str(data.resolve()),
        "files": files,
        "train_families": len(families),
        "train_families_sha256": digest,
        "train_families_file": "train_families.txt.gz",
    }


def read_manifest(run: Path) -> dict[str, Any]:
    path = run / "manifest.json"
    if not path.exists():
        raise ProdescError(
            f"{run} is not a finished run (no manifest.json): pass the --out dir of `prodesc train`"
        )
    return json.loads(path.read_text())


def train_families(run: Path) -> set[str]:
    path = run / "train_families.txt.gz"
    if not path.exists():
        raise ProdescError(
            f"{path} missing: the run's training families are unknown; re-train or --allow-overlap"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {line.rstrip("\n") for line in f if line.strip()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _hardware() -> dict[str, Any]:
    import os

    import torch

    hw: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name()
        hw["gpu_count"] = torch.cuda.device_count()
    return hw

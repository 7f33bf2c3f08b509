"""Output directories: written atomically, each with its resolved config; a run's manifest read back by later verbs.

    with atomic_dir(out, overwrite) as tmp:    # build in tmp; `out` becomes the new dir only if the block succeeds
        ...
    write_resolved(cfg, tmp)                   # config.resolved.yaml: the settings every output was made with

manifest.json of a run: what was trained, on what, with what, and how it went.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prodesc.errors import ProdescError

if TYPE_CHECKING:
    from prodesc.config import ProdescConfig

RESOLVED = "config.resolved.yaml"  # beside every output: the settings it was made with

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


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, what: str = "output dir") -> Iterator[Path]:
    """Build a directory beside `out`, then swap it into place: `out` is either the old output or the whole new one.

    Yields the temporary dir to fill. On an exception inside the block, Ctrl-C or SIGTERM (which unwinds like
    Ctrl-C meanwhile: `terminate_as_interrupt`) the temporary dir is removed and `out` is untouched. On success an
    existing `out` (allowed by `overwrite`) is moved aside, the new dir renamed into place and the old one deleted;
    if that rename fails, the old output is moved back. Temporary dirs left by dead processes (killed runs) for the
    same `out` are removed first. The new dir gets the usual permissions (0777 less the umask), not mkdtemp's 0700.
    """
    out = Path(out)
    refuse_existing(out, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    with terminate_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())
            yield tmp
            _swap_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, docker stop) unwinds like Ctrl-C meanwhile, so temporary files are removed; only on
    the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(out: Path, overwrite: bool, what: str = "output dir") -> None:
    """A user error when `out` is a file, or an existing dir that `overwrite` does not allow replacing."""
    if out.exists() and not out.is_dir():
        raise ProdescError(f"{what} {out} is a file: pass a directory path to --out")
    if out.exists() and not overwrite:
        raise ProdescError(f"{what} {out} already exists: pass --overwrite to replace it or choose another --out")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` dirs beside `out` whose process is gone; returns them."""
    removed = []
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = p.name[len(out.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # roll back: the old output stays whole
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_config(run: Path) -> Path:
    """A run's resolved config: config.resolved.yaml (runs before it: config.yaml)."""
    for name in (RESOLVED, "config.yaml"):
        if (run / name).is_file():
            return run / name
    raise ProdescError(f"{run} is not a run dir (no {RESOLVED}): pass the --out dir of a finished `prodesc train`")


def settings(
    run: Path | None, config: Path | None = None, flags: dict[str, Any] | None = None, sets: list[str] | None = None
) -> ProdescConfig:
    """The one resolution of a verb that works on a run (or on defaults without one): the run's resolved config <
    --config < flags < --set, with `prompt.*`/`model.*` locked on a run."""
    from prodesc.config import resolve

    base = run_config(run) if run is not None else None
    flags, decoding = dict(flags or {}), {}
    if run is None and flags.get("model.name"):  # a merged export: the prompt and neighbours it was trained with,
        saved = export_settings(Path(flags["model.name"]))  # and its run's decoding, under --config and flags
        decoding = {k: v for k, v in saved.items() if k.startswith("generate.")}
        flags = {**{k: v for k, v in saved.items() if k not in decoding}, **flags}
    cfg = resolve(base=base, config=config, flags=flags, sets=sets or (), locked=run is not None,
                  model_defaults=decoding)
    return with_length_prior(cfg, run, Path(flags["model.name"]) if run is None and flags.get("model.name") else None)


def with_length_prior(cfg: ProdescConfig, run: Path | None, model_dir: Path | None = None) -> ProdescConfig:
    """`cfg` with `generate.stop_boost_after: auto` replaced by its number (`length_prior`); as it is otherwise."""
    if cfg.generate.stop_boost_after != "auto":
        return cfg
    after = length_prior(run, model_dir)
    return cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"stop_boost_after": after})})


LENGTH_PRIOR = "p60"  # generate.stop_boost_after: auto, the percentile of the training answers' lengths it takes


def length_prior(run: Path | None, model_dir: Path | None = None) -> int:
    """`generate.stop_boost_after: auto` for a run: the 60th percentile of its training answers' lengths in tokens
    (manifest.json, training.examples.answer_tokens), so an answer may run about as long as most of the catalog's
    before the end token is pushed. A model exported from a run carries the run's number (prodesc_export.json);
    any other model has none: 0 (off), with a note. docs/QUALITY.md measured it."""
    if run is None:
        meta = model_dir / "prodesc_export.json" if model_dir is not None else None
        saved = json.loads(meta.read_text()).get("length_prior") if meta is not None and meta.is_file() else None
        if saved is None:
            print("note: generate.stop_boost_after=auto learns a length from a run's training answers; this model "
                  "has none, so it is off (set a number to boost the end token after that many tokens)",
                  file=sys.stderr)
        return int(saved or 0)
    answers = read_manifest(run).get("training", {}).get("examples", {}).get("answer_tokens") or {}
    if LENGTH_PRIOR not in answers:
        raise ProdescError(
            f"generate.stop_boost_after=auto: {run}/manifest.json has no answer lengths (trained by an older "
            "prodesc): set a number instead, e.g. --set generate.stop_boost_after=320"
        )
    return int(answers[LENGTH_PRIOR])


# The `generate:` settings that change an answer (batch size, compile and write_every do not): an export carries the
# run's, and `generate --resume` refuses to continue a file made with others.
DECODING = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size", "stop_boost_after",
            "stop_bias", "grounded")


def export_settings(model_dir: Path) -> dict[str, Any]:
    """The prompt, retrieval and decoding settings `prodesc export` wrote beside a merged model
    (prodesc_export.json), as settings: the model decodes as its run did (stop_bias, the length prior); {} for any
    other model."""
    from prodesc.files import read_json

    meta = model_dir / "prodesc_export.json"
    if not meta.is_file():
        return {}
    saved = read_json(meta, "it is written by `prodesc export`: export the run again")
    return {f"{sec}.{k}": v for sec in ("prompt", "retrieval", "generate") for k, v in (saved.get(sec) or {}).items()
            if sec != "generate" or k in DECODING}


def write_resolved(cfg: ProdescConfig, out: Path) -> Path:
    """Write `out/config.resolved.yaml`: every field, defaults included."""
    import yaml

    path = Path(out) / RESOLVED
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


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
    files = {p.name: file_sha256(p) for p in sorted(data.glob("*.parquet"))}
    return {
        "dir": str(data.resolve()),
        "files": files,
        "train_families": len(families),
        "train_families_sha256": digest,
        "train_families_file": "train_families.txt.gz",
    }


def read_manifest(run: Path) -> dict[str, Any]:
    from prodesc.files import read_json

    path = run / "manifest.json"
    if not path.exists():
        raise ProdescError(
            f"{run} is not a finished run (no manifest.json): pass the --out dir of `prodesc train`"
        )
    return read_json(path, "it is written when training ends: restore it, or train the run again")


def train_families(run: Path) -> set[str]:
    path = run / "train_families.txt.gz"
    if not path.exists():
        raise ProdescError(
            f"{path} missing: the run's training families are unknown; re-train or --allow-overlap"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {line.rstrip("\n") for line in f if line.strip()}


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read 1 MiB at a time."""
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

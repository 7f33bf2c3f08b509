"""`rundir.atomic_dir`: an output dir is the old one or the whole new one, never a mix, never debris."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prodesc import rundir
from prodesc.errors import ProdescError


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return out


def test_atomic_dir_replaces_the_old_output_only_on_success(tmp_path):
    out = _old_output(tmp_path)
    with rundir.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_keeps_the_old_output_when_the_block_fails(tmp_path):
    out = _old_output(tmp_path)
    with pytest.raises(RuntimeError), rundir.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_rolls_the_old_output_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = _old_output(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # the new dir into place: fail it
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(OSError), rundir.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_an_existing_output_or_a_file(tmp_path):
    out = _old_output(tmp_path)
    with pytest.raises(ProdescError, match="already exists: pass --overwrite"), rundir.atomic_dir(out):
        pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(ProdescError, match="is a file"), rundir.atomic_dir(tmp_path / "f", overwrite=True):
        pass


def test_atomic_dir_removes_temp_dirs_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"x" * 100)
    live = tmp_path / f".out.tmp-{os.getppid()}-def456"  # a live process: left alone
    live.mkdir()
    with rundir.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists() and live.exists()


def _run_with_answers(tmp_path: Path, answers: dict | None, boost: str = "auto") -> Path:
    import json

    from prodesc import config

    run = tmp_path / "run"
    run.mkdir()
    rundir.write_resolved(config.resolve(sets=[f"generate.stop_boost_after={boost}"]), run)
    examples = {"examples": 10, **({"answer_tokens": answers} if answers is not None else {})}
    (run / "manifest.json").write_text(json.dumps({"training": {"examples": examples}}))
    return run


def test_sigterm_inside_atomic_dir_removes_the_temp_dir(tmp_path):
    """Every atomic output (export, report, encoded examples, data) unwinds on SIGTERM: it used to leave its
    temporary dir (558 MiB for the SmolLM2 GGUF export) unless the verb installed a handler itself."""
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from prodesc import rundir\n"
        "with rundir.atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'part.bin').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no .out.tmp-PID-* left, no half output


def test_atomic_dir_output_gets_the_umask_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        with rundir.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_auto_length_prior_is_the_runs_60th_percentile_of_answer_tokens(tmp_path):
    run = _run_with_answers(tmp_path, {"p50": 20, "p60": 37, "p75": 50, "p90": 80})
    assert rundir.settings(run).generate.stop_boost_after == 37
    assert rundir.settings(run, sets=["generate.stop_boost_after=12"]).generate.stop_boost_after == 12  # a number wins


def test_auto_length_prior_of_a_run_without_answer_lengths_says_what_to_set(tmp_path):
    run = _run_with_answers(tmp_path, None)
    with pytest.raises(ProdescError, match=r"no answer lengths .* --set generate.stop_boost_after="):
        rundir.settings(run)
    assert rundir.settings(run, sets=["generate.stop_boost_after=64"]).generate.stop_boost_after == 64


def test_auto_length_prior_without_a_run_is_off_or_the_exports_number(tmp_path, capsys):
    import json

    plain = tmp_path / "plain"
    plain.mkdir()
    assert rundir.settings(None, flags={"model.name": str(plain)}, sets=["generate.stop_boost_after=auto"]) \
        .generate.stop_boost_after == 0
    assert "is off" in capsys.readouterr().err
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "prodesc_export.json").write_text(json.dumps({"length_prior": 41}))
    cfg = rundir.settings(None, flags={"model.name": str(exported)}, sets=["generate.stop_boost_after=auto"])
    assert cfg.generate.stop_boost_after == 41

"""`prodesc train` under a 2-process DDP launch on CPU (gloo) trains like one process with the same global batch.

Same global batch: accelerate hands each rank whole per-device batches in turn (split_batches=False), so with
train.batch_size=4 on 2 ranks, step k covers sampler positions 8k..8k+7 across the ranks: the same 8 examples that
one process with train.batch_size=8 sees at step k (same seed, same SeedableRandomSampler permutation). With
transformers' average_tokens_across_devices the loss is the token mean over those 8 examples and the all-reduced
gradient is the single-process gradient, so the two runs differ only by float32 summation order.

CPU ranks need ACCELERATE_USE_CPU=true (what `accelerate launch --cpu` sets); torchrun starts them, as
`accelerate launch` does for GPUs (`accelerate launch --cpu` itself starts a single process without mpirun).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_tiny import tiny_config
from prodesc.train import recipe as train

STEPS = ["train.max_steps=5", "train.logging_steps=1", "train.eval_steps=5", "train.save_steps=5"]
# Observed |DDP - single| on these 5 steps: <= 5e-7 in loss (~1e-7 relative), ~1e-7 relative in grad norm: float32
# summation order (gloo all-reduce, 1 vs 2 threads, padding to 4 vs 8 rows). 1e-4 relative (6e-4 on a loss of ~6)
# leaves 100x headroom yet is 15x below the 9e-3 step-1 gap of a wrong shard (another 8 examples), and a gradient
# not averaged across ranks moves the grad norm and every later loss by far more.
REL = 1e-4
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "prodesc.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    single = train.train(tiny_config(*STEPS, "train.batch_size=8"), tiny_data, root / "single")
    out, data = root / "ddp", root / "data"  # a copy without the single run's encoded examples
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("encoded"))
    ddp = _launch("-c", TINY, "--data", str(data), "--out", str(out), *_sets(*STEPS, "train.batch_size=4"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return {"single": single, "ddp": out, "ddp_out": ddp.stdout, "data": data}


def test_ddp_rank_zero_encodes_the_examples_once_and_the_other_rank_reads_them(runs):
    out = runs["ddp_out"]
    encoded = re.findall(r"^encoded [\d,]+ examples in", out, re.M)
    assert len(encoded) == 1 and len(re.findall(r"^examples read from ", out, re.M)) == 1, out[-2000:]
    assert len(list((runs["data"] / "encoded").iterdir())) == 1


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(runs):
    one = [r for r in _log(runs["single"]) if "loss" in r]
    two = [r for r in _log(runs["ddp"]) if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert [r["num_tokens"] for r in two] == [r["num_tokens"] for r in one]  # the same examples, step by step
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=REL)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=REL)
    assert two[-1]["loss"] < two[0]["loss"] - 0.3  # it trained


def test_ddp_only_rank_zero_writes_the_run_dir(runs):
    run = runs["ddp"]
    assert {p.name for p in run.iterdir()} == {
        "adapter",
        "base",
        "checkpoints",
        "config.resolved.yaml",
        "logs",
        "manifest.json",
        "metrics.jsonl",
        "train_families.txt.gz",
        "train_index.npz",
    }
    steps = [r["step"] for r in _log(run) if "loss" in r]
    assert steps == sorted(set(steps)), "one metrics line per log step, not one per rank"
    assert len(list((run / "logs").glob("events.out.tfevents.*"))) == 1
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert not (run / "adapter" / "training_args.bin").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["global_step"] == 5 and manifest["training"]["tokens_seen"] > 0
    assert runs["ddp_out"].count("run dir:") == 1  # the summary, printed by rank 0 alone
    ckpt = run / "checkpoints" / "checkpoint-5"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}  # Trainer's own


@pytest.mark.slow
def test_ddp_resume_continues_both_ranks_from_the_last_checkpoint(runs):
    more = _sets("train.max_steps=7")
    train.train_cli(runs["data"], runs["single"], sets=["train.max_steps=7"], resume=True)
    ddp = _launch("--data", str(runs["data"]), "--out", str(runs["ddp"]), "--resume", *more)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("resuming from") == 1 and "checkpoint-5" in ddp.stdout
    one = {r["step"]: r["loss"] for r in _log(runs["single"]) if "loss" in r}
    two = [(r["step"], r["loss"]) for r in _log(runs["ddp"]) if "loss" in r]
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6, 7]
    assert [loss for _, loss in two] == pytest.approx([one[s] for s, _ in two], rel=REL)


@pytest.mark.slow
def test_ddp_refuses_an_existing_run_dir_on_every_rank(runs):
    ddp = _launch("-c", TINY, "--data", str(runs["data"]), "--out", str(runs["ddp"]), *_sets("train.max_steps=1"))
    assert ddp.returncode != 0
    assert "already exists: pass --overwrite" in ddp.stderr
    assert (runs["ddp"] / "manifest.json").exists(), "the refused launch left the run alone"

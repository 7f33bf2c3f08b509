import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_tiny import tiny_config
from prodesc.errors import ProdescError
from prodesc.train import recipe as train
from prodesc.train.callbacks import NanGuard

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_dir_is_self_describing(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "adapter",
        "base",
        "config.resolved.yaml",
        "manifest.json",
        "metrics.jsonl",
        "logs",
        "checkpoints",
        "train_families.txt.gz",
        "train_index.npz",
    } <= names
    assert (tiny_run / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tiny_run.rglob("adapter/*.bin")), "no pickle files in the adapter"
    m = json.loads((tiny_run / "manifest.json").read_text())
    assert m["base_model"]["name"] == "tiny" and m["versions"]["transformers"]
    t = m["training"]
    assert t["global_step"] == 30 and t["tokens_seen"] > 0 and t["best_val_loss"] is not None
    assert m["data"]["train_families"] > 0 and len(m["data"]["files"]) == 3


def test_tiny_loss_falls(tiny_run):
    losses = [r["loss"] for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 0.3, losses


def test_adapter_reloads_with_identical_logits(tiny_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prodesc.generate import Generator

    gen = Generator.from_run(tiny_run, merge=False)
    best = json.loads((tiny_run / "manifest.json").read_text())["training"]
    assert best["best_val_loss"] is not None
    ids = gen._encode(["Girls Ballet Tutu Neon Pink"])
    ckpts = sorted((tiny_run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    best_ckpt = Path(state["best_model_checkpoint"]).name
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "base")
    ref = PeftModel.from_pretrained(base, tiny_run / "checkpoints" / best_ckpt).eval()
    with torch.no_grad():
        a = gen.model(**ids).logits
        b = ref(**ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_collated_batch_masks_prompt_and_supervises_eos(tiny_data, tmp_path):
    cfg = tiny_config("train.max_length=4096")  # nothing truncated: every example keeps its EOS
    rows = {s: train._read_split(tiny_data, s) for s in ("train", "val")}
    model, tok, _ = train._setup_model(cfg, train._tiny_base(rows["train"], cfg, tmp_path))
    train_ds, val_ds, _ = train._setup_data(tok, cfg, rows)
    trainer, _ = train._setup_trainer(cfg, model, tok, train_ds, val_ds, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert tok.pad_token_id != tok.eos_token_id
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        supervised = [i for i, lab in enumerate(labels) if lab != -100]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        prompt = tok.decode(ids[: supervised[0]])
        assert prompt.rstrip().endswith("assistant") and "Title:" in prompt  # the whole prompt is masked
        assert ids[supervised[-1]] == tok.eos_token_id  # the last supervised token is EOS ...
        assert all(ids[i] == tok.pad_token_id for i in range(supervised[-1] + 1, len(ids)))  # ... then padding
        assert supervised == list(range(supervised[0], supervised[-1] + 1))


def test_existing_run_dir_is_refused(tiny_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(ProdescError, match="--overwrite"):
        train.train(tiny_config(), tiny_data, tmp_path / "run")


def test_missing_data_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ProdescError, match="data prepare"):
        train.train(tiny_config(), tmp_path / "nothing", tmp_path / "run")


def test_empty_train_split_is_refused(tiny_data, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    t = pq.read_table(d / "train.parquet")
    pq.write_table(t.slice(0, 0), d / "train.parquet")
    with pytest.raises(ProdescError, match="train.parquet is empty"):
        train.train(tiny_config(), d, tmp_path / "run")


def test_an_empty_val_split_trains_without_eval(tmp_path):
    """`--val-fraction 0` (documented) used to crash in encoding with KeyError 'neighbour_chars_cut' after the run
    dir was written: `datasets.map` over no rows never makes the mapped columns."""
    from prodesc import config
    from prodesc.data.prepare import prepare
    from prodesc.data.synth import synth

    synth(120, tmp_path / "catalog.json.gz", seed=1, malformed=0)
    data = tmp_path / "data"
    prepare([tmp_path / "catalog.json.gz"], data, config.DataConfig(val_fraction=0, test_fraction=0.1))
    import pyarrow.parquet as pq

    assert pq.read_metadata(data / "val.parquet").num_rows == 0
    run = train.train(tiny_config("train.max_steps=2", "train.eval_steps=1", "train.save_steps=2"), data,
                      tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["training"]["global_step"] == 2 and manifest["training"]["best_val_loss"] is None


def test_resume_without_checkpoint_is_a_user_error(tiny_data, tmp_path):
    with pytest.raises(ProdescError, match="no checkpoint"):
        train.train(tiny_config(), tiny_data, tmp_path / "run", resume=True)


def test_nan_guard_stops_training_without_saving():
    from transformers import TrainerControl, TrainerState

    guard, control = NanGuard(), TrainerControl()
    state = TrainerState()
    state.global_step = 7
    guard.on_log(None, state, control, logs={"loss": math.nan})
    assert control.should_training_stop and not control.should_save and guard.bad_step == 7


def test_nan_loss_stops_with_a_clear_error(tiny_data, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):  # corrupt the adapter after step 3, as a diverging run would
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.data.fill_(float("nan"))

    real = train._setup_trainer

    def with_poison(*a, **kw):
        trainer, watch = real(*a, **kw)
        trainer.add_callback(Poison())
        return trainer, watch

    monkeypatch.setattr(train, "_setup_trainer", with_poison)
    cfg = tiny_config("train.max_steps=20", "train.logging_steps=1", "train.save_steps=2", "train.eval_steps=2")
    with pytest.raises(ProdescError, match=r"loss became nan at step 4.*checkpoint-2"):
        train.train(cfg, tiny_data, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-4").exists()


@pytest.mark.slow  # 60-130 s on 2 busy cores: three training subprocesses
def test_resume_after_sigkill_reaches_the_same_final_step(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "prodesc.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--set",
        "train.max_steps=120",
        "--set",
        "train.save_steps=10",
        "--set",
        "train.eval_steps=10",
        "--set",
        "train.early_stopping_patience=null",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-20" / "trainer_state.json").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "manifest.json").exists(), "killed before the end"
    done = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert done and done[-1] < 120
    res = subprocess.run(
        [sys.executable, "-m", "prodesc.cli", "train", "--data", str(tiny_data), "--out", str(run), "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{done[-1]}'}" in res.stdout
    assert json.loads((run / "manifest.json").read_text())["training"]["global_step"] == 120


def _damage(checkpoint: Path, how: str) -> None:
    if how == "no trainer_state.json":  # killed before the Trainer wrote its last file
        (checkpoint / "trainer_state.json").unlink()
    else:
        f = checkpoint / ("adapter_model.safetensors" if how == "truncated weights" else "optimizer.pt")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _run_copy(tiny_run: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) == 2
    return run, ckpts


@pytest.mark.parametrize("how", ["no trainer_state.json", "truncated weights", "truncated optimizer"])
def test_resume_skips_a_damaged_last_checkpoint_and_says_so(tiny_run, tiny_data, tmp_path, capsys, how):
    run, (good, last) = _run_copy(tiny_run, tmp_path)
    _damage(last, how)
    assert train._prepare_run_dir(tiny_config(), run, resume=True, changed=[]) == str(good)
    out = capsys.readouterr().out
    assert f"--resume: skipping {last}: " in out and f"resuming from {good}" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [good.name, f"damaged-{last.name}"]


def test_resume_with_no_whole_checkpoint_stops_with_one_line_naming_the_newest(tiny_run, tiny_data, tmp_path):
    run, (first, last) = _run_copy(tiny_run, tmp_path)
    _damage(first, "truncated optimizer")
    _damage(last, "truncated weights")
    with pytest.raises(ProdescError, match=rf"no whole checkpoint .*\({last.name}: adapter_model.safetensors is "
                       rf"truncated .*1 older ones damaged too\): start again with --overwrite"):
        train._prepare_run_dir(tiny_config(), run, resume=True, changed=[])


@pytest.mark.slow  # ~25 s on a busy 2-core box: 10 training steps and an eval
def test_resume_trains_on_from_the_previous_good_checkpoint(tiny_run, tiny_data, tmp_path):
    run, (good, last) = _run_copy(tiny_run, tmp_path)
    _damage(last, "no trainer_state.json")
    (run / "manifest.json").unlink()
    train.train_cli(tiny_data, run, resume=True)  # the run's own settings: max_steps=30
    steps = json.loads((run / "manifest.json").read_text())["training"]["global_step"]
    assert steps == 30 and (run / "checkpoints" / "checkpoint-30" / "trainer_state.json").exists()


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_zero_or_below_minus_one_is_refused(steps):
    with pytest.raises(ProdescError, match=r"train.max_steps: must be -1 \(train for train.epochs\) or >= 1"):
        tiny_config(f"train.max_steps={steps}")


# ------------------------------------------------------------------------------------------ catalog neighbours


def test_rag_run_holds_the_train_split_catalog(tiny_rag_run, tiny_rag_data):
    from prodesc.catalog import Catalog
    from prodesc.config import RetrievalConfig
    from prodesc.records import read_split

    assert sorted(p.name for p in (tiny_rag_run / "catalog").iterdir()) == ["items.parquet", "meta.json", "vectors.npy"]
    catalog = Catalog.load(tiny_rag_run / "catalog", RetrievalConfig())
    train_uids = [r["uid"] for r in read_split(tiny_rag_data, "train")]
    assert catalog.items.column("uid").to_pylist() == train_uids  # the train split, nothing held out
    assert catalog.vectors.shape[0] == len(train_uids)


def test_collated_rag_batch_has_neighbours_in_the_masked_prompt_and_ends_on_eos(tiny_rag_data, tmp_path):
    from prodesc.train import examples

    cfg = tiny_config("retrieval.k=2", "retrieval.chars=60", "train.max_length=400")
    rows = {s: train._read_split(tiny_rag_data, s) for s in ("train", "val")}
    _, near = examples.neighbours(cfg, tiny_rag_data, rows)
    model, tok, _ = train._setup_model(cfg, train._tiny_base(rows["train"], cfg, tmp_path))
    train_ds, val_ds, lengths = train._setup_data(tok, cfg, rows, near)
    assert lengths["cut"]["examples_cut"] > 0  # 400 tiny-tokenizer tokens: many examples had to be fitted
    trainer, _ = train._setup_trainer(cfg, model, tok, train_ds, val_ds, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        supervised = [i for i, lab in enumerate(labels) if lab != -100]
        assert len(ids) <= 400 and ids[supervised[-1]] == tok.eos_token_id  # the fitted ones too
    pairs = zip(train_ds["input_ids"], train_ds["completion_mask"], strict=True)
    prompts = [tok.decode(ex[: mask.index(1)]) for ex, mask in pairs]
    with_neighbours = sum("Similar products in the catalog:\n[1] " in p for p in prompts)
    assert with_neighbours == len(prompts) - lengths["cut"]["neighbours_dropped"] // 2 > 0


def test_neighbours_too_long_for_max_length_are_refused_before_any_model_loads(tiny_data, tmp_path, monkeypatch):
    from prodesc import models

    monkeypatch.setattr(models, "load", lambda *a, **kw: pytest.fail("weights loaded"))
    cfg = tiny_config("retrieval.k=4", "retrieval.chars=2000", "train.max_length=1024")
    with pytest.raises(ProdescError, match=r"retrieval.k=4 neighbours of retrieval.chars=2000 .* train.max_length"):
        train.train(cfg, tiny_data, tmp_path / "run")


def test_the_split_records_are_not_held_while_the_weights_load(tiny_data, tmp_path, monkeypatch):
    """The records as Python dicts (~3 GiB a million) were kept through training for the run files written at its
    end; they are now written once the examples are ready and the records dropped before the weights load."""
    import gc
    import weakref

    class Rows(list):  # a list that can be weakly referenced
        pass

    held, seen = [], {}
    read = train._read_split
    monkeypatch.setattr(train, "_read_split", lambda data, split: held.append(weakref.ref(r := Rows(read(data, split))))
                        or r)
    setup = train._setup_model

    def setup_model(*args):
        gc.collect()
        seen["alive"] = [ref() is not None for ref in held]
        seen["written"] = [(tmp_path / "run" / n).is_file() for n in ("train_families.txt.gz", "train_index.npz")]
        return setup(*args)

    monkeypatch.setattr(train, "_setup_model", setup_model)
    run = train.train(tiny_config("train.max_steps=1", "train.eval_steps=1", "train.save_steps=1"), tiny_data,
                      tmp_path / "run")
    assert len(held) == 2 and seen["alive"] == [False, False]  # train and val records freed before the load
    assert seen["written"] == [True, True]
    assert json.loads((run / "manifest.json").read_text())["data"]["train_families"] > 0

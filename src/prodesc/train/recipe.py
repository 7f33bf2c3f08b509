"""`prodesc train`: LoRA / QLoRA fine-tuning on TRL's SFTTrainer, into a self-describing run directory.

    prodesc train --config configs/smollm2-135m.yaml --data demo/data --out runs/smol
    prodesc train --out runs/smol --data demo/data --resume        # continue from the last checkpoint

RUN_DIR after a run:
    adapter/            PEFT adapter + tokenizer (the best checkpoint by val loss)
    base/               the base model, only for `tiny` runs (random init lives nowhere else)
    config.resolved.yaml  the fully resolved config (config.resume-N.yaml beside it: a resume's changed settings)
    manifest.json       base model reference, versions, data fingerprint, hardware, losses, tokens/s
    train_families.txt.gz  families of the training records (their names: the manifest's fingerprint)
    train_index.npz     family key, content hash, near-duplicate signature per training record: eval and
                        generate --data refuse items the run trained on (data/overlap.py)
    catalog/            retrieval.k > 0: the train split's title vectors and texts, searched for neighbours
    metrics.jsonl, logs/ (TensorBoard; train.report_to adds wandb/, mlruns/, trackio/: trackers.py), checkpoints/

Catalog neighbours (retrieval.k > 0): each example's prompt holds its k nearest train records, never itself nor its
family (examples.py). Titles are looked up in DATA/index/ when `prodesc data index DATA` wrote one, else embedded.

Several GPUs: the same command under `accelerate launch` (configs/accelerate/: DDP, FSDP-QLoRA); rank 0 alone
writes RUN_DIR, see dist.py.
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m prodesc.cli train ...
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from prodesc import config as configmod
from prodesc import dist, models, rundir
from prodesc.config import ProdescConfig
from prodesc.data import data_settings, write_index
from prodesc.errors import ProdescError
from prodesc.records import check_split_titles, title_cap
from prodesc.rundir import build_manifest, data_fingerprint
from prodesc.train import checks, encoding, examples, trackers
from prodesc.train.checkpoints import resumable

PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}




def train_cli(
    data: Path,
    out: Path,
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Resolve the settings (a resumed run starts from its own resolved config) and train."""
    changed: list[str] = []
    if resume and any((out / name).is_file() for name in (rundir.RESOLVED, "config.yaml")):
        base = rundir.run_config(out)
        cfg = configmod.resolve(base, config, flags, sets or (), locked=configmod.LOCKED_ON_RESUME)
        trust = {k: v for k, v in (flags or {}).items() if k == "model.trust_remote_code"}  # a permission, no change
        changed = configmod.changed_keys(configmod.resolve(base, flags=trust), cfg)
    else:
        cfg = configmod.resolve(config=config, flags=flags, sets=sets or ())
    return train(cfg, data, out, resume=resume, overwrite=overwrite, changed=changed)


def train(
    cfg: ProdescConfig,
    data: Path,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    changed: list[str] | None = None,
) -> Path:
    """Fine-tune `cfg.model` on `data/train.parquet`, validating on `data/val.parquet`; return the run dir."""
    dist.state()  # under a launcher: join the process group and pin this rank's GPU before any model loads
    rows = {split: _read_split(data, split) for split in ("train", "val") if (data / f"{split}.parquet").is_file()}
    problems = checks.find_problems(cfg, data, out, resume, overwrite, rows)
    if problems:  # every rank reaches the same verdict before rank 0 touches the run dir
        raise ProdescError("cannot train:\n  " + "\n  ".join(problems))
    catalog = examples.catalog(cfg, data, rows)  # before the run dir and the weights: needs no model
    checkpoint = _prepare_run_dir(cfg, out, resume, changed or [])
    started = time.time()
    near = functools.partial(examples.near, catalog, cfg, rows)  # searched only when the examples are not cached
    base = _tiny_base(rows["train"], cfg, out) if cfg.model.name == "tiny" else None
    train_ds, val_ds, lengths = _setup_data(_setup_tokenizer(cfg, base), cfg, rows, near, data)
    families = _write_train_record(out, cfg, data, rows["train"])
    del rows, near  # the records as Python objects (~3 GiB a million) are not held while the weights load and train
    model, tok, base_ref = _setup_model(cfg, base)  # the weights, once the examples are ready
    trainer, watch = _setup_trainer(cfg, model, tok, train_ds, val_ds, out)
    _fit(trainer, watch, cfg, checkpoint)
    _save_adapter(trainer, tok, out)
    if dist.is_main():
        stats = _run_stats(trainer, watch, lengths, cfg, model, time.time() - started)
        _write_run(out, base_ref, data, families, stats, catalog)
        _print_summary(out, stats, cfg)
    return out


def _prepare_run_dir(cfg: ProdescConfig, out: Path, resume: bool, changed: list[str]) -> str | None:
    """Create (or keep, on --resume) the run dir and write its settings first, so a crashed run resumes with them.
    A resume with changed settings keeps the original config.resolved.yaml and writes the new one beside it."""
    last, damaged = resumable(out / "checkpoints") if resume else (None, [])
    dist.barrier()
    if dist.is_main():
        if not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for path, problem in damaged:  # moved aside: neither the Trainer's rotation nor the next --resume trips on it
            aside = path.with_name(f"damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            print(f"--resume: skipping {path}: {problem} (moved to {aside.name})")
        if last:
            print(f"resuming from {last}")
        if changed:
            n = 1 + sum(1 for _ in out.glob("config.resume-*.yaml"))
            configmod.dump(cfg, out / f"config.resume-{n}.yaml")
            print(f"warning: resuming with changed settings: {', '.join(changed)} (the run's original settings stay "
                  f"in {rundir.run_config(out).name}, these are in config.resume-{n}.yaml)")
        elif not resume:
            rundir.write_resolved(cfg, out)
    dist.barrier()
    return last


def _read_split(data: Path, split: str) -> list[dict[str, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(data / f"{split}.parquet", columns=["uid", "title", "content", "family"])
    rows = table.to_pylist()
    check_split_titles(data / f"{split}.parquet", [r["title"] for r in rows], title_cap(data))
    return rows


def _setup_tokenizer(cfg: ProdescConfig, base: str | None = None) -> Any:
    """The tokenizer alone, as training will hold it (pad fixed): the examples need no weights. `base`: the
    random base of model.name=tiny (_tiny_base)."""
    tok = models.load_tokenizer(base or models.resolve(cfg.model.name, cfg.model.cache_dir), cfg.model)
    models.fix_pad(tok)
    return tok


def _setup_model(cfg: ProdescConfig, base: str | None = None) -> tuple[Any, Any, dict]:
    if cfg.model.name == "tiny":
        if base is None:
            raise ValueError("model.name=tiny trains from a base built by _tiny_base")
        model, tok = models.load(cfg.model, path=base, for_training=True)
        return model, tok, {"name": "tiny", "path": "base", **_weights(model)}
    model, tok = models.load(cfg.model, for_training=True)
    name = cfg.model.name
    if Path(name).exists():
        name = str(Path(name).resolve())
    return model, tok, {"name": name, "revision": cfg.model.revision, **_weights(model)}


def _tiny_base(train_rows: list[dict], cfg: ProdescConfig, out: Path) -> str:
    """RUN_DIR/base: rank 0 builds the random base (a resumed run keeps its own); the others wait, then use it."""
    base = out / "base"
    with dist.main_first():
        if dist.is_main() and not (base / "config.json").exists():
            models.build_tiny([f"{r['title']}\n{r['content']}" for r in train_rows], cfg.model, base)
    return str(base)


def _weights(model: Any) -> dict[str, Any]:
    """How the base weights were held while training (export and generate reload them the same way)."""
    return {
        "quantization": "nf4" if getattr(model, "is_loaded_in_4bit", False) else "none",
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def _setup_data(
    tok: Any,
    cfg: ProdescConfig,
    rows: dict[str, list[dict]],
    near: Any = None,
    data: Path | None = None,
) -> tuple[Any, Any, dict]:
    """Train and val datasets and their lengths (encoding.py; cached in `data` when given)."""
    return encoding.build(tok, cfg, rows, near, data)


def _setup_trainer(cfg: ProdescConfig, model: Any, tok: Any, train_ds: Any, val_ds: Any, out: Path) -> tuple:
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from prodesc.train.callbacks import MetricsLogger, NanGuard, Throughput

    procs = encoding.workers(cfg, len(train_ds))  # TRL maps the examples once more (labels): as many processes
    report_to, logging = trackers.setup(cfg.train.report_to, out)
    args = SFTConfig(**_sft_args(cfg, out, has_val=val_ds is not None, model=model), dataset_num_proc=procs,
                     report_to=report_to, project=trackers.PROJECT, run_name=out.name)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora,
        modules_to_save=cfg.lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    watch = {"nan": NanGuard(), "speed": Throughput()}
    callbacks = [MetricsLogger(out / "metrics.jsonl"), watch["nan"], watch["speed"], *logging]
    if val_ds is not None and cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tok,
        peft_config=lora,
        callbacks=[c for c in callbacks if c],
    )
    return trainer, watch


def _sft_args(cfg: ProdescConfig, out: Path, has_val: bool, model: Any) -> dict[str, Any]:
    import torch

    t = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and model.dtype == torch.bfloat16 or getattr(model, "is_loaded_in_4bit", False)
    return dict(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        use_liger_kernel=t.liger,
        torch_compile=t.torch_compile,
        bf16=bf16,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if has_val else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the default hides NaN losses behind a running mean; NanGuard must see them
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient each step; DDP needn't search the graph
        # Always explicit: TRL's SFTConfig defaults it to True, so leaving it out meant checkpointing on (~30% slower)
        gradient_checkpointing=t.gradient_checkpointing,
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if t.gradient_checkpointing else {}),
    )


def _fit(trainer: Any, watch: dict, cfg: ProdescConfig, checkpoint: str | None) -> None:
    import torch

    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        t = cfg.train
        raise ProdescError(
            f"CUDA out of memory at train.batch_size={t.batch_size}, train.max_length={t.max_length}: lower "
            "train.batch_size (raise train.grad_accum to keep the batch), lower train.max_length, set "
            "train.gradient_checkpointing=true or model.quantization=nf4"
        ) from None
    if watch["nan"].bad_step is not None:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(trainer.args.output_dir)
        raise ProdescError(
            f"loss became {watch['nan'].bad_value} at step {watch['nan'].bad_step}; training stopped. Last good "
            f"checkpoint: {last or 'none'}. Lower train.learning_rate or check the data, then --resume"
        )


def _save_adapter(trainer: Any, tok: Any, out: Path) -> None:
    """The best adapter into RUN_DIR/adapter. Every rank calls it (under FSDP it gathers the shards); rank 0 writes."""
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded for speed; the adapter must load without FSDP
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "adapter"))
    if dist.is_main():
        tok.save_pretrained(out / "adapter")
        (out / "adapter" / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config has it


def _run_stats(trainer: Any, watch: dict, lengths: dict, cfg: ProdescConfig, model: Any, wall: float) -> dict:
    import torch

    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    speed = watch["speed"].summary(trainer.state)
    stats = dict(
        wall_time_s=round(wall, 1),
        global_step=trainer.state.global_step,
        **speed,
        first_train_loss=losses[0] if losses else None,
        final_train_loss=losses[-1] if losses else None,
        best_val_loss=trainer.state.best_metric if evals else None,
        final_val_loss=evals[-1] if evals else None,
        examples=lengths,
        logged_to=trackers.logged_to(cfg.train.report_to, trainer),
    )
    if torch.cuda.is_available():
        stats["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        stats["mfu"] = _mfu(stats.get("tokens_per_s"), model)
    return stats


def _mfu(tokens_per_s: float | None, model: Any) -> float | None:
    """Model FLOPs utilisation for LoRA: ~4 N FLOPs per token (forward 2N + input-gradient backward 2N; the frozen
    weights get no weight gradients), over the dense bf16 datasheet peak of all the cards (tokens/s counts every
    rank)."""
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if not tokens_per_s or peak is None:
        return None
    n = _param_count(model)
    return round(4 * n * tokens_per_s / (peak * dist.state().num_processes), 4)


def _param_count(model: Any) -> int:
    """Real parameter count: bitsandbytes packs 4-bit weights several to a storage element (2 per uint8, 4 per
    bf16 with bnb_4bit_quant_storage), so numel() undercounts them."""
    n = 0
    for p in model.parameters():
        if p.__class__.__name__ == "Params4bit":
            n += p.numel() * p.element_size() * 2
        else:
            n += p.numel()
    return n


def _write_train_record(out: Path, cfg: ProdescConfig, data: Path, train_rows: list[dict]) -> list[str]:
    """What the run keeps of the records it trains on, written before the weights load (the records are not held
    through training): their families (train_families.txt.gz) and the leak guard's index of them; returns the
    families for the manifest."""
    families = sorted({r["family"] for r in train_rows})
    if dist.is_main():
        with gzip.open(out / "train_families.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(families) + "\n")
        write_index(out, train_rows, data_settings(data, cfg.data))  # near-duplicates as the data defines them
    return families


def _write_run(out: Path, base_ref: dict, data: Path, families: list[str], stats: dict, catalog: Any) -> None:
    if catalog is not None:
        catalog.save(out / "catalog")
    manifest = build_manifest(base_ref, data_fingerprint(data, families), stats)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _print_summary(out: Path, s: dict, cfg: ProdescConfig) -> None:
    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else str(x)

    print(
        f"\ntrained {s['global_step']} steps in {s['wall_time_s']} s, "
        f"{s.get('tokens_per_s') or 0:.0f} tokens/s" + (f", MFU {s['mfu']:.1%}" if s.get("mfu") else "")
    )
    print(
        f"train loss {fmt(s['first_train_loss'])} -> {fmt(s['final_train_loss'])}; "
        f"best val loss {fmt(s['best_val_loss'])}"
    )
    if cfg.generate.stop_boost_after == "auto":
        answers = s["examples"].get("answer_tokens", {})
        print(f"length prior: the end token is pushed after {answers.get(rundir.LENGTH_PRIOR)} new tokens (the "
              "training answers' 60th percentile; generate.stop_boost_after: auto)")
    print(f'run dir: {out}  (next: prodesc generate --run {out} "A TITLE")')

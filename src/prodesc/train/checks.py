"""Everything `prodesc train` can find wrong before a model loads, reported together, one `field: message` each.

    problems = find_problems(cfg, data, out, resume=False, overwrite=False, rows=rows)   # [] when all is well

Checked: the data dir, the run dir (`--out` a file, an existing run without --overwrite/--resume, --resume
without a checkpoint), step multiples when a best checkpoint is kept, optimizer and scheduler names as
transformers knows them, LoRA target modules against the model's own module names (its config is read, its
weights are not: the model is built on the meta device), a `train.max_length` shorter than the prompts, Liger on
CPU, nf4 on CPU or on the tiny model, a `train.report_to` tracker that is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prodesc import models, prompts
from prodesc.config import ProdescConfig
from prodesc.errors import ProdescError
from prodesc.train import examples, trackers
from prodesc.train.checkpoints import resumable

MIN_ANSWER_TOKENS = 16  # room left for the description after the longest prompt


def find_problems(
    cfg: ProdescConfig, data: Path, out: Path, resume: bool, overwrite: bool, rows: dict[str, list[dict]]
) -> list[str]:
    """Every problem found, as `field: message` lines (empty when training may start)."""
    problems = _paths(data, out, resume, overwrite)
    if "train" in rows and not rows["train"]:
        problems.append(f"--data: {data / 'train.parquet'} is empty: prepare more data or lower --val/--test-fraction")
    problems += _schedule(cfg, has_val=bool(rows.get("val")))
    problems += _hardware(cfg)
    problems += trackers.problems(cfg.train.report_to)
    try:
        examples.check(cfg)
    except ProdescError as e:
        problems.append(f"retrieval.chars: {e}")
    return problems + _model(cfg, rows.get("train") or [])


def _paths(data: Path, out: Path, resume: bool, overwrite: bool) -> list[str]:
    problems = [
        f"--data: {data / f'{split}.parquet'} not found: run `prodesc data prepare ... --out {data}`"
        for split in ("train", "val")
        if not (data / f"{split}.parquet").is_file()
    ]
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} is a file: pass a directory for the run")
    elif resume:
        try:
            resumable(out / "checkpoints")
        except ProdescError as e:
            problems.append(str(e))
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        problems.append(f"--out: run dir {out} already exists: pass --overwrite to replace it or --resume to continue")
    return problems


def _schedule(cfg: ProdescConfig, has_val: bool) -> list[str]:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    t, problems = cfg.train, []
    if has_val and t.save_steps % t.eval_steps:  # the best checkpoint (by val loss) is kept whenever there is a val
        problems.append(
            f"train.save_steps: {t.save_steps} must be a multiple of train.eval_steps ({t.eval_steps}) to keep the "
            f"best checkpoint: set train.save_steps={t.eval_steps}"
        )
    optims = sorted(o.value for o in OptimizerNames)
    if t.optim not in optims:
        problems.append(f"train.optim: unknown optimizer {t.optim!r}{_closest(t.optim, optims)}")
    schedulers = sorted(s.value for s in SchedulerType)
    if t.lr_scheduler not in schedulers:
        hint = _closest(t.lr_scheduler, schedulers)
        problems.append(f"train.lr_scheduler: unknown scheduler {t.lr_scheduler!r}{hint}")
    return problems


def _hardware(cfg: ProdescConfig) -> list[str]:
    import torch

    problems = []
    cuda = torch.cuda.is_available()
    if cfg.train.liger and not cuda:
        problems.append("train.liger: Liger kernels need a CUDA GPU (Triton): set train.liger=false on CPU")
    if cfg.model.quantization == "nf4" and cfg.model.name == "tiny":
        problems.append("model.quantization: nf4 makes no sense for the tiny model: set model.quantization=none")
    elif cfg.model.quantization == "nf4" and not cuda:
        problems.append("model.quantization: nf4 needs a CUDA GPU (bitsandbytes): set model.quantization=none on CPU")
    return problems


def _model(cfg: ProdescConfig, train_rows: list[dict]) -> list[str]:
    """LoRA targets and prompt lengths, from the model's config and tokenizer (no weights)."""
    if cfg.model.name == "tiny":  # its tokenizer is trained on the data when the run starts
        return _targets(cfg, _tiny_linear_names())
    try:
        src = models.resolve(cfg.model.name, cfg.model.cache_dir)
        names = _linear_names(src, cfg)
        tok = models.load_tokenizer(src, cfg.model)
    except ProdescError as e:
        return [f"model.name: {e}"]
    return _targets(cfg, names) + _prompt_room(cfg, tok, train_rows)


def _targets(cfg: ProdescConfig, names: set[str]) -> list[str]:
    wanted = cfg.lora.target_modules
    if wanted == "all-linear" or isinstance(wanted, str):
        return []  # "all-linear", or a regex PEFT matches against full module names
    missing = [m for m in wanted if m not in names]
    if not missing:
        return []
    return [f"lora.target_modules: {', '.join(missing)} not in {cfg.model.name} (its linear layers: "
            f"{', '.join(sorted(names))}); use those names or 'all-linear'"]


def _prompt_room(cfg: ProdescConfig, tok: Any, train_rows: list[dict]) -> list[str]:
    if not train_rows:
        return []
    longest = max(train_rows, key=lambda r: len(r["title"]))["title"]
    need = len(prompts.prompt_ids(tok, longest, cfg.prompt)) + MIN_ANSWER_TOKENS
    if cfg.train.max_length >= need:
        return []
    return [f"train.max_length: {cfg.train.max_length} tokens leave no room for an answer after the longest prompt "
            f"({need - MIN_ANSWER_TOKENS} tokens): set train.max_length to at least {need}"]


def _linear_names(src: str, cfg: ProdescConfig) -> set[str]:
    """Names of the model's nn.Linear leaves (q_proj, ...), from a model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        mcfg = AutoConfig.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code,
                                          revision=cfg.model.revision)
    except (OSError, ValueError) as e:
        raise models._not_found(src, e) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _tiny_linear_names() -> set[str]:
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def _closest(value: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(value, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"

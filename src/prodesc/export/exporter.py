"""`prodesc export`: a run's adapter merged into a plain checkpoint (HF safetensors, or one GGUF for llama.cpp/Ollama).

    prodesc export runs/smol --out exports/smol                       # loads with AutoModelForCausalLM.from_pretrained
    prodesc export runs/smol --out exports/smol-gguf --format gguf    # smol-q8_0.gguf + Modelfile (--gguf-type ...)
    prodesc export runs/smol --out exports/smol-adapter --no-merge

Every export carries the training instruction in its chat template (`prompts.baked_chat_template`): a bare title
sent as the user message to vLLM, llama.cpp, Ollama or LM Studio gets exactly the prompt the model was trained on.
QLoRA runs: the adapter was trained against the *de-quantized* nf4 weights, not the original bf16 ones, so we load
the base in nf4 exactly as in training, de-quantize it to bf16 and merge there. Merging into the original bf16
base would add the update to weights the adapter never saw (the nf4 rounding error is of the same order as the
LoRA update), and merging into nf4 would round the update away. This path needs CUDA (bitsandbytes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from prodesc import models, prompts, rundir
from prodesc.catalog import CATALOG_DIR, check_store
from prodesc.errors import ProdescError
from prodesc.export import gguf_file, modelfile
from prodesc.files import check_adapter
from prodesc.rundir import atomic_dir, length_prior, read_manifest, refuse_existing, write_resolved

FORMATS = ("hf", "gguf")


def export(
    run: Path,
    out: Path,
    merge: bool = True,
    overwrite: bool = False,
    format: str = "hf",
    gguf_type: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write `out` atomically: merged checkpoint (default), adapter + base reference (`merge=False`) or a GGUF.
    Remote code runs only with `trust_remote_code` (the command's flag), never because the run's config says so."""
    manifest = read_manifest(run)
    cfg = rundir.settings(run, flags={"model.trust_remote_code": True} if trust_remote_code else None)
    base = manifest["base_model"]
    format, gguf_type = format.lower(), _check_options(format.lower(), gguf_type, merge)
    _refuse_out_over_run(run, out)
    refuse_existing(out, overwrite, "export dir")
    if merge and base.get("quantization") == "nf4":
        _need_cuda()
    _check_run_files(run, base, cfg)
    tok = models.load_tokenizer(str(run / "adapter"))
    tok.chat_template = prompts.baked_chat_template(tok, cfg.prompt)  # refuses what it can't extend, before weights
    if format == "gguf":
        gguf_file.check(_base_source(run, base, cfg), tok, gguf_type)
    with atomic_dir(out, overwrite, "export dir") as tmp:
        if format == "gguf":
            merged = _merge(run, base, cfg, tmp / ".merged", tok)
            name = gguf_file.write(merged, tmp, _file_stem(run), gguf_type)
            modelfile.write(tmp, name, merged, cfg, _file_stem(run))
            shutil.rmtree(merged)
        elif merge:
            _merge(run, base, cfg, tmp, tok)
        else:
            _copy_adapter(run, base, tmp, tok)
        write_resolved(cfg, tmp)
        if cfg.retrieval.k and format != "gguf":  # `serve/generate --model DIR` put the same neighbours in prompts
            shutil.copytree(run / CATALOG_DIR, tmp / CATALOG_DIR)
        info = {"run": str(run.resolve()), "base_model": base, "format": format, "gguf_type": gguf_type,
                "prompt": cfg.prompt.model_dump(mode="json"), "retrieval": cfg.retrieval.model_dump(mode="json"),
                "generate": cfg.generate.model_dump(mode="json", include=set(rundir.DECODING)),
                "length_prior": _length_prior(run)}
        (tmp / "prodesc_export.json").write_text(json.dumps(info, indent=2))
    what = f"GGUF {name} + Modelfile" if format == "gguf" else "merged model" if merge else "adapter"
    print(f"exported {what} to {out}")
    if format == "gguf" and cfg.retrieval.k:
        print(f"note: the run puts {cfg.retrieval.k} catalog neighbours in each prompt; the GGUF has no catalog, so "
              "it answers from the title alone (see the Modelfile)")
    return out


def _refuse_out_over_run(run: Path, out: Path) -> None:
    """`--out` must not be the run, inside it or above it: the swap into place would delete the run (checkpoints,
    manifest) or write the export into it."""
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        where = "is the run dir" if o == r else "is inside the run dir" if r in o.parents else "holds the run dir"
        raise ProdescError(f"--out {out} {where} {run}: exporting there would replace the run; pass a path outside "
                           "it, e.g. --out exports/NAME")


def _check_run_files(run: Path, base: dict, cfg: Any) -> None:
    """What the export reads from the run, checked before any weights load: the adapter whole, the catalog whole,
    and nothing reached through a symlink or `..` out of the run dir (a run dir from someone else must not copy
    any local file into an export)."""
    check_adapter(run / "adapter", "it is written when training ends: train the run again")
    inside = [run / "adapter"] + ([run / base["path"]] if base.get("path") else [])
    if cfg.retrieval.k:
        if not (run / CATALOG_DIR / "meta.json").exists():
            raise ProdescError(f"{run} was trained with catalog neighbours but has no {CATALOG_DIR}/: retrain it")
        check_store(run / CATALOG_DIR)
        inside.append(run / CATALOG_DIR)
    for top in inside:
        for path in [top, *top.rglob("*")]:
            if path.is_symlink() or not path.resolve().is_relative_to(run.resolve()):
                what = "is a link" if path.is_symlink() else "is outside the run dir"
                raise ProdescError(f"{path} {what} (to {path.resolve()}): a run dir holds its own files; replace "
                                   "the link with the file, or export a run you trained")


def _check_options(format: str, gguf_type: str | None, merge: bool) -> str | None:
    if format not in FORMATS:
        raise ProdescError(f"unknown export format {format!r}: use --format hf (the default) or --format gguf")
    if format == "hf":
        if gguf_type is not None:
            raise ProdescError("--gguf-type goes with --format gguf: add --format gguf or drop --gguf-type")
        return None
    if not merge:
        raise ProdescError("a GGUF holds merged weights: drop --no-merge (or export the adapter with --format hf)")
    gguf_type = (gguf_type or gguf_file.DEFAULT_TYPE).lower()
    if gguf_type not in gguf_file.TYPES:
        raise ProdescError(f"unknown --gguf-type {gguf_type!r}: choose one of {', '.join(gguf_file.TYPES)}")
    return gguf_type


def _file_stem(run: Path) -> str:
    """The run dir's name, safe as a file name and an Ollama model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run.resolve().name).strip("-.") or "prodesc"


def _base_source(run: Path, base: dict, cfg: Any) -> str:
    return str(run / base["path"]) if base.get("path") else models.resolve(cfg.model.name)


def _merge(run: Path, base: dict, cfg: Any, dest: Path, tok: Any) -> Path:
    """The merged checkpoint in `dest`, with `tok` (its chat template carrying the training instruction)."""
    import torch
    from peft import PeftModel

    cfg = cfg.model_copy(deep=True)  # load settings for the merge only; the export records the run's own
    path = str(run / base["path"]) if base.get("path") else None
    if base.get("quantization") == "nf4":
        cfg.model.quantization = "nf4"
        model, _ = models.load(cfg.model, path=path)
        model = model.dequantize()  # bf16 copies of exactly the weights the adapter was trained against
    else:
        cfg.model.quantization = "none"
        cfg.model.dtype = (
            base.get("dtype", "auto") if base.get("dtype") in ("bfloat16", "float16", "float32") else "auto"
        )
        model, _ = models.load(cfg.model, path=path)
    model = PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _copy_adapter(run: Path, base: dict, tmp: Path, tok: Any) -> None:
    shutil.copytree(run / "adapter", tmp, dirs_exist_ok=True)
    tok.save_pretrained(tmp)  # the adapter's tokenizer, with the baked chat template (vLLM --tokenizer DIR)
    if base.get("path"):  # tiny runs: the random base exists only inside the run
        shutil.copytree(run / base["path"], tmp / "base")


def _need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ProdescError(
            "this run is QLoRA (nf4): merging de-quantizes the nf4 base, which needs a CUDA GPU with bitsandbytes; "
            "run export there, or use --no-merge to export the adapter alone"
        )


def _length_prior(run: Path) -> int | None:
    """The run's `generate.stop_boost_after: auto` (rundir.length_prior), for `--model DIR` with that setting; None
    for a run trained before prodesc recorded answer lengths."""
    try:
        return length_prior(run)
    except ProdescError:
        return None

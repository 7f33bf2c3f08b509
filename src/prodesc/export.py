"""`prodesc export`: a run's adapter merged into a plain, full-precision HF checkpoint.

    prodesc export runs/smol --out exports/smol            # loads with AutoModelForCausalLM.from_pretrained
    prodesc export runs/smol --out exports/smol-adapter --no-merge

The merged model loads with plain transformers (no PEFT, no prodesc) and serves with vLLM/TGI as any checkpoint.
A run trained with catalog neighbours (retrieval.k > 0) exports its catalog/ and its prompt and retrieval settings
(prodesc_export.json) too: `prodesc serve --model DIR` and `generate --model DIR` then put the same neighbours in
the prompt; other servers see a plain model and would need the neighbours in the user turn (prompts.user_text).
QLoRA runs: the adapter was trained against the *de-quantized* nf4 weights, not the original bf16 ones, so we load
the base in nf4 exactly as in training, de-quantize it to bf16 and merge there. Merging into the original bf16
base would add the update to weights the adapter never saw (the nf4 rounding error is of the same order as the
LoRA update), and merging into nf4 would round the update away. This path needs CUDA (bitsandbytes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prodesc import config as configmod
from prodesc import models
from prodesc.catalog import CATALOG_DIR
from prodesc.errors import ProdescError
from prodesc.rundir import atomic_dir, read_manifest, refuse_existing


def export(run: Path, out: Path, merge: bool = True, overwrite: bool = False) -> Path:
    """Write `out` atomically: merged checkpoint (default) or adapter + base reference (`merge=False`)."""
    manifest = read_manifest(run)
    refuse_existing(out, overwrite, "export dir")
    base = manifest["base_model"]
    if merge and base.get("quantization") == "nf4":
        _need_cuda()
    if configmod.load(run / "config.yaml").retrieval.k and not (run / CATALOG_DIR / "meta.json").exists():
        raise ProdescError(f"{run} was trained with catalog neighbours but has no {CATALOG_DIR}/: retrain it")
    with atomic_dir(out, overwrite, "export dir") as tmp:
        (_merge if merge else _copy_adapter)(run, base, tmp)
        _copy_catalog(run, tmp)
    print(f"exported {'merged model' if merge else 'adapter'} to {out}")
    return out


def _merge(run: Path, base: dict, tmp: Path) -> None:
    import torch
    from peft import PeftModel

    cfg = configmod.load(run / "config.yaml")
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
    tok = models.load_tokenizer(str(run / "adapter"))
    model = PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with torch.no_grad():
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "prodesc_export.json").write_text(json.dumps({"run": str(run.resolve()), "base_model": base}, indent=2))


def _copy_adapter(run: Path, base: dict, tmp: Path) -> None:
    shutil.copytree(run / "adapter", tmp, dirs_exist_ok=True)
    if base.get("path"):  # tiny runs: the random base exists only inside the run
        shutil.copytree(run / base["path"], tmp / "base")
    (tmp / "prodesc_export.json").write_text(json.dumps({"run": str(run.resolve()), "base_model": base}, indent=2))


def _copy_catalog(run: Path, tmp: Path) -> None:
    """The catalog and the settings that build the prompt from it, beside the weights."""
    cfg = configmod.load(run / "config.yaml")
    if cfg.retrieval.k and (run / CATALOG_DIR).is_dir():
        shutil.copytree(run / CATALOG_DIR, tmp / CATALOG_DIR)
    meta_path = tmp / "prodesc_export.json"
    meta = json.loads(meta_path.read_text())
    meta.update(prompt=cfg.prompt.model_dump(mode="json"), retrieval=cfg.retrieval.model_dump(mode="json"))
    meta_path.write_text(json.dumps(meta, indent=2))


def _need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ProdescError(
            "this run is QLoRA (nf4): merging de-quantizes the nf4 base, which needs a CUDA GPU with bitsandbytes; "
            "run export there, or use --no-merge to export the adapter alone"
        )

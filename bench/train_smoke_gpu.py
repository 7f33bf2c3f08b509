"""GPU smoke test of the low-memory preset: `prodesc train --config configs/mistral-7b-qlora.yaml` for a few steps.

    python bench/train_smoke_gpu.py                       # on the device; model and data as in train_throughput.py
    python bench/train_smoke_gpu.py --tiny --steps 3      # CPU: the same code path on a 2-layer model, no nf4

Runs the preset's code path unchanged (nf4 weights through bitsandbytes, LoRA, packing, Liger, checkpointing)
through `prodesc.train.recipe.train` on the random-init Mistral-7B-shaped model, then checks the run dir (adapter,
config.resolved.yaml, manifest.json with tokens/s) and prints prodesc's own throughput numbers (its Throughput callback:
all steps after the first) and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the model and data makers)

ROOT = tt.ROOT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m7b")
    ap.add_argument("--data-dir", default="/tmp/bench-data")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl" / "mistral-tok"))
    ap.add_argument("--preset", default="configs/mistral-7b-qlora.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/smoke-qlora"))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    import torch

    from prodesc import config as configmod
    from prodesc.train.recipe import train

    if not Path(a.model_dir, "config.json").exists():
        tt.make_model(a.model_dir, a.tokenizer, a.tiny)
    if not Path(a.data_dir, "train.parquet").exists():
        tt.make_data(a.data_dir, a.tokenizer)
    sets = [f"model.name={a.model_dir}", f"train.max_steps={a.steps}", "train.eval_steps=4", "train.save_steps=4",
            "train.logging_steps=1", "train.max_eval_samples=8"]
    if a.tiny:
        sets += ["model.quantization=none", "model.dtype=float32", "train.liger=false", "train.optim=adamw_torch"]
    cfg = configmod.load(ROOT / a.preset, sets)
    t = time.time()
    run = train(cfg, Path(a.data_dir), a.out, overwrite=True)
    manifest = json.loads((run / "manifest.json").read_text())
    stats = manifest["training"]
    listing = sorted(p.name for p in run.iterdir())
    missing = {"adapter", "config.resolved.yaml", "manifest.json", "metrics.jsonl"} - set(listing)
    summary = {
        "preset": a.preset, "steps": stats["global_step"], "tokens_per_s": stats.get("tokens_per_s"),
        "peak_gpu_gib": stats.get("peak_gpu_gib"), "mfu": stats.get("mfu"),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        "loss_first_last": [stats["first_train_loss"], stats["final_train_loss"]],
        "best_val_loss": stats.get("best_val_loss"), "quantization": manifest["base_model"].get("quantization"),
        "wall_s": round(time.time() - t, 1), "run_dir": listing, "missing": sorted(missing),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print("SMOKE " + json.dumps(summary), flush=True)
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    if missing or not stats["global_step"] == a.steps:
        raise SystemExit(f"smoke test failed: missing {sorted(missing)}, steps {stats['global_step']}/{a.steps}")


if __name__ == "__main__":
    main()

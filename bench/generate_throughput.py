"""Generation throughput on one GPU: the notebook's way (nf4, batch 1, HF generate) vs prodesc's `Generator`.

    # on the device machine (docs/PERFORMANCE.md has the exact command; model from bench/train_throughput.py make):
    python bench/generate_throughput.py all --out $OUT/generate.json
    BENCH_FAST=force python bench/generate_throughput.py all --tiny --out /tmp/g.json   # CPU plumbing

Model: the random-init Mistral-7B-v0.3 shape of bench/train_throughput.py (`make`), with the real tokenizer. A
random model almost never emits EOS, so every answer runs to max_new_tokens (256): the numbers are decode speed
at full length. New tokens/s = generated tokens (per answer, up to and including EOS) / wall time of the timed call.

Configs (one process for nf4, one for all bf16 ones, so the 14.5 GB of weights load once):
  notebook-nf4-b1   nf4 weights, `model.generate` on one 40-token prompt at a time (anchor_seed.py's gen)
  plain-bf16-b1/b64 `Generator.describe` with the fast path off (generate.compile=off): dynamic cache, eager
  prodesc-b1/b64/b128  `Generator.describe` as `prodesc generate` runs it on a GPU: static cache, compiled decode
  prodesc-peft-b64  the same with an unmerged LoRA adapter (what `prodesc serve` holds: merge=False)
The fast b64 answers are compared token by token with the plain b64 ones on the same padded batch; where they
part, the plain path's top-1/top-2 logit gap at that step tells a bf16 near-tie from a real difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["all", "nf4", "bf16"])
    ap.add_argument("--model-dir", default="/tmp/m7b")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl" / "mistral-tok"))
    ap.add_argument("--configs", default="notebook,prodesc-b64,plain-bf16-b64,prodesc-b1,plain-bf16-b1,prodesc-b128,"
                                         "prodesc-peft-b64")
    ap.add_argument("--budget-s", type=float, default=420, help="bf16: skip configs that would start after this")
    ap.add_argument("--new-tokens", type=int, default=NEW)
    ap.add_argument("--dtype", default="bfloat16", help="bf16 configs: model.dtype (float32 for a tighter check)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.cmd == "nf4":
        print("RESULT " + json.dumps([notebook_nf4(a)]), flush=True)
    elif a.cmd == "bf16":
        print("RESULT " + json.dumps(bf16_configs(a)), flush=True)
    else:
        run_all(a)


def run_all(a: argparse.Namespace) -> None:
    start = time.time()
    if not Path(a.model_dir, "config.json").exists():
        cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "make", "--model-dir", a.model_dir,
               "--tokenizer", a.tokenizer] + (["--tiny"] if a.tiny else [])
        subprocess.run(cmd, check=True)
    results: list[dict] = []
    common = ["--model-dir", a.model_dir, "--tokenizer", a.tokenizer, "--new-tokens", str(a.new_tokens),
              "--dtype", a.dtype]
    common += ["--tiny"] if a.tiny else []
    steps = [["nf4"]] if "notebook" in a.configs else []
    steps.append(["bf16", "--configs", a.configs.replace("notebook,", ""),
                  "--budget-s", str(a.budget_s - (time.time() - start))])
    for cmd in steps:
        results += _child([sys.executable, __file__, *cmd, *common])
        nb = next((r["new_tokens_per_s"] for r in results if r["name"] == "notebook-nf4-b1"), None)
        for r in results:
            r["ratio_vs_notebook"] = round(r["new_tokens_per_s"] / nb, 1) if nb else None
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'config':18} {'batch':>5} {'new tok/s':>10} {'x notebook':>10} {'peak GiB':>8} {'s':>7} "
          f"{'compile s':>9}")
    for r in results:
        print(f"{r['name']:18} {r['batch']:5d} {r['new_tokens_per_s']:10.1f} {r.get('ratio_vs_notebook') or 0:10.1f} "
              f"{r['peak_gib']:8.1f} {r['seconds']:7.2f} {r.get('compile_s') or 0:9.1f}")
    for r in results:
        if r.get("agreement"):
            print(f"{r['name']}: agreement with plain generate: {json.dumps(r['agreement'])}")


def _child(cmd: list[str]) -> list[dict]:
    print("+ " + " ".join(cmd[1:]), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith(("[", "RESULT")):
            print(line[:2000], flush=True)
    res = next((json.loads(x[7:]) for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if res is None:
        print((p.stderr or p.stdout)[-3000:], flush=True)
        return []
    return res


def notebook_nf4(a: argparse.Namespace) -> dict:
    """The notebook: nf4 weights, HF generate, one prompt, greedy, 256 new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpu = torch.cuda.is_available() and not a.tiny
    kw: dict = {"device_map": {"": 0}} if gpu else {"dtype": torch.float32}
    if gpu:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
    ids = torch.randint(3, 32768, (1, 40), generator=torch.Generator().manual_seed(0)).to(model.device)
    model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    _reset_peak()
    _sync()
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                         min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    _sync()
    dt = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    return _row("notebook-nf4-b1", 1, n, dt, how="nf4 (bnb, bf16 compute), model.generate, dynamic cache")


def bf16_configs(a: argparse.Namespace) -> list[dict]:
    """Every bf16 config on one loaded `Generator` (prodesc's generate path)."""
    from prodesc.config import GenerateConfig, resolve
    from prodesc.generate import Generator

    start = time.time()
    cfg = resolve(flags={"model.name": a.model_dir, "model.dtype": a.dtype})
    gen = Generator.from_model(a.model_dir, cfg=cfg)
    ids: dict[str, list[int]] = {}
    original = gen._record

    def record(title, new_ids, ms):  # keep the raw ids of the last call, per title
        ids[title] = list(new_ids)
        return original(title, new_ids, ms)

    gen._record = record
    titles = _titles(128)
    results, answers = [], {}
    for name in a.configs.split(","):
        batch = int(name.rsplit("-b", 1)[1])
        fast = name.startswith("prodesc")
        need = 150 if fast else 40  # a first compile of the decode step takes about a minute or two
        if time.time() - start + need > a.budget_s:
            print(f"[skip] {name}: budget", flush=True)
            continue
        if name.startswith("prodesc-peft") and not hasattr(gen.model, "peft_config"):
            gen.model = _with_unmerged_lora(gen.model)
        mode = ("force" if os.environ.get("BENCH_FAST") == "force" else "auto") if fast else "off"
        cfg = GenerateConfig(max_new_tokens=a.new_tokens, batch_size=batch, compile=mode)
        batch_titles = titles[:batch]
        compile_s = None
        if fast:  # first call compiles (and captures the CUDA graphs) for this batch shape
            t = time.perf_counter()
            gen.describe(batch_titles, gen=cfg)
            compile_s = time.perf_counter() - t
        _reset_peak()
        _sync()
        t = time.perf_counter()
        recs = gen.describe(batch_titles, gen=cfg)
        _sync()
        dt = time.perf_counter() - t
        answers[name] = [ids[x] for x in batch_titles]
        row = _row(name, batch, sum(r["n_tokens"] for r in recs), dt,
                   how="static cache + compiled decode" if fast else "dynamic cache, eager")
        row["dtype"] = a.dtype
        row["compile_s"] = round(compile_s - dt, 1) if compile_s else None
        print(f"[{name}] {json.dumps(row)}", flush=True)  # survives a kill of the process
        results.append(row)
    for fast_name in [n for n in answers if n.startswith("prodesc")]:
        plain_name = "plain-bf16-b" + fast_name.rsplit("-b", 1)[1]
        if plain_name in answers:
            row = next(r for r in results if r["name"] == fast_name)
            row["agreement"] = _agreement(gen, titles, answers[fast_name], answers[plain_name], plain_name)
    return results


def _agreement(gen, titles: list[str], fast: list[list[int]], plain: list[list[int]], vs: str) -> dict:
    """Token-exact answers, mean shared prefix, and the plain path's top-2 logit gap where the first few part."""
    import torch

    from prodesc import prompts

    prefixes, gaps = [], []
    for i, (f, p) in enumerate(zip(fast, plain, strict=True)):
        k = next((j for j, (x, y) in enumerate(zip(f, p, strict=False)) if x != y), min(len(f), len(p)))
        prefixes.append(k)
        if k < min(len(f), len(p)) and len(gaps) < 8:
            ids = prompts.prompt_ids(gen.tok, titles[i], gen.cfg.prompt) + p[:k]
            with torch.inference_mode():
                logits = gen.model(input_ids=torch.tensor([ids], device=gen.model.device)).logits[0, -1].float()
            top = logits.topk(2).values
            gaps.append(round((top[0] - top[1]).item(), 4))
    n = len(fast)
    return {"vs": vs, "exact": f"{sum(a == b for a, b in zip(fast, plain, strict=True))}/{n}",
            "mean_shared_prefix": round(sum(prefixes) / n, 1), "answer_len": len(plain[0]),
            "top2_logit_gap_at_first_difference": gaps}


def _with_unmerged_lora(model):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).eval()  # B = 0: same outputs as the base, the adapter's cost per token


def _titles(n: int) -> list[str]:
    """Product-like titles of 3 to 12 words (prompt lengths vary, as in a real file)."""
    import random

    rng = random.Random(0)
    words = ("red blue steel cotton wireless mini pro kids ballet tutu neon pink mug ceramic set pack of 2 large "
             "small leather case for phone charger usb cable book edition hardcover lamp led garden tool").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {i}" for i in range(n)]


def _row(name: str, batch: int, n: int, dt: float, how: str) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    return {"name": name, "batch": batch, "new_tokens": n, "seconds": round(dt, 3),
            "new_tokens_per_s": round(n / dt, 1), "how": how,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0,
            "card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__}


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Training-example encoding, examples per second: today's datasets path against the per-example loop it replaced.

    python bench/encode_examples.py --data DATA                       # SmolLM2's tokenizer, k=0 and k=2
    python bench/encode_examples.py --data DATA --tokenizer DIR --k 0 --workers 1,2

DATA is a prepared data dir (`prodesc data synth --n 40000` + `prodesc data prepare` gives ~20k train records; with
k > 0 it needs `prodesc data index DATA` first). The neighbours are searched once, untimed, and given to both paths.
"loop": `prompts.fit_example` per record then `Dataset.from_list`, what `prodesc train` did before (the chat template
rendered twice per example, the tokenizer called one text at a time). "map": `encoding.build` (prompts.Layout +
`datasets.map(batched=True, num_proc)`), cold into a fresh DATA/encoded/ entry (key hashing and the store included),
then read back from it ("cached"). The train split and train.max_eval_samples val examples are encoded; examples/s
counts both. Results: bench/results/encode_examples.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMOLLM2 = Path.home() / ".cache" / "prodesc" / "smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="Prepared data dir (indexed for --k > 0).")
    ap.add_argument("--tokenizer", default=str(SMOLLM2), help="Tokenizer dir.")
    ap.add_argument("--k", default="0,2", help="Comma list of retrieval.k values.")
    ap.add_argument("--workers", default="0", help="Comma list of train.encode_workers (0: the default).")
    ap.add_argument("--max-length", type=int, default=1024, help="train.max_length.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encode_examples.json")
    args = ap.parse_args()

    from datasets import Dataset

    from prodesc import config, prompts
    from prodesc.models import fix_pad, load_tokenizer
    from prodesc.train import encoding, examples
    from prodesc.train.recipe import _read_split

    tok = load_tokenizer(args.tokenizer)
    fix_pad(tok)
    rows = {s: _read_split(args.data, s) for s in ("train", "val")}
    results = []
    for k in map(int, args.k.split(",")):
        sets = [f"retrieval.k={k}", f"train.max_length={args.max_length}", "retrieval.chars=300"]
        cfg = config.resolve(sets=sets)
        _, near = examples.neighbours(cfg, args.data, rows)
        n_val = cfg.train.max_eval_samples or len(rows["val"])
        n = len(rows["train"]) + min(n_val, len(rows["val"]))

        t0 = time.perf_counter()
        for split, limit in (("train", None), ("val", n_val)):
            exs = [
                prompts.fit_example(tok, r["title"], r["content"], cfg.prompt, cfg.train.max_length, nb,
                                    cfg.retrieval.chars)[0]
                for r, nb in zip(rows[split][:limit], near[split][:limit], strict=True)
            ]  # fmt: skip
            Dataset.from_list([ex for ex in exs if ex is not None])
        loop_s = time.perf_counter() - t0
        for w in map(int, args.workers.split(",")):
            run_cfg = config.resolve(sets=sets + ([f"train.encode_workers={w}"] if w else []))
            shutil.rmtree(args.data / encoding.ENCODED_DIR, ignore_errors=True)
            t0 = time.perf_counter()
            encoding.build(tok, run_cfg, rows, near, args.data)
            map_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            encoding.build(tok, run_cfg, rows, lambda: sys.exit("cache missed"), args.data)
            cached_s = time.perf_counter() - t0
            row = {
                "k": k, "examples": n, "workers": encoding.workers(run_cfg, len(rows["train"])),
                "loop_s": round(loop_s, 2), "map_s": round(map_s, 2), "cached_s": round(cached_s, 2),
                "loop_per_s": round(n / loop_s), "map_per_s": round(n / map_s), "speedup": round(loop_s / map_s, 1),
            }  # fmt: skip
            print(json.dumps(row))
            results.append(row)
    shutil.rmtree(args.data / encoding.ENCODED_DIR, ignore_errors=True)
    out = {"tokenizer": args.tokenizer, "data": str(args.data), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "max_length": args.max_length, "runs": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

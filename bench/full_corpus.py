"""The whole catalog end to end on the device: prepare -> index -> encode (cold, cached) -> training steps of the
7B-shaped model -> generate 10,000 titles, each stage timed with its peak host RSS and GPU memory, and one epoch
projected on 1 and 8 GPUs.

Device calls (nvidia-h200; once on the dev box: `bash bench/prepare_wheels.sh`, which writes .whl/ with the
fp16 MiniLM copy in .whl/minilm and sentence-transformers + faiss in .whl/index). Every call begins with S, then
installs what it carries into /tmp/site. The work dir /tmp/fullcorpus and /tmp/site survive between calls only while
the machine stays warm, so make the four calls back to back (on a cold machine start again at call 1):

  S = set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
      PYTHONPATH=/tmp/site:$PWD/src; PIP="python3 -m pip install -q --no-index --no-deps --no-compile --upgrade
      --target /tmp/site"
  call 1, carry [".whl/data"] (pyarrow, isal, xxhash, pydantic: 56 MiB), expect ~2 min:
    S; $PIP .whl/data/*.whl; python3 bench/full_corpus.py --stages prepare --out $OUT/full_corpus.json
  call 2, carry [".whl/minilm", ".whl/index"] (45 MiB + the two wheels), expect ~4 min:
    S; $PIP .whl/index/*.whl; python3 bench/full_corpus.py --stages index --embedder $PWD/.whl/minilm --out ...
  call 3, carry [".whl/common", ".whl/main", ".whl/mistral-tok"] (26 MiB), expect ~2 min:
    S; $PIP .whl/common/*.whl .whl/main/*.whl; python3 bench/full_corpus.py --stages encode,encode_cached --out ...
  call 4, the same carry, expect ~7 min:
    S; $PIP .whl/common/*.whl .whl/main/*.whl
    python3 bench/full_corpus.py --stages train_steps,generate --out $OUT/full_corpus.json
Each call merges its stages into /tmp/fullcorpus/result.json and writes all of it to --out: the last call's file
is bench/results/full_corpus-YYYYMMDD.json. CPU dry run on the dev box (tiny random model, ~2 min on 2 cores):
    python bench/full_corpus.py --tiny --lines 6000 --work /tmp/fc --steps 3 --titles 200 \
        --tokenizer ../shared/tokenizers/mistral-7b-instruct-v0.3-tokenizer --out /tmp/fc/out.json

Stages (each in a process of its own, so its peak RSS is its own: the largest of it and its children):
- prepare: `prodesc data prepare` of the synthetic corpus (`prodesc data synth --n LINES --seed 0 --malformed 100`,
  made once, untimed).
- index: `prodesc data index` (MiniLM on the GPU in batches of 256, vectors stored fp16), then the faiss index of
  the train split built once (HNSW beyond catalog.EXACT_MAX items), as training with neighbours builds it.
- encode / encode_cached: `encoding.build` with the mistral-7b-lora preset and the Mistral v0.3 tokenizer (k=0), cold
  (DATA/encoded/ removed first), then read back from the cache.
- make_model (run before train_steps, once per work dir): the random-init 7B-shaped model saved to disk, in a
  process of its own, so that train_steps' peak RSS is training's alone. Its peak is recorded but is the bench's
  doing (a random 7B passes its 14.5 GB through host memory), not a prodesc stage's: no target applies.
- train_steps: `prodesc train` (recipe.train) with the preset on that model for --steps steps over the full
  encoded split (TRL's labels map and packing included); tokens/s from the run's manifest.
- generate: the first --titles test titles through `prodesc generate --run RUN --input FILE --out FILE` (stream.py).
  The random-init model never emits EOS, so every answer runs to --max-new-tokens (32: 10,000 x 32 tokens fit a call).
Projected epoch: tokens of the encoded train split / measured tokens/s; 8 GPUs: data parallel at
SCALING_8 x 8 times one GPU (LoRA gradients are ~30 MB a step, the all-reduce hides behind the backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

LF_AMAZON_LINES = 2_248_619
STAGES = ("prepare", "index", "encode", "encode_cached", "train_steps", "generate")
HELPERS = ("make_model",)  # bench-only steps, each in its own process before the stage that needs it
PRESET = ROOT / "configs" / "mistral-7b-lora.yaml"
SCALING_8 = 0.9  # assumed DDP efficiency on 8 GPUs of one host (not measured here)
TARGETS = {"encode": 180.0, "encode_cached": 10.0, "index": 300.0, "peak_rss_gib": 16.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="Comma list, run in this order.")
    ap.add_argument("--lines", type=int, default=LF_AMAZON_LINES, help="Synthetic corpus size (lines).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fullcorpus"), help="Work dir (kept between calls).")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/full_corpus-DATE).")
    ap.add_argument("--embedder", default="embedded:all-minilm-l6-v2", help="retrieval.embedder (a dir on device).")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl" / "mistral-tok"), help="Mistral v0.3 tokenizer dir.")
    ap.add_argument("--steps", type=int, default=20, help="Training steps.")
    ap.add_argument("--titles", type=int, default=10_000, help="Titles generated.")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate.max_new_tokens.")
    ap.add_argument("--batch", type=int, default=128, help="generate.batch_size (the preset's 16 would take ~4 min).")
    ap.add_argument("--tiny", action="store_true", help="Tiny random model on the CPU (dry run).")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one stage in this process
    a = ap.parse_args()
    if a.child:
        threading.Thread(target=_sample_rss, daemon=True).start()
        print("RESULT " + json.dumps(STAGE_FUNCS[a.child](a)), flush=True)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    path = a.work / "result.json"
    result = json.loads(path.read_text()) if path.exists() else {"lines": a.lines, "stages": {}}
    for stage in a.stages.split(","):
        if stage not in STAGES:
            sys.exit(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
        if stage == "train_steps":
            result["stages"]["make_model"] = _run_child("make_model", sys.argv[1:])
        result["stages"][stage] = _run_child(stage, sys.argv[1:])
        _finish(result, a)
        path.write_text(json.dumps(result, indent=2) + "\n")
    out = a.out or ROOT / "bench" / "results" / f"full_corpus-{date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _run_child(stage: str, argv: list[str]) -> dict:
    """One stage in a fresh process: wall time, and its result line."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", stage], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    sys.stdout.write(proc.stdout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"stage {stage} failed (exit {proc.returncode})")
    return {"wall_s": round(wall, 1), **json.loads(line[7:])}


def _finish(result: dict, a: argparse.Namespace) -> None:
    """Top-level fields from the stages so far, and the targets' verdicts."""
    s = result["stages"]
    for stage in s.values():
        if "train_records" in stage:
            result["train_records"] = stage["train_records"]
        if "card" in stage:
            result["card"] = stage["card"]
    tokens, tps = s.get("encode", {}).get("train_tokens"), s.get("train_steps", {}).get("tokens_per_s")
    if tokens and tps:
        one = tokens / tps / 3600
        result["projected_epoch_h"] = {"1": round(one, 2), "8": round(one / (8 * SCALING_8), 2)}
        result["scaling_assumption"] = f"8 GPUs: data parallel, {SCALING_8:.0%} of 8x one GPU's tokens/s"
    result.setdefault("card", "cpu (dry run)" if a.tiny else None)
    checks = {k: s[k].get("s", s[k]["wall_s"]) <= v for k, v in TARGETS.items() if k in s}  # work, not imports
    checks["peak_rss_gib"] = all(x.get("peak_rss_gib", 0) <= TARGETS["peak_rss_gib"]
                                 for k, x in s.items() if k not in HELPERS)  # every prodesc stage, measured apart
    result["targets_met"] = checks


# ------------------------------------------------------------------------------------------------- the stages


def stage_prepare(a: argparse.Namespace) -> dict:
    from prodesc.config import DataConfig
    from prodesc.data.prepare import prepare

    corpus = a.work / f"synth_{a.lines}.json.gz"
    if not corpus.exists():
        cmd = [sys.executable, "-m", "prodesc.cli", "data", "synth", "--n", str(a.lines), "--out", str(corpus)]
        subprocess.run([*cmd, "--seed", "0", "--malformed", "100"], check=True, stdout=sys.stderr)
    t = time.perf_counter()
    prepare([corpus], a.work / "data", DataConfig(), overwrite=True)
    shutil.rmtree(a.work / "data" / "encoded", ignore_errors=True)
    splits = {s: _records(a, s) for s in ("train", "val", "test")}
    return {"s": round(time.perf_counter() - t, 1), "splits": splits, "train_records": splits["train"],
            **_peaks()}  # fmt: skip


def stage_index(a: argparse.Namespace) -> dict:
    from prodesc.catalog import Catalog, TitleVectors, index_data
    from prodesc.config import RetrievalConfig
    from prodesc.train.recipe import _read_split

    data = a.work / "data"
    t = time.perf_counter()
    index_data(data, a.embedder, overwrite=True)
    embed_s = time.perf_counter() - t
    out = {"embed_s": round(embed_s, 1), "titles": json.loads((data / "index" / "meta.json").read_text())["count"]}
    try:
        import faiss  # noqa: F401
    except ImportError:
        note = "faiss not installed: no search index built"
        return {**out, "s": out["embed_s"], "faiss_s": None, "note": note, **_peaks()}
    cfg = RetrievalConfig(embedder=a.embedder, k=2)
    t = time.perf_counter()
    catalog = Catalog.build(_read_split(data, "train"), TitleVectors.for_data(data, cfg), cfg)
    lookup_s = time.perf_counter() - t
    t = time.perf_counter()
    catalog.ready()
    faiss_s = time.perf_counter() - t
    return {**out, "s": round(embed_s + lookup_s + faiss_s, 1), "catalog_lookup_s": round(lookup_s, 1),
            "faiss_s": round(faiss_s, 1),
            "faiss_index": type(catalog._index).__name__, **_peaks()}  # fmt: skip


def stage_encode(a: argparse.Namespace, cached: bool = False) -> dict:
    from prodesc.models import fix_pad, load_tokenizer
    from prodesc.train import encoding
    from prodesc.train.recipe import _read_split

    data = a.work / "data"
    cfg = _config(a, [])
    tok = load_tokenizer(a.tokenizer)
    fix_pad(tok)
    t = time.perf_counter()
    rows = {s: _read_split(data, s) for s in ("train", "val")}
    read_s = time.perf_counter() - t
    if not cached:
        shutil.rmtree(data / encoding.ENCODED_DIR, ignore_errors=True)
    t = time.perf_counter()
    train_ds, _, lengths = encoding.build(tok, cfg, rows, (lambda: sys.exit("cache missed")) if cached else None, data)
    s = time.perf_counter() - t
    return {"s": round(s, 1), "read_rows_s": round(read_s, 1), "examples": lengths["examples"],
            "train_tokens": lengths["tokens"], "examples_per_s": round(len(train_ds) / s),
            "workers": encoding.workers(cfg, len(rows["train"])), "cpus": os.cpu_count(), **_peaks()}  # fmt: skip


def stage_make_model(a: argparse.Namespace) -> dict:
    """The random-init model train_steps trains, saved once per work dir. A stage process of its own (not a child
    of train_steps): saving the random 7B passes its 14.5 GB through host memory, the bench's doing, not
    training's (the 2026-12-01 run measured both in one process: 16.5 GiB)."""
    import train_throughput

    model = _model_dir(a)
    if (model / "config.json").exists():
        return {"s": 0.0, "made": False, **_peaks()}
    t = time.perf_counter()
    train_throughput.make_model(str(model), a.tokenizer, tiny=a.tiny)
    return {"s": round(time.perf_counter() - t, 1), "made": True, **_peaks()}


def stage_train_steps(a: argparse.Namespace) -> dict:
    from prodesc.train import recipe

    model = _model_dir(a)
    if not (model / "config.json").exists():
        sys.exit(f"no model in {model}: the make_model stage runs before train_steps")
    sets = [f"train.max_steps={a.steps}", "train.eval_steps=100000", "train.save_steps=100000",
            "train.logging_steps=1", "train.warmup_ratio=0.0"]  # fmt: skip
    run, cache = a.work / "run", a.work / "data" / "encoded"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    t = time.perf_counter()
    recipe.train(_config(a, sets, str(model)), a.work / "data", run, overwrite=True)
    manifest = json.loads((run / "manifest.json").read_text())["training"]
    hit = bool(before) and set(cache.iterdir()) == before  # the encode stage's examples were reused
    return {"s": round(time.perf_counter() - t, 1), "steps": a.steps, "encode_cache_hit": hit,
            "tokens_per_s": manifest.get("tokens_per_s"), "train_wall_s": manifest.get("wall_time_s"),
            "card": _card(), **_peaks()}  # fmt: skip


def stage_generate(a: argparse.Namespace) -> dict:
    from prodesc.generate.generator import generate_cli
    from prodesc.records import read_split

    titles = [r["title"] for r in read_split(a.work / "data", "test", a.titles)]
    titles = (titles * (a.titles // max(len(titles), 1) + 1))[: a.titles]
    src, out = a.work / "titles.txt", a.work / "generated.jsonl"
    src.write_text("\n".join(titles) + "\n")
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    generate_cli([], a.work / "run", None, None, src, None, "test", None, out,
                 sets=[f"generate.max_new_tokens={a.max_new_tokens}", f"generate.batch_size={a.batch}"])  # fmt: skip
    s = time.perf_counter() - t
    lines = sum(1 for _ in out.open())
    return {"s": round(s, 1), "titles": lines, "max_new_tokens": a.max_new_tokens,
            "titles_per_s": round(lines / s, 1), **_peaks()}  # fmt: skip


STAGE_FUNCS = {
    "prepare": stage_prepare, "index": stage_index, "encode": stage_encode,
    "encode_cached": lambda a: stage_encode(a, cached=True), "make_model": stage_make_model,
    "train_steps": stage_train_steps, "generate": stage_generate,
}  # fmt: skip


def _model_dir(a: argparse.Namespace) -> Path:
    return a.work / ("model-tiny" if a.tiny else "model")


def _config(a: argparse.Namespace, sets: list[str], model: str | None = None):
    from prodesc import config

    # k=0 as the stages above say: the preset's neighbours (retrieval.k: 2) would need the index stage's vectors
    sets = [f"model.name={model or a.tokenizer}", f"retrieval.embedder={a.embedder}", "retrieval.k=0", *sets]
    if a.tiny:  # CPU: no Triton kernels, no fused optimizer, no bf16, no flash varlen kernel
        sets += ["model.dtype=float32", "train.liger=false", "train.optim=adamw_torch",
                 "model.attn_implementation=sdpa", "train.max_length=512", "train.batch_size=2"]  # fmt: skip
    return config.load(PRESET, sets)


def _records(a: argparse.Namespace, split: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(a.work / "data" / f"{split}.parquet").metadata.num_rows


_RSS_PEAK = {"RssAnon": 0, "RssFile": 0}  # kB, this process, sampled every 0.1 s (_sample_rss)


def _sample_rss() -> None:
    """Peaks of the two parts of this process's RSS: anonymous memory (what it allocated: heap, tensors, Arrow
    buffers) and file-backed pages (memory-mapped files: a checkpoint being loaded, datasets' Arrow files). The
    kernel drops clean file-backed pages under memory pressure and reads them again when touched; ru_maxrss counts
    both (the 12-06 device run: train_steps 16.26 GiB = ~13.7 GiB of the 7B checkpoint's mapped pages while it
    loaded + anonymous memory)."""
    while True:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in _RSS_PEAK:
                        _RSS_PEAK[key] = max(_RSS_PEAK[key], int(line.split()[1]))
        except OSError:  # no /proc (not Linux): ru_maxrss alone
            return
        time.sleep(0.1)


def _peaks() -> dict:
    """Peak RSS of this stage's process and of its largest child (GiB: a stage process runs nothing else), the
    sampled peaks of this process's anonymous and file-backed RSS (_sample_rss), and peak GPU memory
    allocated/reserved."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"peak_rss_gib": round(max(own, kids) / 2**20, 2), "peak_rss_self_gib": round(own / 2**20, 2),
           "peak_rss_children_gib": round(kids / 2**20, 2),
           "peak_anon_gib": round(_RSS_PEAK["RssAnon"] / 2**20, 2),
           "peak_file_backed_gib": round(_RSS_PEAK["RssFile"] / 2**20, 2)}  # fmt: skip
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()

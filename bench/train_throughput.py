"""Training throughput on one GPU: the notebook's QLoRA recipe, Unsloth, and prodesc's presets, same model, same data.

    # on the device machine (docs/PERFORMANCE.md has the exact commands, wheels from bench/prepare_wheels.sh):
    python bench/train_throughput.py all --configs notebook,unsloth-packed,lora,qlora --out $OUT/train.json
    python bench/train_throughput.py all --tiny --configs notebook,lora,qlora --out /tmp/t.json   # CPU dry run
    # every model preset (configs/qwen3-*, llama-3.*, gemma-3-*): random-init weights of its real shape, its family's
    # tokenizer (tests/assets/tokenizers), the preset as committed; writes bench/results/train_throughput-presets-DATE
    python bench/train_throughput.py presets
    python bench/train_throughput.py presets --smoke --presets qwen3-0.6b,gemma-3-1b   # CPU: the plumbing only

Model: a random-init Mistral-7B-v0.3-shaped model (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 32768),
built once on the GPU in bf16 and saved to --model-dir with the real Mistral tokenizer (training cost does not
depend on weight values; no hub is reachable). Data: 4000 sequences whose lengths are drawn from
bench/lengths_mistral.txt (the real LF-Amazon sample in Mistral tokens, see bench/lengths.py). The recipes get
random token ids of those lengths; prodesc's presets go through `prodesc.train.recipe.train` on a prepared data dir of
titles and contents made of single-token words, sized so that `prompts.encode_example` yields the same lengths.

Each config runs in its own process (clean GPU memory). Reported: non-pad tokens/s over the optimizer steps after
--warmup (cuda-synchronized at each step end), seconds per step, peak allocated/reserved GiB, MFU = 4 N tokens/s
over 989 TFLOP/s (H100 bf16 dense datasheet) and over 790 TFLOP/s (a measured bf16 matmul on these machines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "bench" / "lengths_mistral.txt"
PEAK_DATASHEET, PEAK_MEASURED = 989e12, 790e12
UNSLOTH_ANCHOR = 6801  # /work/shared/README.md: Unsloth packed 8x2048 on an H100, an earlier session's number

MISTRAL = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
               sliding_window=None, tie_word_embeddings=False)
TINY = dict(MISTRAL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

LORA, QLORA = "configs/mistral-7b-lora.yaml", "configs/mistral-7b-qlora.yaml"
# name -> how to run it. "prodesc" configs are a preset plus --set overrides: one lever changed per variant.
CONFIGS: dict[str, dict] = {
    "notebook": {"kind": "recipe"},
    "unsloth-packed": {"kind": "unsloth"},
    "lora": {"kind": "prodesc", "preset": LORA, "set": []},
    "qlora": {"kind": "prodesc", "preset": QLORA, "set": []},
    "lora-sdpa-blockmask": {"kind": "prodesc", "preset": LORA, "set": ["model.attn_implementation=sdpa"]},
    "lora-all-linear": {"kind": "prodesc", "preset": LORA, "set": ["lora.target_modules=all-linear"]},
    "lora-no-liger": {"kind": "prodesc", "preset": LORA, "set": ["train.liger=false"]},
    "lora-b2": {"kind": "prodesc", "preset": LORA, "set": ["train.batch_size=2"]},
    "lora-b6": {"kind": "prodesc", "preset": LORA, "set": ["train.batch_size=6"]},
    "lora-gc": {"kind": "prodesc", "preset": LORA, "set": ["train.gradient_checkpointing=true"]},
    "lora-compile": {"kind": "prodesc", "preset": LORA, "set": ["train.torch_compile=true"]},
    "lora-dropout": {"kind": "prodesc", "preset": LORA, "set": ["lora.dropout=0.1"]},
    "lora-adamw": {"kind": "prodesc", "preset": LORA, "set": ["train.optim=adamw_torch"]},
    "lora-nf4": {"kind": "prodesc", "preset": LORA, "set": ["model.quantization=nf4"]},
    "qlora-all-linear": {"kind": "prodesc", "preset": QLORA, "set": ["lora.target_modules=all-linear"]},
    "qlora-b2": {"kind": "prodesc", "preset": QLORA, "set": ["train.batch_size=2"]},
    "qlora-b6": {"kind": "prodesc", "preset": QLORA, "set": ["train.batch_size=6"]},
    "qlora-b8": {"kind": "prodesc", "preset": QLORA, "set": ["train.batch_size=8"]},
    "qlora-no-gc": {"kind": "prodesc", "preset": QLORA, "set": ["train.gradient_checkpointing=false"]},
    "qlora-sdpa-blockmask": {"kind": "prodesc", "preset": QLORA, "set": ["model.attn_implementation=sdpa"]},
}


# preset -> (its family's tokenizer in tests/assets/tokenizers, model_type, the shape of the model's config.json).
# Gemma 3 4B is multimodal; its text tower is what trains on text, so that is what is built here.
PRESETS: dict[str, tuple[str, str, dict]] = {
    "qwen3-0.6b": ("qwen3", "qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                          num_attention_heads=16, num_key_value_heads=8, head_dim=128)),
    "qwen3-1.7b": ("qwen3", "qwen3", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                          num_attention_heads=16, num_key_value_heads=8, head_dim=128)),
    "qwen3-4b": ("qwen3", "qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128)),
    "qwen3-8b": ("qwen3", "qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                        tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama-3.2", "llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                                num_attention_heads=32, num_key_value_heads=8, head_dim=64)),
    "llama-3.2-3b": ("llama-3.2", "llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                                num_attention_heads=24, num_key_value_heads=8, head_dim=128)),
    "llama-3.1-8b": ("llama-3.1", "llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                tie_word_embeddings=False)),
    "gemma-3-1b": ("gemma-3", "gemma3_text", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                                  sliding_window=512)),
    "gemma-3-4b": ("gemma-3", "gemma3_text", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                                  sliding_window=1024, vocab_size=262208)),
}
ASSETS = ROOT / "tests" / "assets" / "tokenizers"
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
SMOKE_SETS = ["train.batch_size=1", "train.max_length=1024"]  # CPU: a 262k-vocab logit row per token adds up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["all", "one", "make", "data", "check", "presets", "one-preset"])
    ap.add_argument("name", nargs="?", help="one: the config name (see CONFIGS), or NAME=PRESET:k=v;k=v")
    ap.add_argument("--configs", default="notebook,unsloth-packed,lora,qlora")
    ap.add_argument("--model-dir", default="/tmp/m7b")
    ap.add_argument("--data-dir", default="/tmp/bench-data")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl" / "mistral-tok"))
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps per config")
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    ap.add_argument("--budget-s", type=float, default=540, help="all: skip configs that would start after this")
    ap.add_argument("--timeout-s", type=float, default=240, help="all: kill one config after this")
    ap.add_argument("--unsloth-site", default="/tmp/site_u", help="PYTHONPATH of the unsloth subprocess")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: checks the plumbing, not speed")
    ap.add_argument("--presets", default=",".join(PRESETS), help="presets: which model presets")
    ap.add_argument("--smoke", action="store_true", help="presets: 2-layer models of each vocabulary, on CPU")
    a = ap.parse_args()
    if a.cmd == "make":
        make_model(a.model_dir, a.tokenizer, a.tiny)
    elif a.cmd == "data":
        make_data(a.data_dir, a.tokenizer)
    elif a.cmd == "one":
        print("RESULT " + json.dumps(run_one(a.name, a)), flush=True)
    elif a.cmd == "one-preset":
        print("RESULT " + json.dumps(run_preset(a.name, a)), flush=True)
    elif a.cmd == "presets":
        run_presets(a)
    elif a.cmd == "check":
        res = check_packing(a.model_dir, a.tiny)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
    else:
        run_all(a)


# ---------------------------------------------------------------------------------------------- orchestration
def run_all(a: argparse.Namespace) -> list[dict]:
    start = time.time()
    if not Path(a.model_dir, "config.json").exists():
        _child([sys.executable, __file__, "make", "--model-dir", a.model_dir, "--tokenizer", a.tokenizer]
               + (["--tiny"] if a.tiny else []), env=None, timeout=600)
    results: list[dict] = []
    for name in a.configs.split(","):
        left = a.budget_s - (time.time() - start)
        if left < 45:
            results.append({"name": name, "skipped": f"time budget ({a.budget_s:.0f} s) spent"})
            print(f"SKIP {name}: budget", flush=True)
            continue
        cmd = [sys.executable, __file__, "one", name, "--model-dir", a.model_dir, "--data-dir", a.data_dir,
               "--tokenizer", a.tokenizer, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += ["--tiny"] if a.tiny else []
        env = None
        if _spec(name)["kind"] == "unsloth":
            env = dict(os.environ, PYTHONPATH=a.unsloth_site)
        t = time.time()
        res = _child(cmd, env, timeout=min(a.timeout_s, left), log=a.out.with_suffix(".log") if a.out else None)
        res.setdefault("name", name)
        res["wall_s"] = round(time.time() - t, 1)
        results.append(res)
        _finish(results, a.out)
    _print_table(results)
    return results


def _child(cmd: list[str], env: dict | None, timeout: float, log: Path | None = None) -> dict:
    print("+ " + " ".join(cmd[1:]), flush=True)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        _log(log, cmd, out, err)
        print(out[-1500:] + err[-1500:], flush=True)
        return {"error": f"timed out after {timeout:.0f} s"}
    _log(log, cmd, p.stdout, p.stderr)
    lines = p.stdout.splitlines()
    for line in lines + [x for x in p.stderr.splitlines() if x.startswith("sdpa_varlen:")]:
        if line.startswith(("RESULT ", "[", "made ", "data ", "sdpa_varlen:")):
            print(line, flush=True)
    res = next((json.loads(x[7:]) for x in reversed(lines) if x.startswith("RESULT ")), None)
    if res is None:
        err = (p.stderr or p.stdout)[-2500:]
        print(err, flush=True)
        return {"error": f"exit {p.returncode}: " + err[-600:]}
    return res


def _log(log: Path | None, cmd: list[str], out: str, err: str) -> None:
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"\n===== {' '.join(cmd[1:])}\n--- stdout\n{out[-20000:]}\n--- stderr\n{err[-20000:]}\n")


def _finish(results: list[dict], out: Path | None) -> None:
    """Ratios against the notebook and Unsloth rows of this run; writes the JSON after every config."""
    by = {r["name"]: r for r in results if r.get("tokens_per_s")}
    nb = by.get("notebook", {}).get("tokens_per_s")
    un = by.get("unsloth-packed", {}).get("tokens_per_s")
    for r in results:
        tps = r.get("tokens_per_s")
        if not tps:
            continue
        r["ratio_vs_notebook"] = round(tps / nb, 2) if nb else None
        r["ratio_vs_unsloth"] = round(tps / (un or UNSLOTH_ANCHOR), 2)
        r["unsloth_reference"] = "measured in this run" if un else f"{UNSLOTH_ANCHOR} tok/s, NOT re-measured"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def _print_table(results: list[dict]) -> None:
    print(f"\n{'config':24} {'tok/s':>8} {'s/step':>7} {'tok/step':>8} {'alloc':>6} {'resv':>6} {'MFU989':>7} "
          f"{'xNB':>6} {'xUns':>6}  loss first->last")
    for r in results:
        if not r.get("tokens_per_s"):
            print(f"{r['name']:24} {r.get('error') or r.get('skipped')}")
            continue
        print(f"{r['name']:24} {r['tokens_per_s']:8.0f} {r['s_per_step']:7.3f} {r['tokens_per_step']:8.0f} "
              f"{r['peak_gib']:6.1f} {r['peak_reserved_gib']:6.1f} {r['mfu_989']:7.1%} "
              f"{r.get('ratio_vs_notebook') or 0:6.2f} {r.get('ratio_vs_unsloth') or 0:6.2f}  "
              f"{r['first_loss']} -> {r['last_loss']}")


def _spec(name: str) -> dict:
    """A CONFIGS entry, or an ad-hoc prodesc variant written NAME=PRESET:k=v;k=v."""
    if name in CONFIGS:
        return CONFIGS[name]
    if "=" in name and ":" in name:
        preset, _, sets = name.split("=", 1)[1].partition(":")
        return {"kind": "prodesc", "preset": preset, "set": [s for s in sets.split(";") if s]}
    raise SystemExit(f"unknown config {name!r}: one of {', '.join(CONFIGS)} or NAME=PRESET:k=v;k=v")


# ---------------------------------------------------------------------------------------------- model presets
def run_presets(a: argparse.Namespace) -> list[dict]:
    """Each preset in its own process: random-init model of its shape, its family's data, the preset's settings."""
    start = time.time()
    out = a.out or ROOT / "bench" / "results" / f"train_throughput-presets-{time.strftime('%Y%m%d')}.json"
    if a.smoke:
        out = a.out or Path("/tmp/train_throughput-presets-smoke.json")
    results: list[dict] = []
    for name in a.presets.split(","):
        left = a.budget_s - (time.time() - start)
        if left < 45:
            results.append({"name": name, "skipped": f"time budget ({a.budget_s:.0f} s) spent"})
            continue
        cmd = [sys.executable, __file__, "one-preset", name, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        t = time.time()
        res = _child(cmd + (["--smoke"] if a.smoke else []), None, timeout=min(a.timeout_s, left),
                     log=out.with_suffix(".log"))
        res.update(name=name, wall_s=round(time.time() - t, 1))
        results.append(res)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    _print_table(results)
    print(f"wrote {out}")
    return results


def run_preset(name: str, a: argparse.Namespace) -> dict:
    family, _, _ = PRESETS[name]
    tag = "-smoke" if a.smoke else ""
    a.model_dir, a.data_dir = f"/tmp/bench-preset-{name}{tag}", f"/tmp/bench-data-{family}{tag}"
    a.tokenizer, a.tiny = str(ASSETS / family), a.smoke
    if not Path(a.model_dir, "config.json").exists():
        make_preset_model(name, a.model_dir, a.smoke)
    if not Path(a.data_dir, "train.parquet").exists():
        make_data(a.data_dir, a.tokenizer, n=200 if a.smoke else 4000)
    spec = {"kind": "prodesc", "preset": f"configs/{name}.yaml", "set": SMOKE_SETS if a.smoke else []}
    try:
        res = _summarise(_run_prodesc(name, spec, a), a)
    finally:  # up to 16 GB each: nine presets' models overfilled the device's 64 GB disk (2026-12-06)
        if not a.smoke:
            shutil.rmtree(a.model_dir, ignore_errors=True)
    return dict(res, shape=PRESETS[name][2], smoke=a.smoke)


def make_preset_model(name: str, model_dir: str, smoke: bool) -> None:
    """Random-init model of the preset's shape in bf16 (built on the GPU when there is one), saved with the family's
    tokenizer and generation config (real special ids; a vocabulary cut to the test texts, tokens beyond it unused)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    family, model_type, shape = PRESETS[name]
    real = json.loads((ASSETS / family / "config.json").read_text())
    keep = ("vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta",
            "rope_scaling", "rms_norm_eps", "max_position_embeddings")
    cfg = AutoConfig.for_model(model_type, **{**{k: real[k] for k in keep if k in real}, **shape,
                                              **(SMOKE_SHAPE if smoke else {})})  # the shape wins over the file
    t = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    tmp = Path(f"{model_dir}.tmp")  # renamed when whole: a save cut short (a full disk) leaves no half model behind
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(ASSETS / family / f, tmp / f)
    n = sum(p.numel() for p in model.parameters())
    (tmp / "n_params.json").write_text(json.dumps({"n_params": n}))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    print(f"made {name} {n / 1e9:.3f}B params in {time.time() - t:.0f}s on {device}", flush=True)


# ---------------------------------------------------------------------------------------------- model and data
def make_model(model_dir: str, tokenizer: str, tiny: bool = False) -> None:
    """Random-init Mistral-7B-v0.3 shape in bf16, built on the GPU (seconds) and saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    t = time.time()
    cfg = MistralConfig(**(TINY if tiny else MISTRAL))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = MistralForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    Path(model_dir, "n_params.json").write_text(json.dumps({"n_params": n}))
    print(f"made model {n / 1e9:.3f}B params in {time.time() - t:.0f}s on {device}", flush=True)


def sample_lengths(n: int = 4000) -> list[int]:
    """The anchor's draw: lengths of the real sample, with replacement, seed 0, clipped to [8, 1024]."""
    import numpy as np

    lengths = np.loadtxt(LENGTHS, dtype=int)
    return np.random.default_rng(0).choice(lengths, n).clip(8, 1024).tolist()


def make_data(data_dir: str, tokenizer: str, n: int = 4000) -> None:
    """train/val parquet of titles + contents whose encoded lengths (prompts.encode_example) equal sample_lengths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prodesc import models, prompts
    from prodesc.config import PromptConfig

    t = time.time()
    tok = models.load_tokenizer(tokenizer)
    words = _single_token_words(tok)
    rng = np.random.default_rng(1)
    cfg = PromptConfig()
    rows, got = [], []
    for i, target in enumerate(sample_lengths(n) + sample_lengths(16)[:16]):
        title = " ".join(rng.choice(words, int(rng.integers(4, 9))))
        k = max(1, target - 30)
        for _ in range(4):  # the template's overhead is learnt on the first pass; lengths converge in 1-2 more
            content = " ".join(rng.choice(words, k))
            length = len(prompts.encode_example(tok, title, content, cfg)["input_ids"])
            if length == target or (length > target and k == 1):
                break
            k = max(1, k + target - length)
        rows.append({"uid": f"{i:010d}", "title": title, "content": content, "family": f"f{i}"})
        got.append(length)
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[:n]), out / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[n:]), out / "val.parquet")
    target = sample_lengths(n)
    exact = sum(a == b for a, b in zip(got[:n], target, strict=True))
    print(f"data {n} rows in {time.time() - t:.0f}s: mean length {np.mean(got[:n]):.1f} (target "
          f"{np.mean(target):.1f}), exact {exact}/{n}", flush=True)


def _single_token_words(tok) -> list[str]:
    """Lowercase words that the tokenizer keeps as one token each, also when joined by spaces."""
    cands = sorted(w[1:] for w in tok.get_vocab() if w[:1] in ("▁", "Ġ") and w[1:].isascii() and w[1:].isalpha()
                   and w[1:].islower() and 3 <= len(w) <= 9)  # sentencepiece's and byte-level BPE's word starts
    ok = [w for w in cands if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    probe = " " + " ".join(ok[:500])  # each word after a space, as in the texts made from them
    assert len(tok(probe, add_special_tokens=False)["input_ids"]) == len(ok[:500]), "words merge across spaces"
    return ok


# ---------------------------------------------------------------------------------------------- correctness
def check_packing(model_dir: str, tiny: bool = False) -> dict:
    """Per-sequence loss of one packed row vs the same sequences padded, on the 7B shape in bf16, against a float32
    padded reference (the bf16 noise floor); plus the varlen kernel's forward and backward against per-sequence
    SDPA in float32. Packing is correct when it is no further from the fp32 reference than bf16 padding is."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from prodesc import attention as speed

    speed.register_varlen_attention()
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    g = torch.Generator().manual_seed(2)
    lengths = sample_lengths()[:8]
    seqs = [[1] + torch.randint(3, 32768, (n - 1,), generator=g).tolist() for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    packed = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in batch.items() if k != "labels"}
    res: dict = {"lengths": lengths, "tokens": sum(lengths)}
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                     device_map={"": dev}).eval()
        tag = "fp32" if dtype == torch.float32 else "bf16"
        losses[f"{tag}_padded"] = _padded_losses(model, seqs, dev)
        if dtype == torch.bfloat16:
            losses["bf16_packed_sdpa_blockmask"] = _packed_losses(model, seqs, packed)
            losses["bf16_leak_no_position_ids"] = _packed_losses(model, seqs, {"input_ids": packed["input_ids"]})
            model.config._attn_implementation_internal = speed.VARLEN
            losses["bf16_packed_varlen"] = _packed_losses(model, seqs, packed)
        del model
        torch.cuda.empty_cache() if dev == "cuda" else None
    ref = losses["fp32_padded"]
    res["max_abs_diff_vs_fp32_padded"] = {k: round(max(abs(a - b) for a, b in zip(v, ref, strict=True)), 5)
                                          for k, v in losses.items() if k != "fp32_padded"}
    res["losses"] = {k: [round(x, 5) for x in v] for k, v in losses.items()}
    d = res["max_abs_diff_vs_fp32_padded"]
    floor = max(d["bf16_padded"], 1e-3)
    res["tolerance"] = round(2 * floor, 5)
    res["packed_ok"] = d["bf16_packed_varlen"] <= 2 * floor and d["bf16_packed_sdpa_blockmask"] <= 2 * floor
    res["leak_detected"] = d["bf16_leak_no_position_ids"] > 2 * floor
    if dev == "cuda":
        res["varlen_kernel"] = _check_varlen_kernel()
    print("CHECK " + json.dumps(res), flush=True)
    return res


def _padded_losses(model, seqs: list[list[int]], dev: str) -> list[float]:
    import torch

    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), 4):  # 4 rows at a time keeps fp32 logits (rows x width x 32k) small
            logits = model(input_ids=ids[i:i + 4].to(dev), attention_mask=mask[i:i + 4].to(dev), use_cache=False).logits
            out += [_seq_ce(logits[j, : len(s)], s) for j, s in enumerate(seqs[i:i + 4])]
    return out


def _packed_losses(model, seqs: list[list[int]], inputs: dict) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0]
    out, start = [], 0
    for s in seqs:
        out.append(_seq_ce(logits[start:start + len(s)], s))
        start += len(s)
    return out


def _seq_ce(logits, ids: list[int]) -> float:
    import torch

    target = torch.tensor(ids[1:], device=logits.device)
    return torch.nn.functional.cross_entropy(logits[:-1].float(), target).item()


def _check_varlen_kernel() -> dict:
    """varlen_attn (bf16) vs per-sequence SDPA in float32: relative error of output and of dq/dk/dv."""
    import torch

    from prodesc import attention as speed

    g = torch.Generator(device="cuda").manual_seed(3)
    lens = [37, 512, 5, 1300, 190]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    q = torch.randn(sum(lens), 32, 128, device="cuda", generator=g)
    k, v = (torch.randn(sum(lens), 8, 128, device="cuda", generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    grads = {}
    for tag, fn, dtype in (("ref", speed._varlen_reference, torch.float32), ("varlen", speed._varlen, torch.bfloat16)):
        qs, ks, vs = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
        out = fn(qs, ks, vs, cu, max(lens), None) if tag == "varlen" else fn(qs, ks, vs, cu, None)
        out.backward(dout.to(dtype))
        grads[tag] = [out.float(), qs.grad.float(), ks.grad.float(), vs.grad.float()]
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(grads["varlen"], grads["ref"], strict=True)]
    return {"rel_err_out_dq_dk_dv": [round(x, 5) for x in rel], "kernel": str(speed._varlen_kernel())}


# ---------------------------------------------------------------------------------------------- one config
def run_one(name: str, a: argparse.Namespace) -> dict:
    spec = _spec(name)
    if spec["kind"] == "prodesc":
        res = _run_prodesc(name, spec, a)
    else:
        res = _run_recipe(name, spec["kind"], a)
    return _summarise(res, a)


def _run_prodesc(name: str, spec: dict, a: argparse.Namespace) -> dict:
    """The preset through prodesc's own code path (train.train), timed by a callback added to its trainer."""
    import shutil

    import torch

    import prodesc.train.recipe as ptrain
    from prodesc import config as configmod

    if not Path(a.data_dir, "train.parquet").exists():
        make_data(a.data_dir, a.tokenizer)
    sets = [f"model.name={a.model_dir}", f"train.max_steps={a.steps}", "train.eval_steps=100000",
            "train.save_steps=100000", "train.logging_steps=1", "train.warmup_ratio=0.0"] + spec["set"]
    if a.tiny:  # CPU: no bitsandbytes, no Triton, no bf16 matmuls worth having
        sets += ["model.quantization=none", "model.dtype=float32", "train.liger=false", "train.optim=adamw_torch",
                 "train.torch_compile=false"]
    cfg = configmod.load(ROOT / spec["preset"], sets)
    timer = _Timer()
    original = ptrain._setup_trainer

    def with_timer(*args, **kw):
        trainer, watch = original(*args, **kw)
        trainer.add_callback(timer.callback())
        _reset_peak()
        return trainer, watch

    ptrain._setup_trainer = with_timer
    out = Path(f"/tmp/bench-run-{name.split('=')[0]}")
    ptrain.train(cfg, Path(a.data_dir), out, overwrite=True)
    state = timer.state
    shutil.rmtree(out, ignore_errors=True)
    t, lo = cfg.train, cfg.lora
    return dict(name=name, kind="prodesc", preset=spec["preset"], overrides=spec["set"], state=state,
                marks=timer.marks, settings=dict(
                    quantization=cfg.model.quantization, attn=cfg.model.attn_implementation, lora_r=lo.r,
                    lora_targets=lo.target_modules, lora_dropout=lo.dropout, batch=t.batch_size,
                    grad_accum=t.grad_accum, max_length=t.max_length, packing=t.packing, liger=t.liger,
                    gradient_checkpointing=t.gradient_checkpointing, optim=t.optim,
                    torch_compile=t.torch_compile), gpu=torch.cuda.is_available())


def _run_recipe(name: str, kind: str, a: argparse.Namespace) -> dict:
    """The notebook's recipe (kind=recipe) or Unsloth's best packed setup (kind=unsloth), as anchor_seed.py ran
    them: plain TRL/PEFT (or Unsloth's FastLanguageModel) on random token ids of the sampled lengths."""
    if kind == "unsloth":
        import unsloth  # noqa: F401  (patches transformers/trl before they are imported)
    import inspect

    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available() and not a.tiny
    rng = np.random.default_rng(1)
    ds = Dataset.from_dict({"input_ids": [[1] + rng.integers(3, 32768, n - 1).tolist() for n in sample_lengths()]})
    peft_config = LoraConfig(lora_alpha=16, lora_dropout=0.1, r=8, bias="none", task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    t = time.time()
    if kind == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=2048,
                                                     dtype=torch.bfloat16, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 use_gradient_checkpointing="unsloth", random_state=0)
        peft_config = None
    elif gpu:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=False)
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, quantization_config=q, device_map="auto",
                                                     attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    print(f"[{name}] loaded in {time.time() - t:.0f}s", flush=True)
    args = dict(output_dir=f"/tmp/out-{name}", num_train_epochs=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=4, optim="paged_adamw_32bit" if gpu else "adamw_torch", logging_steps=1,
                save_strategy="no", learning_rate=5e-5, bf16=gpu, max_grad_norm=0.3, max_steps=a.steps,
                warmup_ratio=0.03, group_by_length=True, lr_scheduler_type="cosine", report_to="none",
                include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
    Args = TrainingArguments
    if kind == "unsloth":
        args.update(per_device_train_batch_size=8, gradient_accumulation_steps=1, group_by_length=False,
                    packing=True, max_length=2048)
        Args = SFTConfig
    ok = set(inspect.signature(Args.__init__).parameters)
    if "group_by_length" not in ok and args.pop("group_by_length", False):  # transformers >= 5.2x renamed it
        args["train_sampling_strategy"] = "group_by_length"
    dropped = sorted(k for k in args if k not in ok)
    targs = Args(**{k: v for k, v in args.items() if k in ok})
    trainer = SFTTrainer(model=model, train_dataset=ds, peft_config=peft_config, args=targs,
                         processing_class=_word_tokenizer())
    gc = getattr(trainer.args, "gradient_checkpointing", None)
    print(f"[{name}] args dropped as unknown: {dropped}; gradient_checkpointing={gc}", flush=True)
    timer = _Timer()
    trainer.add_callback(timer.callback())
    _reset_peak()
    trainer.train()
    settings = dict(quantization="nf4" if gpu else "none", lora_r=8, lora_targets="q,k,v,o",
                    lora_dropout=0 if kind == "unsloth" else 0.1, batch=targs.per_device_train_batch_size,
                    grad_accum=targs.gradient_accumulation_steps, packing=kind == "unsloth", optim=str(targs.optim),
                    gradient_checkpointing="unsloth" if kind == "unsloth" else gc, dropped_args=dropped)
    return dict(name=name, kind=kind, state=trainer.state, marks=timer.marks, settings=settings, gpu=gpu)


def _word_tokenizer():
    """anchor_seed.py's tokenizer: one word per id, pad = eos (the recipes' data are ids already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 32768)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


class _Timer:
    """Step-end marks (cuda-synchronized): time and the trainer's count of non-pad input tokens."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[float, int]] = {}
        self.state = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                _sync()
                timer.marks[state.global_step] = (time.perf_counter(), int(state.num_input_tokens_seen))
                timer.state = state

        return Timer()


def _summarise(res: dict, a: argparse.Namespace) -> dict:
    import torch

    marks, state = res.pop("marks"), res.pop("state")
    last = max(marks)
    w = min(a.warmup, last - 1)
    (t0, c0), (t1, c1) = marks[w], marks[last]
    tps = (c1 - c0) / (t1 - t0)
    losses = [round(h["loss"], 4) for h in state.log_history if "loss" in h]
    n = _n_params(a.model_dir)
    out = dict(res, card=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               tokens_per_s=round(tps, 1), s_per_step=round((t1 - t0) / (last - w), 3),
               tokens_per_step=round((c1 - c0) / (last - w)), steps_timed=last - w, warmup_steps=w,
               peak_gib=_gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
               peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None,
               n_params=n, mfu_989=round(4 * n * tps / PEAK_DATASHEET, 4),
               mfu_790=round(4 * n * tps / PEAK_MEASURED, 4),
               first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
               losses=losses, versions=_versions())
    if out["peak_gib"] is None:
        out["peak_gib"] = out["peak_reserved_gib"] = 0.0
    return out


def _n_params(model_dir: str) -> int:
    p = Path(model_dir, "n_params.json")
    return json.loads(p.read_text())["n_params"] if p.exists() else 7_248_023_552


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for lib in ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "liger-kernel", "unsloth"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gib(x: float) -> float:
    return round(x / 2**30, 2)


if __name__ == "__main__":
    main()

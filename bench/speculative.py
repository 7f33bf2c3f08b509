"""Prompt-lookup speculation (issue 25) on one GPU: acceptance and speed on real catalogs, its cost on the 7B shape.

    # device, one stage a call (docs/PERFORMANCE.md has the exact commands); each writes a part file
    python3 bench/speculative.py catalog --name abt --run /tmp/qgpu/runs/abt --data /tmp/qgpu/data --out $OUT/abt.json
    python3 bench/speculative.py shape7b --only rejected --out $OUT/7b_rejected.json      # makes /tmp/m7b if missing
    python3 bench/speculative.py shape7b --only served --out $OUT/7b_served.json
    # here: the issue's JSON from the parts, with the projection's arithmetic printed and kept beside it
    python3 bench/speculative.py combine abt.json lf_amazon.json 7b_rejected.json 7b_served.json \
        --out bench/results/speculative-YYYYMMDD.json
    python3 bench/speculative.py smoke          # CPU: every stage on tiny models, end to end (~1-2 min)

catalog: a trained run (the quality study's catalog-aware SmolLM2) on its data dir's test prompts, neighbours
included; the serving engine (CUDA graphs; `--compile` to compile the step too) at batch 1, 16 and 64 with
`generate.speculate_tokens` 0 and K, greedy, `--new-tokens` at most per answer (answers stop by themselves):
new tokens/s, answers identical, tokens per verify step (1 + accepted / row-steps that verified), and `prodesc
generate`'s path without speculation (transformers' generate) at batch 1 for reference.
shape7b: the random-init Mistral-7B shape (bench/train_throughput.py make), bf16, 256 new tokens per answer.
  rejected: the engine at batch 1 and 64 without speculation, then with every row drafting K tokens every step and
  every draft rejected (drafts replaced by a token the model never picks): the policy as shipped ("auto": it stops
  verifying when drafts do not pay) and forced ("always": the raw cost of a verify step); the step costs that
  warm_up timed. served: one stream through the real app (in process: batcher thread + event loop, no sockets;
  the engine warmed up and compiled as `prodesc serve` does) against offline `describe` at batch 1 (the compiled
  static-cache path of `prodesc generate`), same process, same prompt.
combine: `{"card", "catalogs": {name: {tokens_per_step, speedup_b1, speedup_b16, identical}},
  "rejected_overhead_pct": {"1", "64"}, "served_vs_offline_b1", "projected_7b_abt_b1_tokens_per_s"}` exactly, and
  `<out>.detail.json` beside it with every measured number and the projection's arithmetic: the 7B's measured
  single-stream rate when every step verifies K drafts (forced, all rejected: one token a step) times Abt's tokens
  per verify step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
K = 4
SHARED_TOK = ROOT.parent / "shared" / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer"  # the dev box's copy
BATCHES = (1, 16, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["catalog", "shape7b", "combine", "smoke", "control"])
    ap.add_argument("parts", nargs="*", type=Path, help="combine: the part files")
    ap.add_argument("--name", help="catalog: abt or lf_amazon")
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--limit", type=int, default=128, help="catalog: test titles at most (batch 1: the first 16)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=K, help="generate.speculate_tokens")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--no-describe", action="store_true", help="catalog: skip the reference (transformers' "
                    "generate at batch 1, compiled: ~40 s of compiling on a GPU)")
    ap.add_argument("--compile", action="store_true", help="catalog: compile the engine's step (shape7b: always)")
    ap.add_argument("--only", default="rejected,served", help="shape7b: which of rejected, served")
    ap.add_argument("--model-dir", default="/tmp/m7b")
    ap.add_argument("--dtype", default="bfloat16", help="control: the dtype the run's model is cast to")
    whl_tok = ROOT / ".whl" / "mistral-tok"
    ap.add_argument("--tokenizer", default=str(whl_tok if whl_tok.exists() else SHARED_TOK))
    ap.add_argument("--tiny", action="store_true", help="shape7b: the 2-layer model on CPU (plumbing)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.stage == "combine":
        result, detail = combine([json.loads(p.read_text()) for p in a.parts])
        _write(a.out, result)
        _write(a.out.with_suffix(".detail.json") if a.out else None, detail)
        return
    if a.stage == "smoke":
        return smoke(a)
    part = {"catalog": catalog, "shape7b": shape7b, "control": control}[a.stage](a)
    _write(a.out, part)


# ---- catalog: a trained run on its test prompts ---------------------------------------------------------------

def catalog(a: argparse.Namespace) -> dict[str, Any]:
    from prodesc.generate import Generator
    from prodesc.records import read_split

    gen = Generator.from_run(a.run)
    gen.use_data_index(a.data)
    titles = [r["title"] for r in read_split(a.data, "test", a.limit)]
    prompts = [gen.prompt_ids(t, nb) for t, nb in zip(titles, gen.neighbours(titles), strict=True)]
    out: dict[str, Any] = {"stage": "catalog", "name": a.name, "run": str(a.run), "titles": len(titles),
                           "k": a.k, "env": _env(), "batches": {}}
    for b in [int(x) for x in a.batches.split(",")]:
        some = prompts[:16] if b == 1 else prompts
        runs = {k: _engine_run(gen, some, b, k, a.new_tokens, compile=a.compile) for k in (0, a.k)}
        plain, spec = runs[0], runs[a.k]
        out["batches"][str(b)] = {
            "prompts": len(some), "plain": _public(plain), "speculating": _public(spec),
            "speedup": round(spec["tokens_per_s"] / plain["tokens_per_s"], 3),
            "identical": plain["answers"] == spec["answers"],
            "same_answers": sum(x == y for x, y in zip(plain["answers"], spec["answers"], strict=True))}
        print(f"[{a.name} b{b}] {json.dumps(out['batches'][str(b)])}", flush=True)
    if not a.no_describe:
        out["describe_b1"] = _describe_run(gen, titles[:16], a.new_tokens)
        print(f"[{a.name} describe b1] {json.dumps(out['describe_b1'])}", flush=True)
    return out


def _engine_run(gen: Any, prompts: list[list[int]], slots: int, k: int, new_tokens: int, compile: bool,
                speculate: str = "auto", reject: bool = False) -> dict[str, Any]:
    """The prompts through a warmed-up engine of `slots` slots (all queued at once, joining as slots free), greedy;
    the first `slots` rows again first, untimed (lazy inits, the allocator), then the timed pass."""
    from prodesc.generate import Row

    decoding = gen.cfg.generate.model_copy(update={"speculate_tokens": k, "max_new_tokens": new_tokens})
    cache_len = -(-(max(map(len, prompts)) + new_tokens) // 256) * 256
    engine = gen.engine(slots, cache_len, gen=decoding, compile=compile)
    engine.speculate = speculate
    t0 = time.perf_counter()
    engine.warm_up()
    warm_s = time.perf_counter() - t0
    with _rejecting(reject):
        _drain(engine, [Row(p, new_tokens, 0.0, 1.0) for p in prompts[:slots]])
        before = {key: getattr(engine, key) for key in ("drafted", "accepted", "verify_rows", "verify_steps")}
        rows = [Row(p, new_tokens, 0.0, 1.0) for p in prompts]
        _sync()
        t0 = time.perf_counter()
        steps = _drain(engine, rows)
        _sync()
        dt = time.perf_counter() - t0
    counts = {key: getattr(engine, key) - before[key] for key in before}
    n = sum(len(r.tokens) for r in rows)
    return {"slots": slots, "k": k, "speculate": speculate, "graphs": engine.graphs, "new_tokens": n,
            "seconds": round(dt, 3),
            "tokens_per_s": round(n / dt, 1), "steps": steps, "warm_up_s": round(warm_s, 1), **counts,
            "tokens_per_verify_step": round(1 + counts["accepted"] / counts["verify_rows"], 3)
            if counts["verify_rows"] else None,
            "step_cost_ms": {f"b{b}_w{w}": round(s * 1000, 3) for (b, w), s in sorted(engine._cost.items())},
            "answers": [r.tokens for r in rows]}


def _drain(engine: Any, rows: list[Any]) -> int:
    for row in rows:
        engine.add(row)
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
    return steps


def _describe_run(gen: Any, titles: list[str], new_tokens: int) -> dict[str, Any]:
    """`prodesc generate`'s path without speculation (transformers' generate), one title a call, second pass timed."""
    decoding = gen.cfg.generate.model_copy(update={"speculate_tokens": 0, "max_new_tokens": new_tokens,
                                                  "batch_size": 1})
    gen.describe(titles[:2], decoding)
    _sync()
    t0 = time.perf_counter()
    recs = gen.describe(titles, decoding)
    _sync()
    dt = time.perf_counter() - t0
    n = sum(r["n_tokens"] for r in recs)
    return {"titles": len(titles), "new_tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1)}


class _rejecting:
    """Within: every greedy row drafts `k` tokens every step, each a token no row chooses (the pad id, which the
    processors and a trained model never pick; a random model almost never): every draft rejected."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        if not self.on:
            return
        from prodesc.generate import continuous

        self.original = continuous.propose

        def propose(seq: Any, end: Any, allowed: Any, k: int, **kw: Any) -> tuple[Any, Any]:
            drafts, _ = self.original(seq, end, allowed, k, **kw)
            return drafts * 0 + _PAD[0], allowed.clamp(max=k)

        continuous.propose = propose

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            from prodesc.generate import continuous

            continuous.propose = self.original


_PAD = [0]


def control(a: argparse.Namespace) -> dict[str, Any]:
    """Are answers that differ with speculation a speculation bug or the dtype's? The same prompts greedy through
    the engine three ways: without speculation at `slots` = the first and the last of --batches (the batch's
    make-up alone changes), and speculating at the last; answers compared pairwise. In float32 all three must agree
    (tests/test_speculate.py); in bfloat16 a matmul's rounding depends on how many rows it holds, so a near-tie can
    go either way whenever the batch differs, speculation or not."""
    import torch

    from prodesc.generate import Generator
    from prodesc.records import read_split

    gen = Generator.from_run(a.run)
    gen.model.to(getattr(torch, a.dtype))
    gen.use_data_index(a.data)
    titles = [r["title"] for r in read_split(a.data, "test", a.limit)]
    prompts = [gen.prompt_ids(t, nb) for t, nb in zip(titles, gen.neighbours(titles), strict=True)]
    batches = [int(x) for x in a.batches.split(",")]
    small, large = batches[0], batches[-1]
    runs = {"plain_small": _engine_run(gen, prompts, small, 0, a.new_tokens, compile=a.compile),
            "plain_large": _engine_run(gen, prompts, large, 0, a.new_tokens, compile=a.compile),
            "spec_large": _engine_run(gen, prompts, large, a.k, a.new_tokens, compile=a.compile)}
    pairs = [("plain_small", "plain_large"), ("plain_large", "spec_large"), ("plain_small", "spec_large")]
    out = {"stage": "control", "dtype": a.dtype, "slots": [small, large], "k": a.k, "prompts": len(prompts),
           "env": _env(), "tokens": {n: r["new_tokens"] for n, r in runs.items()},
           "same_answers": {f"{x} vs {y}": sum(p == q for p, q in zip(runs[x]["answers"], runs[y]["answers"],
                                                                       strict=True)) for x, y in pairs}}
    print(json.dumps(out), flush=True)
    return out


# ---- shape7b: the cost of speculation and the served single stream on the 7B shape -----------------------------

def shape7b(a: argparse.Namespace) -> dict[str, Any]:
    from prodesc.config import resolve
    from prodesc.generate import Generator

    if not Path(a.model_dir, "config.json").exists():
        cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "make", "--model-dir", a.model_dir,
               "--tokenizer", a.tokenizer] + (["--tiny"] if a.tiny else [])
        subprocess.run(cmd, check=True)
    dtype = "float32" if a.tiny else "bfloat16"
    gen = Generator.from_model(a.model_dir, None, resolve(flags={"model.name": a.model_dir, "model.dtype": dtype}))
    _PAD[0] = gen.tok.pad_token_id
    titles = _titles(64)
    prompts = [gen.prompt_ids(t) for t in titles]
    out: dict[str, Any] = {"stage": "shape7b", "k": a.k, "env": _env(), "new_tokens": a.new_tokens}
    parts = a.only.split(",")
    if "rejected" in parts:
        out["rejected"] = {}
        for b in (1, 64):
            some = prompts[:b]
            runs = {"plain": _engine_run(gen, some, b, 0, a.new_tokens, compile=False),
                    "auto": _engine_run(gen, some, b, a.k, a.new_tokens, compile=False, reject=True),
                    "forced": _engine_run(gen, some, b, a.k, a.new_tokens, compile=False, speculate="always",
                                          reject=True)}
            plain = runs["plain"]["tokens_per_s"]
            out["rejected"][str(b)] = {name: _public(r) for name, r in runs.items()} | {
                "overhead_pct_auto": round(100 * (1 - runs["auto"]["tokens_per_s"] / plain), 2),
                "overhead_pct_forced": round(100 * (1 - runs["forced"]["tokens_per_s"] / plain), 2)}
            print(f"[7b rejected b{b}] {json.dumps(out['rejected'][str(b)])}", flush=True)
    if "served" in parts:
        out["served"] = _served_vs_offline(gen, titles[0], a.new_tokens)
        print(f"[7b served] {json.dumps(out['served'])}", flush=True)
    return out


def _served_vs_offline(gen: Any, title: str, new_tokens: int) -> dict[str, Any]:
    """One stream through the app in this process (its engine warmed up: compiled, graphs captured) vs offline
    `describe` at batch 1, same title, each timed on its second call."""
    import asyncio

    import httpx

    from prodesc.config import ServeConfig
    from prodesc.serve.app import create_app

    offline_cfg = gen.cfg.generate.model_copy(update={"max_new_tokens": new_tokens, "batch_size": 1})
    gen.describe([title], offline_cfg)
    times = []
    for _ in range(2):
        _sync()
        t0 = time.perf_counter()
        rec = gen.describe([title], offline_cfg)[0]
        _sync()
        times.append(time.perf_counter() - t0)
    offline = rec["n_tokens"] / min(times)
    t0 = time.perf_counter()
    app = create_app(gen, ServeConfig(max_batch_size=16, cache_len=512, max_new_tokens_cap=new_tokens,
                                      batch_window_ms=0))
    start_s = time.perf_counter() - t0
    body = {"titles": [title], "max_new_tokens": new_tokens}

    async def rounds() -> list[tuple[float, int]]:
        transport = httpx.ASGITransport(app=app)
        got = []
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=300) as http:
            try:
                for _ in range(3):
                    t = time.perf_counter()
                    r = await http.post("/v1/describe", json=body)
                    r.raise_for_status()
                    got.append((time.perf_counter() - t, r.json()["descriptions"][0]["n_tokens"]))
            finally:
                await app.state.prodesc.batcher.close()
        return got

    got = asyncio.run(rounds())
    served = max(n / dt for dt, n in got[1:])
    engine = app.state.prodesc.batcher.engines[True]
    return {"offline_b1_tokens_per_s": round(offline, 1), "served_1_tokens_per_s": round(served, 1),
            "served_vs_offline": round(served / offline, 3), "server_start_s": round(start_s, 1),
            "engine_graphs": engine.graphs, "engine_compiled": bool(engine.graphs and engine._graphs.compile),
            "graphs": len(engine._graphs.captured) if engine._graphs else 0,
            "n_tokens": rec["n_tokens"]}


# ---- combine: the JSON -------------------------------------------------------------------------------

def combine(parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    cats = {p["name"]: p for p in parts if p.get("stage") == "catalog"}
    shape = {}
    for p in parts:
        if p.get("stage") == "shape7b":
            shape.update(p)
    catalogs, excluded = {}, []
    for name, p in cats.items():
        b = p["batches"]
        speedup = {n: _comparable(p, n, r, excluded) for n, r in b.items()}
        catalogs[name] = {"tokens_per_step": b["1"]["speculating"]["tokens_per_verify_step"] or 1.0,
                          "speedup_b1": speedup["1"], "speedup_b16": speedup.get("16", 0.0),
                          "identical": all(x["identical"] for x in b.values())}
    rej = shape.get("rejected", {})
    overhead = {b: rej[b]["overhead_pct_auto"] for b in ("1", "64") if b in rej}
    tps_forced_b1 = rej.get("1", {}).get("forced", {}).get("tokens_per_s")
    per_step = catalogs.get("abt", {}).get("tokens_per_step")
    projected = round(tps_forced_b1 * per_step, 1) if tps_forced_b1 and per_step else 0.0
    arithmetic = (f"7B single stream, every step verifying {shape.get('k', K)} drafts (all rejected: 1 token a "
                  f"step): {tps_forced_b1} tokens/s = verify steps/s; x Abt's {per_step} tokens per verify step "
                  f"(SmolLM2 run's acceptance, assumed to carry to the 7B) = {projected} tokens/s")
    print(arithmetic)
    cards = {p["env"]["card"] for p in parts if "env" in p}
    result = {"card": ", ".join(sorted(cards)), "catalogs": catalogs, "rejected_overhead_pct": overhead,
              "served_vs_offline_b1": shape.get("served", {}).get("served_vs_offline", 0.0),
              "projected_7b_abt_b1_tokens_per_s": projected}
    detail = {"projection": arithmetic, "not_comparable": excluded, "parts": [_strip(p) for p in parts]}
    return result, detail


def _comparable(part: dict[str, Any], batch: str, r: dict[str, Any], excluded: list[str]) -> float | None:
    """The batch's speedup, or None where one side ran on a GPU without its CUDA graphs (a capture that failed
    leaves that engine eager: a slower baseline, not speculation's gain). Parts written before `graphs` was
    recorded: a GPU engine with graphs has its step costs, timed at warm-up; an eager one has none."""
    if part["env"]["card"] == "cpu":
        return r["speedup"]
    off = [side for side in ("plain", "speculating") if not r[side].get("graphs", bool(r[side]["step_cost_ms"]))]
    if off:
        excluded.append(f"{part['name']} batch {batch}: {' and '.join(off)} decoded without CUDA graphs "
                        f"(speedup {r['speedup']} not comparable)")
        return None
    return r["speedup"]


def _strip(p: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(p, default=str))


# ---- smoke: every stage on CPU ------------------------------------------------------------------------------

def smoke(a: argparse.Namespace) -> None:
    """Every stage on tiny models on CPU: a tiny run trained on a few synthetic records, the 2-layer 7B shape."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="spec-smoke-"))
    run, data = _tiny_run(tmp)
    py = [sys.executable, __file__]
    common = ["--new-tokens", "24", "--batches", "1,4", "--limit", "8"]
    parts = []
    for name in ("abt", "lf_amazon"):
        parts.append(tmp / f"{name}.json")
        subprocess.run([*py, "catalog", "--name", name, "--run", str(run), "--data", str(data), *common,
                        "--out", str(parts[-1])], check=True)
    parts.append(tmp / "7b.json")
    subprocess.run([*py, "shape7b", "--tiny", "--model-dir", str(tmp / "m7t"), "--new-tokens", "24",
                    "--tokenizer", a.tokenizer, "--out", str(parts[-1])], check=True)
    out = a.out or tmp / "speculative-smoke.json"
    subprocess.run([*py, "combine", *map(str, parts), "--out", str(out)], check=True)
    result = json.loads(out.read_text())
    assert set(result) == {"card", "catalogs", "rejected_overhead_pct", "served_vs_offline_b1",
                           "projected_7b_abt_b1_tokens_per_s"}, result
    assert all(c["identical"] for c in result["catalogs"].values()), result
    print(json.dumps(result, indent=1))


def _tiny_run(tmp: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_serve import make_tiny_run

    run = make_tiny_run(tmp)
    return run, tmp / "data"


# ---- helpers ------------------------------------------------------------------------------------------------

def _titles(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    from generate_throughput import _titles as titles

    return titles(n)


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "answers"}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _env() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__}


def _write(path: Path | None, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=1, default=str)
    if path is None:
        print(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()

"""`prodesc serve` under load: N concurrent OpenAI-client streams vs offline `Generator.describe` at batch N.

    # on the device (one call, < 10 min; carry .whl; wheels from `bash bench/prepare_wheels.sh`):
    set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/common/*.whl .whl/main/*.whl .whl/serve/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
    python3 bench/serve_load.py --budget-s 540 --out $OUT/serve_load.json
    python3 bench/serve_load.py --offline "" --warm-clients --out $OUT/serve_load_warm.json   # long-lived clients
    # CPU plumbing check (tiny random Mistral, tiny N): python bench/serve_load.py --tiny --streams 1,4 --new-tokens 16

Model: the random-init Mistral-7B-v0.3 shape of bench/train_throughput.py (`make`, made when missing), with the
real tokenizer (.whl/mistral-tok), bf16, served as a plain merged model (`prodesc serve --model DIR`). A random
model almost never emits EOS, so every answer runs to --new-tokens (greedy).

For each N (default 1, 16, 64, 256): N streams start together (split over client processes, each an asyncio
loop of `openai.AsyncOpenAI` streams with usage), after one warm-up round that captures the decode step's CUDA
graphs. The client processes are fresh each round, so their first requests also pay for opening connections and
warming the client's code; `--warm-clients` has each open its connections with a 1-token request per stream
first, as long-lived clients would (on the H200 one stream's TTFT went 154 -> 54 ms).
Reported: aggregate new tokens/s (completion tokens / wall time from the first request to the last
[DONE]), time to first token and inter-token latency (p50/p95 over all streams' content chunks), and the engine's
model-thread ms per step by phase (`engine_ms_per_step`, from /metrics: sync is the wait for the GPU, `host` a
decode step's forward + choose + emit, prefill apart; steps, rows per step, prefills and rows per prefill). Then
the server stops and the same process loads the model once more for offline `Generator.describe` at batch N (the
`prodesc generate` path: static cache, compiled decode, power-of-two buckets), timed after a compiling call.
Targets (issue 15, one H200): 64 streams >= 85% of offline batch 64; TTFT p95 <= 500 ms at 16; one stream >= 150.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from generate_throughput import _titles  # noqa: E402
from serve_probe import stop_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m7b")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl" / "mistral-tok"))
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--offline", default="64,1,16,256", help="offline batch sizes, in this order while time lasts")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=540, help="skip offline batches that would start after this")
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: checks the plumbing, not speed")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="more server settings, e.g. --set serve.admit_wait_ms=0 (repeatable)")
    ap.add_argument("--warm-clients", action="store_true", help="each client process opens its connections with a "
                    "1-token request per stream before the timed round (a long-lived client, not a fresh process)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    start, streams = time.time(), [int(n) for n in a.streams.split(",")]
    if not Path(a.model_dir, "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "make", "--model-dir",
                        a.model_dir, "--tokenizer", a.tokenizer] + (["--tiny"] if a.tiny else []), check=True)
    result = {"model": a.model_dir, "new_tokens": a.new_tokens, "served": [], "offline": [], "env": _env()}
    result["served"] = serve_runs(a, streams)
    _save(a, result)
    for n in [int(x) for x in a.offline.split(",") if x]:
        if time.time() - start > a.budget_s - (60 if a.tiny else 120):
            print(f"offline batch {n}: skipped (budget)", flush=True)
            continue
        result["offline"].append(offline(a, n))
        _save(a, result)
    _compare(result)
    _save(a, result)


def serve_runs(a: argparse.Namespace, streams: list[int]) -> list[dict]:
    """Start `prodesc serve --model`, warm it up, then one round of N concurrent streams per N."""
    port = _free_port()
    sets = [f"serve.max_batch_size={max(streams)}", f"serve.max_new_tokens_cap={a.new_tokens}",
            f"serve.cache_len={_cache_len(a.new_tokens)}", f"serve.queue_size={4 * max(streams)}",
            "serve.request_timeout_s=600", "serve.batch_window_ms=5", *a.sets]
    code = ("import sys; from prodesc.serve.app import serve_cli; "
            f"serve_cli(None, {a.model_dir!r}, None, flags={{'serve.port': {port}}}, sets={sets!r})")
    log = Path(os.environ.get("OUT", "/tmp")) / "serve_load.server.log"
    env = {**os.environ, **({"OMP_NUM_THREADS": "2"} if a.tiny else {})}
    if a.tiny:
        env.setdefault("PRODESC_COMPILE_GENERATE", "off")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(port, proc, log)
        print(f"server up in {time.time() - t0:.0f} s", flush=True)
        url, name = f"http://127.0.0.1:{port}/v1", Path(a.model_dir).name
        t0 = time.time()
        for n in streams:  # warm-up: the decode graphs of the buckets each round will use are captured here
            _round(url, name, n, 8)
        print(f"warm-up in {time.time() - t0:.0f} s", flush=True)
        out = []
        for n in streams:
            before = _engine_metrics(port)
            row = {"streams": n, **_round(url, name, n, a.new_tokens, a.warm_clients)}
            row["engine_ms_per_step"] = _per_step(before, _engine_metrics(port))
            print(json.dumps(row), flush=True)
            out.append(row)
        return out
    finally:
        stop_server(proc, 30)


def _round(url: str, model: str, n: int, new_tokens: int, warm: bool = False) -> dict:
    """n streams at once over min(n, 8) client processes; aggregate tokens/s, TTFT and ITL percentiles."""
    procs = min(n, 8)
    titles = _titles(n)
    shares = [titles[i::procs] for i in range(procs)]
    t_start = time.time() + (3.0 if warm else 1.0)  # every process starts its streams at this wall-clock time
    with ProcessPoolExecutor(procs) as pool:
        per = list(pool.map(_client, [url] * procs, [model] * procs, shares, [new_tokens] * procs,
                            [t_start] * procs, [warm] * procs))
    streams = [s for part in per for s in part]
    failed = [s["error"] for s in streams if "error" in s]
    ok = [s for s in streams if "error" not in s]
    tokens = sum(s["tokens"] for s in ok)
    wall = max(s["end"] for s in ok) - t_start if ok else float("nan")
    ttft = [s["ttft"] for s in ok]
    itl = [g for s in ok for g in s["gaps"]]
    return {"ok": len(ok), "failed": len(failed), "errors": failed[:3], "new_tokens": tokens,
            "seconds": round(wall, 3), "new_tokens_per_s": round(tokens / wall, 1),
            "per_stream_tokens_per_s_p50": _pct([s["tokens"] / (s["end"] - s["start"]) for s in ok], 50),
            "ttft_ms_p50": _pct(ttft, 50, 1000), "ttft_ms_p95": _pct(ttft, 95, 1000),
            "itl_ms_p50": _pct(itl, 50, 1000), "itl_ms_p95": _pct(itl, 95, 1000)}


def _client(url: str, model: str, titles: list[str], new_tokens: int, t_start: float, warm: bool = False) -> list[dict]:
    return asyncio.run(_streams(url, model, titles, new_tokens, t_start, warm))


async def _streams(url: str, model: str, titles: list[str], new_tokens: int, t_start: float,
                   warm: bool = False) -> list[dict]:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=len(titles) + 4, max_keepalive_connections=len(titles) + 4)
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600,
                         http_client=httpx.AsyncClient(limits=limits, timeout=600))
    if warm:  # a long-lived client: its connections open and the client's code warm before the timed streams
        await asyncio.gather(*(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": t}], max_tokens=1, temperature=0) for t in titles))
    await asyncio.sleep(max(t_start - time.time(), 0))

    async def one(title: str) -> dict:
        start, times, usage = time.time(), [], None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": title}], max_tokens=new_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.time())
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - counted and shown, not fatal to the round
            return {"error": f"{type(e).__name__}: {e}"[:300]}
        end = time.time()
        if not times:
            return {"error": "no content"}
        return {"start": start, "end": end, "tokens": usage or len(times), "ttft": times[0] - start,
                "gaps": [b - a for a, b in zip(times, times[1:], strict=False)]}

    try:
        return await asyncio.gather(*(one(t) for t in titles))
    finally:
        await client.close()


def offline(a: argparse.Namespace, n: int) -> dict:
    """`Generator.describe` at batch n in a child process (the server's GPU memory is free by then)."""
    code = ("import json,sys,time; sys.path.insert(0, 'bench'); from serve_load import _offline_child; "
            f"print('RESULT ' + json.dumps(_offline_child({a.model_dir!r}, {n}, {a.new_tokens}, {a.tiny})))")
    env = {**os.environ, **({"OMP_NUM_THREADS": "2", "PRODESC_COMPILE_GENERATE": "off"} if a.tiny else {})}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None)
    row = json.loads(line[7:]) if line else {"batch": n, "error": (p.stderr or p.stdout)[-2000:]}
    print(json.dumps(row)[:2000], flush=True)
    return row


def _offline_child(model_dir: str, n: int, new_tokens: int, tiny: bool) -> dict:
    from prodesc import config
    from prodesc.generate import Generator

    dtype = "float32" if tiny else "bfloat16"
    cfg = config.resolve(flags={"model.name": model_dir, "model.dtype": dtype, "generate.batch_size": n,
                                "generate.max_new_tokens": new_tokens})
    gen = Generator.from_model(model_dir, None, cfg)
    titles = _titles(n)
    t0 = time.perf_counter()
    gen.describe(titles)  # compiles this bucket's graphs
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = gen.describe(titles)
    dt = time.perf_counter() - t0
    tokens = sum(r["n_tokens"] for r in records)
    return {"batch": n, "new_tokens": tokens, "seconds": round(dt, 3), "new_tokens_per_s": round(tokens / dt, 1),
            "first_call_s": round(first, 1)}


def _compare(result: dict) -> None:
    """Served vs offline at the same N, and the issue's three targets."""
    off = {r["batch"]: r.get("new_tokens_per_s") for r in result["offline"]}
    served = {r["streams"]: r for r in result["served"]}
    for n, r in served.items():
        if off.get(n):
            r["vs_offline"] = round(r["new_tokens_per_s"] / off[n], 3)
    t = result["targets"] = {}
    if 64 in served and off.get(64):
        t["64_streams_vs_offline_b64 >= 0.85"] = served[64]["vs_offline"]
    if 16 in served:
        t["ttft_ms_p95_at_16 <= 500"] = served[16]["ttft_ms_p95"]
    if 1 in served:
        t["single_stream_tokens_per_s >= 150"] = served[1]["per_stream_tokens_per_s_p50"]
    print(f"\n{'N':>4} {'served tok/s':>12} {'offline tok/s':>13} {'ratio':>6} {'TTFT p50/p95 ms':>16} "
          f"{'ITL p50/p95 ms':>15} {'failed':>6}")
    for n, r in served.items():
        print(f"{n:4d} {r['new_tokens_per_s']:12.1f} {off.get(n) or 0:13.1f} {r.get('vs_offline', 0):6.2f} "
              f"{r['ttft_ms_p50']:7.0f}/{r['ttft_ms_p95']:<8.0f} {r['itl_ms_p50']:6.1f}/{r['itl_ms_p95']:<8.1f} "
              f"{r['failed']:6d}")
    for n, r in served.items():
        print(f"engine ms per step at N={n}: {json.dumps(r.get('engine_ms_per_step', {}))}")
    print("targets: " + json.dumps(t), flush=True)


def _engine_metrics(port: int) -> dict[str, float]:
    """The server's engine phase seconds, decode steps, rows stepped, prefills and rows prefilled so far, from
    /metrics."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("prodesc_engine_seconds{phase="):
            out[name.split('"')[1]] = float(value)
        elif name in ("prodesc_decode_steps_total", "prodesc_batch_size_sum", "prodesc_prefills_total",
                      "prodesc_prefill_rows_total"):
            out[name] = float(value)
    return out


def _per_step(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A round's model-thread ms per step by phase (sync: waiting for the GPU; the rest: host work), the mean
    rows per step, and the round's prefills with their mean rows."""
    steps = after.get("prodesc_decode_steps_total", 0) - before.get("prodesc_decode_steps_total", 0)
    if steps <= 0:
        return {}
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    out = {k: round(v / steps * 1000, 3) for k, v in delta.items() if not k.startswith("prodesc_")}
    out["host"] = round(sum(out.get(k, 0.0) for k in ("forward", "choose", "emit")), 3)  # a decode step's
    prefills = delta.get("prodesc_prefills_total", 0)
    return {**out, "steps": int(steps), "rows": round(delta.get("prodesc_batch_size_sum", 0) / steps, 1),
            "prefills": int(prefills),
            "rows_per_prefill": round(delta.get("prodesc_prefill_rows_total", 0) / prefills, 1) if prefills else 0}


def _cache_len(new_tokens: int) -> int:
    return -(-(96 + new_tokens) // 256) * 256  # the titles' prompts are 30-50 tokens (Mistral template)


def _pct(xs: list[float], q: int, scale: float = 1.0) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))] * scale, 2)


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not healthy in {timeout} s:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count()}


def _save(a: argparse.Namespace, result: dict) -> None:
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""`prodesc serve --run RUN` verified under load (issue 24, items 2 and 3): 1, 16 and 64 concurrent streams of the
fine-tuned model with `<name>-base` requests fired in the middle of each round, /healthz polled throughout for the
engines' CUDA graphs, every 5xx counted, and the served greedy answers compared with `prodesc generate`'s.

    # on the device (carry .whl; wheels from `bash bench/prepare_wheels.sh`), a catalog-aware run (retrieval.k=2):
    python3 bench/serve_gpu.py --run RUN --data DATA --out bench/results/serve_gpu-$(date +%Y%m%d).json
    # CPU plumbing check (a tiny run; graphs are off on a CPU, so it exits 1 saying so):
    python bench/serve_gpu.py --run /tmp/tiny-run --streams 1,4 --new-tokens 16 --check-generate 3 --out /tmp/s.json

`--out` holds exactly `{"card", "errors_5xx", "graphs_on", "streams": {"1"|"16"|"64": {"tokens_per_s",
"ttft_p95_ms"}}}`; `OUT.details.json` beside it the rest (per round: streams ok/failed, base answers' statuses,
every /healthz sample; the generate comparison). How graphs_on is known: /healthz lists, per loaded model, whether
its engine replays CUDA graphs (`serve.service.Service.graphs`); graphs_on is true only when every sample, taken
every 0.25 s from start-up to the end of the last round, says true for every model loaded then (the base
included, once loaded). errors_5xx: the larger of what the clients saw (5xx statuses and in-stream error events)
and the server's own count (/metrics prodesc_requests_total 5xx + prodesc_errors_total server_error in streams).
The equality check: `--check-generate K` titles answered greedily by the server (/v1/describe), then, the server
stopped, by `Generator.from_run(RUN)` as `prodesc generate --run RUN` runs them (with the same --set); every answer
must be equal. In bf16 two correct greedy decoders part at near-ties (their matmuls round differently: the
server's batch and step loop are not generate's; measured 12 of 16 equal on an H100, and on CPU a batch of 4 against
one of 16 alone changes 20 of 32 answers), so check equality with `--set model.dtype=float32` (a QLoRA run's nf4
matmuls then compute in float32 too). Exit
status 1 when any check fails (a 5xx, graphs off unless --allow-eager, an answer that differs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import _free_port, _pct, _wait_healthy  # noqa: E402
from serve_probe import stop_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="A trained run (catalog-aware: retrieval.k > 0).")
    ap.add_argument("--data", type=Path, help="Its prepared data: titles from the test split (else synthetic).")
    ap.add_argument("--streams", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--base-requests", type=int, default=4, help="`<name>-base` requests fired mid-round.")
    ap.add_argument("--check-generate", type=int, default=16, help="Titles whose answers must equal generate's.")
    ap.add_argument("--allow-eager", action="store_true", help="Graphs off is no failure (a QLoRA run: nf4 weights "
                    "decode eagerly by design, generate.fast); graphs_on is still reported as measured.")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    streams = [int(n) for n in a.streams.split(",")]
    titles = _titles(a.data, max(max(streams), a.check_generate, a.base_requests))
    details, health = {"rounds": {}, "base": {}}, []
    port, name = _free_port(), a.run.resolve().name
    t0 = time.time()
    proc = _start(a, port, max(streams))
    poll = _Poller(port, health)
    try:
        _wait_healthy(port, proc, Path(os.environ.get("OUT", "/tmp")) / "serve_gpu.server.log", timeout=900)
        details["startup_s"] = round(time.time() - t0, 1)  # load, merge, warm-up (every graph), until /healthz 200
        print(f"server healthy after {details['startup_s']} s", flush=True)
        poll.start()
        served = _describe(port, name, titles[: a.check_generate], a.new_tokens) if a.check_generate else []
        for n in streams:
            rounds, base = asyncio.run(_round(port, name, titles[:n], a.new_tokens, titles[: a.base_requests]))
            details["rounds"][str(n)], details["base"][str(n)] = rounds, base
            print(json.dumps({"streams": n, **{k: v for k, v in rounds.items() if k != "per_stream"}}), flush=True)
        server_5xx = _server_5xx(port)
    finally:
        poll.stop()
        stop_server(proc, 30)
    details["health"] = health
    details["generate"] = (_compare(a, titles[: a.check_generate], served) if a.check_generate
                           else {"checked": 0, "differ": 0})  # --check-generate 0: no second load (a 7B's minutes)
    client_5xx = sum(r["errors_5xx"] for r in details["rounds"].values()) + sum(
        1 for statuses in details["base"].values() for s in statuses if s >= 500)
    result = {
        "card": _card(),
        "errors_5xx": max(client_5xx, server_5xx),
        "graphs_on": bool(health) and all(s["graphs"] and all(v is True for v in s["graphs"].values())
                                          for s in health),
        "streams": {k: {"tokens_per_s": r["tokens_per_s"], "ttft_p95_ms": r["ttft_p95_ms"]}
                    for k, r in details["rounds"].items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    a.out.with_name(a.out.stem + ".details.json").write_text(json.dumps(details, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    problems = [f"{result['errors_5xx']} 5xx answers"] * bool(result["errors_5xx"])
    problems += ["CUDA graphs off in some /healthz sample"] * (not result["graphs_on"] and not a.allow_eager)
    problems += [f"{details['generate']['differ']} served answers differ from generate's"] * bool(
        details["generate"]["differ"])
    if problems:
        sys.exit("FAILED: " + "; ".join(problems))


def _start(a: argparse.Namespace, port: int, most: int) -> subprocess.Popen:
    sets = [f"serve.max_batch_size={most}", f"serve.max_new_tokens_cap={max(a.new_tokens, 16)}",
            f"serve.queue_size={4 * most + 64}", "serve.request_timeout_s=600", *a.sets]
    cmd = [sys.executable, "-m", "prodesc.cli", "serve", "--run", str(a.run), "--port", str(port)]
    cmd += [x for s in sets for x in ("--set", s)]
    log = Path(os.environ.get("OUT", "/tmp")) / "serve_gpu.server.log"
    env = {k: v for k, v in os.environ.items() if k != "PRODESC_API_KEY"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


class _Poller:
    """/healthz every 0.25 s on a thread: status and each engine's graphs flag."""

    def __init__(self, port: int, samples: list[dict]) -> None:
        self.port, self.samples, self.done = port, samples, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(5)

    def _run(self) -> None:
        import httpx

        while not self.done.is_set():
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5)
                body = r.json()
                self.samples.append({"t": round(time.time(), 2), "status": r.status_code,
                                     "graphs": body.get("graphs", {})})
            except (httpx.HTTPError, ValueError) as e:
                self.samples.append({"t": round(time.time(), 2), "status": 0, "graphs": {}, "error": str(e)[:200]})
            self.done.wait(0.25)


async def _round(port: int, name: str, titles: list[str], new_tokens: int,
                 base_titles: list[str]) -> tuple[dict, list[int]]:
    """len(titles) streams at once; the base requests start once the streams are generating."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=len(titles) + len(base_titles) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.time()
        streams = [asyncio.create_task(_stream(http, name, t, new_tokens)) for t in titles]
        await asyncio.sleep(0.5)  # mid-load: the base model loads (first round) and answers beside the streams
        base = await asyncio.gather(*(http.post("/v1/describe", json={"titles": [t], "model": f"{name}-base",
                                                                      "max_new_tokens": 16})
                                      for t in base_titles))
        done = await asyncio.gather(*streams)
    ok = [s for s in done if s["status"] == 200 and not s["error"]]
    tokens = sum(s["tokens"] for s in ok)
    wall = max((s["end"] for s in ok), default=start) - start
    return {"ok": len(ok), "failed": len(done) - len(ok), "errors_5xx": sum(1 for s in done if s["status"] >= 500
                                                                             or s["error"]),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
            "ttft_p95_ms": _pct([s["ttft"] for s in ok], 95, 1000),
            "errors": [s["error"] or s["status"] for s in done if s not in ok][:5]}, [r.status_code for r in base]


async def _stream(http, name: str, title: str, new_tokens: int) -> dict:
    """One OpenAI chat stream, read as server-sent events: status, in-stream error, TTFT, completion tokens."""
    body = {"model": name, "messages": [{"role": "user", "content": title}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens, error = time.time(), None, 0, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"].get("message", "error")
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.time()
        status = r.status_code
    return {"status": status, "error": error, "tokens": tokens, "ttft": (first or time.time()) - start,
            "end": time.time()}


def _describe(port: int, name: str, titles: list[str], new_tokens: int) -> list[str]:
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}/v1/describe", timeout=600, json={
        "titles": titles, "model": name, "max_new_tokens": new_tokens, "temperature": 0})
    r.raise_for_status()
    return [d["description"] for d in r.json()["descriptions"]]


def _compare(a: argparse.Namespace, titles: list[str], served: list[str]) -> dict:
    """The same titles through `Generator.from_run` (the `prodesc generate --run` path) in a child process."""
    code = ("import json, sys; from prodesc.config import GenerateConfig; from prodesc.generate import Generator; "
            "from prodesc import rundir; "
            f"run = __import__('pathlib').Path({str(a.run)!r}); "
            f"gen = Generator.from_run(run, rundir.settings(run, sets={a.sets!r})); "
            f"recs = gen.describe({titles!r}, gen.cfg.generate.model_copy(update={{'max_new_tokens': "
            f"{a.new_tokens}, 'temperature': 0.0}})); "
            "print('RESULT ' + json.dumps([r['prediction'] for r in recs]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        return {"checked": len(titles), "differ": len(titles), "error": (p.stderr or p.stdout)[-2000:]}
    generated = json.loads(line[7:])
    differ = [{"title": t, "served": s, "generate": g} for t, s, g in zip(titles, served, generated, strict=True)
              if s != g]
    return {"checked": len(titles), "differ": len(differ), "examples": differ[:3]}


def _server_5xx(port: int) -> int:
    """5xx answers and in-stream server errors the server counted (/metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    answers = {}  # endpoint -> 5xx answers
    server_errors = {}  # endpoint -> server_error kinds: its 5xx answers plus errors inside streams already 200
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            endpoint = s.labels.get("endpoint", "")
            if s.name == "prodesc_requests_total" and s.labels.get("status", "").startswith("5"):
                answers[endpoint] = answers.get(endpoint, 0) + int(s.value)
            elif s.name == "prodesc_errors_total" and s.labels.get("kind") == "server_error":
                server_errors[endpoint] = server_errors.get(endpoint, 0) + int(s.value)
    return sum(max(answers.get(e, 0), server_errors.get(e, 0)) for e in answers.keys() | server_errors.keys())


def _titles(data: Path | None, n: int) -> list[str]:
    if data is not None:
        from prodesc.records import read_split

        titles = [r["title"] for r in read_split(data, "test")]
    else:
        from generate_throughput import _titles as synthetic

        titles = synthetic(n)
    return (titles * (n // max(len(titles), 1) + 1))[:n]


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()

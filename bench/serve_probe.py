"""Load probe of `prodesc serve`: N concurrent clients mixing normal, streaming, disconnecting and hostile requests
against a real server on 127.0.0.1; counts failures, 5xx and the server's memory (docs/RELIABILITY.md).

    prodesc data synth --n 600 --seed 0 --out /tmp/probe/catalog.json.gz
    prodesc data prepare /tmp/probe/catalog.json.gz --out /tmp/probe/data
    prodesc train --config configs/tiny.yaml --data /tmp/probe/data --out /tmp/probe/run --set train.max_steps=5
    OMP_NUM_THREADS=1 python bench/serve_probe.py --run /tmp/probe/run --clients 200 --rounds 5 --passes 3

The server runs key-less (the default posture, so the Host and Content-Type guard is exercised) with its
defaults. Each client sends `--rounds` requests, one at a time, each of a kind picked in turn (KINDS); a request
passes when its status is the one its kind expects, or a documented 503/504 under load. A client that hangs up
on purpose passes when the server is still serving afterwards. Everything is bounded: per-request timeouts, a
wall-clock cap on each pass, and the server is stopped at the end whatever happens. The server's RSS is read
after a warm-up and after each pass: flat memory means the later passes add about nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TITLES = ["Red Mug 7", "Girls Ballet Tutu Neon Pink", "Stainless Steel Water Bottle 1L", "Blue Lamp 12"]
LOAD_STATUSES = {503, 504}  # documented answers under load: queue full, deadline passed
MODEL = {"name": ""}  # the served model's name, from /v1/models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="A trained run dir (see the commands above).")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="Requests per client, one after another.")
    ap.add_argument("--passes", type=int, default=1, help="Run the whole load this many times (memory drift).")
    ap.add_argument("--cap-s", type=float, default=300, help="Wall-clock cap on each pass.")
    ap.add_argument("--out", type=Path, help="Also write the summary as JSON here.")
    args = ap.parse_args()
    server, url = _start(args.run)
    try:
        summary = asyncio.run(_probe(url, server.pid, args.clients, args.rounds, args.passes, args.cap_s))
    finally:
        stop_server(server, 10)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    sys.exit(1 if summary["failures"] else 0)


async def _probe(url: str, pid: int, clients: int, rounds: int, passes: int, cap_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=min(60.0, cap_s), limits=limits) as http:
        for title in TITLES:  # warm-up, so the "before" RSS holds the loaded model and the first allocations
            await _normal(http, title)
        rss, walls = [_rss_mb(pid)], []
        tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failures: list[str] = []
        for _ in range(passes):
            t0 = time.monotonic()
            tasks = [asyncio.create_task(_client(http, c, rounds, tally, failures)) for c in range(clients)]
            _, late = await asyncio.wait(tasks, timeout=cap_s)
            for task in late:  # a jammed server: count them, don't wait for them
                task.cancel()
            failures += [f"client still waiting after --cap-s {cap_s}"] * len(late)
            walls.append(round(time.monotonic() - t0, 1))
            await asyncio.sleep(2)  # let abandoned generations notice their clients are gone
            rss.append(_rss_mb(pid))
        health = (await http.get("/healthz")).json()
        t1 = time.monotonic()
        try:
            after: int | str = await _normal(http, "Red Mug 7")
        except httpx.TimeoutException:
            after = "timed out"
        metrics = (await http.get("/metrics")).text
    statuses = collections.Counter(s for kind in tally.values() for s in kind.elements())
    return {"clients": clients, "passes": passes, "requests": sum(statuses.values()), "wall_s_per_pass": walls,
            "failures": len(failures), "failure_examples": failures[:10],
            "5xx_not_503_504": sum(n for s, n in statuses.items() if str(s).startswith("5") and s not in (503, 504)),
            "statuses_by_kind": {k: dict(sorted(v.items(), key=str)) for k, v in sorted(tally.items())},
            "rss_mb_after_warmup_then_each_pass": rss, "healthz_after": health["status"],
            "normal_request_after_s": round(time.monotonic() - t1, 3), "normal_request_after_status": after,
            "generated_tokens": _metric(metrics, "prodesc_generated_tokens_total"),
            "delivered_tokens": _metric(metrics, "prodesc_delivered_tokens_total")}


async def _client(http: httpx.AsyncClient, c: int, rounds: int, tally: dict, failures: list[str]) -> None:
    for r in range(rounds):
        name, (fn, expected) = list(KINDS.items())[(c * rounds + r) % len(KINDS)]
        try:
            status = await fn(http, TITLES[(c + r) % len(TITLES)])
        except httpx.HTTPError as e:
            status = f"client error {type(e).__name__}"
        tally[name][status] += 1
        if status != expected and status not in LOAD_STATUSES:
            failures.append(f"{name}: got {status}, expected {expected}")


async def _normal(http: httpx.AsyncClient, title: str) -> int:
    r = await http.post("/v1/describe", json={"titles": [title], "max_new_tokens": 24})
    return r.status_code


async def _chat(http: httpx.AsyncClient, title: str) -> int:
    body = {"model": _model(), "max_tokens": 24, "messages": [{"role": "user", "content": title}]}
    return (await http.post("/v1/chat/completions", json=body)).status_code


async def _stream(http: httpx.AsyncClient, title: str, temperature: float = 0.7) -> int | str:
    body = {"model": _model(), "stream": True, "max_tokens": 32, "temperature": temperature,
            "messages": [{"role": "user", "content": title}]}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    if r.status_code == 200 and lines[-1:] != ["data: [DONE]"]:
        return "stream without [DONE]"
    errors = [json.loads(x[6:])["error"] for x in lines if x.startswith('data: {"error"')]
    return 504 if errors and errors[0]["type"] == "timeout" else r.status_code


async def _jam(http: httpx.AsyncClient, title: str) -> int | str:
    return await _stream(http, title, temperature=1e-300)  # issue 13's jam


async def _stream_hang_up(http: httpx.AsyncClient, title: str) -> int:
    """A long base-model stream (it rarely stops by itself) read for its first piece, then dropped."""
    body = {"model": _model() + "-base", "stream": True, "max_tokens": 1024,
            "messages": [{"role": "user", "content": title}]}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break
    return r.status_code


async def _describe_hang_up(http: httpx.AsyncClient, title: str) -> str:
    """A long describe the client gives up on after 50 ms (the server sees a disconnect)."""
    body = {"titles": [title], "max_new_tokens": 1024, "model": _model() + "-base"}
    try:
        r = await http.post("/v1/describe", json=body, timeout=0.05)
        return f"answered {r.status_code}"
    except httpx.TimeoutException:
        return "hung up"


async def _raw(http: httpx.AsyncClient, body: bytes, **headers: str) -> int:
    headers = {"Content-Type": "application/json", **headers}
    return (await http.post("/v1/describe", content=body, headers=headers)).status_code


KINDS = {
    "describe": (_normal, 200),
    "chat": (_chat, 200),
    "stream": (_stream, 200),
    "stream temperature 1e-300": (_jam, 200),
    "stream, hang up after a piece": (_stream_hang_up, 200),
    "describe, hang up after 50 ms": (_describe_hang_up, "hung up"),
    "nested 100k deep": (lambda h, t: _raw(h, b'{"titles": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
    "lone surrogate": (lambda h, t: _raw(h, b'{"titles": ["Mug \\ud800"]}'), 400),
    "NaN temperature": (lambda h, t: _raw(h, b'{"titles": ["Mug"], "temperature": NaN}'), 400),
    "text/plain POST": (lambda h, t: _raw(h, b'{"titles": ["Mug"]}', **{"Content-Type": "text/plain"}), 415),
    "form POST": (lambda h, t: _raw(h, b"titles=Mug", **{"Content-Type": "application/x-www-form-urlencoded"}), 415),
    "Host evil.example": (lambda h, t: _raw(h, b'{"titles": ["Mug"]}', Host="evil.example"), 421),
    "max_new_tokens 10^6": (lambda h, t: _raw(h, b'{"titles": ["Mug"], "max_new_tokens": 1000000}'), 400),
}


def _model() -> str:
    return MODEL["name"]


def _start(run: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT / "src")}
    env.pop("PRODESC_API_KEY", None)
    log = open(f"/tmp/serve_probe-{port}.log", "w")  # noqa: SIM115 - the server's whole life
    server = subprocess.Popen([sys.executable, "-m", "prodesc.cli", "serve", "--run", str(run), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            models = httpx.get(url + "/v1/models", timeout=2).json()["data"]
            MODEL["name"] = models[0]["id"]
            return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    sys.exit(f"prodesc serve did not come up; see {log.name}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def stop_server(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM (uvicorn's graceful stop), then SIGKILL after `wait_s`."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()

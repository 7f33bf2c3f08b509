"""How a burst of requests joins a running batch: prefills, rows per prefill and time to first token for each
`serve.admit_wait_ms`, driving the serving engine directly (no HTTP, no client on the same cores).

    python bench/train_throughput.py make --tiny --model-dir /tmp/m7t --tokenizer TOKENIZER_DIR
    OMP_NUM_THREADS=1 python bench/admission.py --model-dir /tmp/m7t --rows 64 --spread-ms 300 --waits 0,30
    # the H200's costs for a 7B (serve_load, N=64): each prefill ~28 ms whatever its size, a decode step ~10 ms
    OMP_NUM_THREADS=1 python bench/admission.py --model-dir /tmp/m7t --prefill-ms 28 --step-ms 10

`--rows` requests arrive at even intervals over `--spread-ms` (the first at 0: from idle it joins at once, the
others while it generates), each for `--new-tokens` greedy tokens. Printed per admit wait: prefills, rows per
prefill, time to first token p50/p95 (arrival to the first token handed out) and the time to the last token.
`--prefill-ms`/`--step-ms` add a sleep to every prefill/decode step, as if a GPU took that long and the host
waited for it: on CPU a tiny model's prefill costs about as much as a decode step, so without them the count of
prefills is the only number that says what a GPU would gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_throughput import _titles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m7t")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--spread-ms", type=float, default=300, help="arrivals spread evenly over this")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--waits", default="0,30", help="serve.admit_wait_ms values, one round each")
    ap.add_argument("--prefill-ms", type=float, default=0.0, help="added to every prefill")
    ap.add_argument("--step-ms", type=float, default=0.0, help="added to every decode step")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per wait, alternating")
    a = ap.parse_args()
    import torch

    from prodesc import config
    from prodesc.generate import Generator

    torch.set_num_threads(1)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg = config.resolve(flags={"model.name": a.model_dir, "model.dtype": dtype})
    gen = Generator.from_model(a.model_dir, None, cfg)
    round_of(gen, 4, 0.0, 4, 0.0, 0.0, 0.0)  # warm-up
    for _ in range(a.repeat):
        for wait_ms in [float(w) for w in a.waits.split(",")]:
            out = round_of(gen, a.rows, a.spread_ms / 1000, a.new_tokens, wait_ms / 1000, a.prefill_ms / 1000,
                           a.step_ms / 1000)
            print(json.dumps({"admit_wait_ms": wait_ms, **out}), flush=True)


def round_of(gen: object, rows: int, spread_s: float, new_tokens: int, wait_s: float, prefill_s: float,
             step_s: float) -> dict:
    from prodesc.generate import Row

    engine = gen.engine(rows, 128 + new_tokens, admit_wait_s=wait_s)
    _add_costs(engine, prefill_s, step_s)
    prompts = [gen.prompt_ids(t) for t in _titles(rows)]
    arrive = [i * spread_s / max(rows - 1, 1) for i in range(rows)]
    first: list[float | None] = [None] * rows
    t0, added = time.perf_counter(), 0
    while added < rows or engine.busy:
        now = time.perf_counter() - t0
        while added < rows and arrive[added] <= now:
            row = Row(prompts[added], new_tokens, 0.0, 1.0)
            row.on_token = lambda _, i=added: first[i] is None and first.__setitem__(i, time.perf_counter() - t0)
            engine.add(row)
            added += 1
        if engine.busy:
            engine.step()
        else:
            time.sleep(max(arrive[added] - now, 0.0))
    wall = time.perf_counter() - t0
    ttft = sorted((f - t) * 1000 for f, t in zip(first, arrive, strict=True) if f is not None)
    return {"prefills": engine.prefills, "rows_per_prefill": round(engine.prefill_rows / engine.prefills, 1),
            "ttft_ms_p50": round(ttft[len(ttft) // 2], 1), "ttft_ms_p95": round(ttft[int(0.95 * len(ttft))], 1),
            "last_token_ms": round(wall * 1000, 1), "prefill_ms": round(engine.seconds["prefill"] * 1000, 1)}


def _add_costs(engine: object, prefill_s: float, step_s: float) -> None:
    """Sleep after each prefill / decode step launch (a GPU's time the host would wait for)."""
    prefill, decode = engine._prefill, engine._decode

    def slow_prefill(new: list) -> object:
        out = prefill(new)
        time.sleep(prefill_s)
        return out

    def slow_decode() -> object:
        out = decode()
        time.sleep(step_s)
        return out

    if prefill_s:
        engine._prefill = slow_prefill
    if step_s:
        engine._decode = slow_decode


if __name__ == "__main__":
    main()

"""Host work per decode step of the serving engine, on CPU with a tiny model: where a step's time goes besides the
forward pass, as rows grow.

    python bench/train_throughput.py make --tiny --model-dir /tmp/m7t --tokenizer TOKENIZER_DIR
    OMP_NUM_THREADS=1 python bench/engine_overhead.py --model-dir /tmp/m7t --rows 1,16,64 --profile 64

Each round adds `rows` rows at once (every --sampled-every'th one sampled at temperature 0.8, top_p 0.9, the rest
greedy) with the smollm2-135m preset's answer processors (repetition_penalty 1.1, no_repeat_ngram_size 4,
stop_boost_after 32; --plain: none, as bench/serve_load.py serves) and runs them for --new-tokens steps. Printed
per decode step (ms, mean after the first 8 steps): the engine's own phases (`Engine.seconds`: forward, choose,
sync, emit; prefill left out) and the streamed-text work the server does for the same tokens
(`service._stream_sinks`, one sink per row).
`--profile N` prints cProfile's top functions of the round with N rows.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m7t")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sampled-every", type=int, default=4, help="every k-th row sampled (0: all greedy)")
    ap.add_argument("--plain", action="store_true", help="no answer processors (the defaults serve_load.py serves)")
    ap.add_argument("--profile", type=int, default=0, help="cProfile the round with this many rows")
    a = ap.parse_args()
    import torch

    from prodesc import config
    from prodesc.generate import Generator

    torch.set_num_threads(1)
    procs = {} if a.plain else {"generate.repetition_penalty": 1.1, "generate.no_repeat_ngram_size": 4,
                                "generate.stop_boost_after": 32}
    cfg = config.resolve(flags={"model.name": a.model_dir, "model.dtype": "float32", **procs})
    gen = Generator.from_model(a.model_dir, None, cfg)
    for n in [int(x) for x in a.rows.split(",")]:
        prof = cProfile.Profile() if n == a.profile else None
        print(json.dumps({"rows": n, **round_of(gen, n, a.new_tokens, a.sampled_every, prof)}), flush=True)
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def round_of(gen: object, n: int, new_tokens: int, every: int, prof: cProfile.Profile | None) -> dict:
    from prodesc.generate import Row
    from prodesc.serve.service import _stream_sinks

    engine = gen.engine(n, 128 + new_tokens)
    sinks = []
    for i in range(n):
        prompt = gen.prompt_ids(f"Red Mug {i} with a much longer title number {i * 7}")
        on_token, _ = _stream_sinks(gen.tok, asyncio.Queue(), len(prompt))
        sampled = every > 0 and i % every == every - 1
        row = Row(prompt, new_tokens, 0.8 if sampled else 0.0, 0.9 if sampled else 1.0)
        row.on_token = lambda t, f=on_token: sinks.append((f, t))
        engine.add(row)
    engine.step()  # the prefill
    steps, t_sinks, before = 0, 0.0, None
    if prof is not None:
        prof.enable()
    while engine.busy:
        if steps == 8:
            before, t_sinks = dict(engine.seconds), 0.0
        engine.step()
        t0 = time.perf_counter()
        for f, t in sinks:  # the event loop's share of the step: the service's text sinks
            f(t)
        sinks.clear()
        t_sinks += time.perf_counter() - t0
        steps += 1
    if prof is not None:
        prof.disable()
    timed = max(steps - 8, 1)
    ms = {k: round((v - before[k]) / timed * 1000, 3) for k, v in engine.seconds.items() if k != "prefill"}
    return {"steps_timed": timed, "ms_per_step": {**ms, "stream_text": round(t_sinks / timed * 1000, 3)},
            "host_ms_per_step": round(sum(v for k, v in ms.items() if k != "forward") + t_sinks / timed * 1000, 3)}


if __name__ == "__main__":
    main()

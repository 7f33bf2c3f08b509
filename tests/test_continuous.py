"""generate/continuous.py: rows that join and leave a running batch get the answers they would get alone, each
with its own decoding settings; and through `prodesc serve`, concurrent streams share the batch."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prodesc.generate import Generator, Row  # noqa: E402
from test_serve import KEY, make_tiny_run, one_torch_thread, start_server, stop_server  # noqa: E402

TITLES = ["Red Mug 1", "A much longer title: Black Tutu 99 for dancers", "Blue Lamp 2", "zzz qq", "Green Chair 3",
          "Stainless Steel Water Bottle 1L", "Mog's Kittens"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """The tiny run's random base in float32: long, EOS-free answers that exercise joins, leaves and shifts."""
    run = make_tiny_run(tmp_path_factory.getbasetemp() / "serve")
    return Generator.base_of_run(run)


def run_engine(gen: Generator, rows: list[Row], join_every: int, slots: int, cache_len: int) -> dict[int, tuple]:
    """Feed the rows one every `join_every` steps; returns {row index: (reason, tokens)}."""
    ended: dict[int, tuple] = {}
    for i, row in enumerate(rows):
        row.on_end = lambda reason, i=i, row=row: ended.__setitem__(i, (reason, list(row.tokens)))
    engine, added, steps = gen.engine(slots, cache_len), 0, 0
    with one_torch_thread():
        while len(ended) < len(rows):
            if added < len(rows) and steps % join_every == 0:
                engine.add(rows[added])
                added += 1
            if engine.busy:
                engine.step()
            steps += 1
            assert steps < 5000
    return ended


def solo(gen: Generator, title: str, max_new_tokens: int) -> str:
    decoding = gen.cfg.generate.model_copy(update={"max_new_tokens": max_new_tokens, "temperature": 0.0})
    with one_torch_thread():
        return gen.describe([title], decoding)[0]["prediction"]


def test_mixed_settings_in_one_batch_each_get_their_own_answer(base: Generator) -> None:
    """Greedy rows beside sampled ones, each with its own max_new_tokens, joining every 3 steps into 4 slots with a
    cache so short that it shifts: every greedy row equals its solo `describe` answer (float32)."""
    lengths = [24, 40, 17, 33, 40, 9, 28]
    rows = []
    for i, (title, n) in enumerate(zip(TITLES, lengths, strict=True)):
        greedy = i % 2 == 0
        rows.append(Row(base.prompt_ids(title), n, 0.0 if greedy else 1.3, 1.0 if greedy else 0.8))
    longest = max(len(r.prompt) for r in rows) + max(lengths)
    ended = run_engine(base, rows, join_every=3, slots=4, cache_len=longest + 8)
    for i, (title, n) in enumerate(zip(TITLES, lengths, strict=True)):
        reason, tokens = ended[i]
        assert len(tokens) <= n and (reason == "stop" or len(tokens) == n)
        if i % 2 == 0:
            text = base.tok.decode([t for t in tokens if t != base.tok.eos_token_id], skip_special_tokens=True)
            assert text.strip() == solo(base, title, n), f"row {i} ({title!r}) differs from its solo answer"
    sampled = [ended[i][1] for i in (1, 3)]
    greedy_of_same = [solo(base, TITLES[i], lengths[i]) for i in (1, 3)]
    assert any(base.tok.decode(t, skip_special_tokens=True).strip() != g
               for t, g in zip(sampled, greedy_of_same, strict=True))  # temperature 1.3 did sample


@pytest.mark.parametrize(("size", "penalty", "boost_after", "bias"),
                         [(3, 1.3, 4, 0.0), (1, 1.0, 0, 0.0), (4, 1.5, 0, -2.0), (0, 1.1, 2, -3.0), (2, 1.0, 3, 1.5)])
def test_batched_processors_give_every_row_the_scores_of_its_own_processors(size: int, penalty: float,
                                                                             boost_after: int, bias: float) -> None:
    """Rows join at different steps (different answer lengths), one leaves (the last slot moves into its place);
    on random scores each step, every row's scores equal those of the per-row processors the engine used to call
    (no-repeat n-grams, stop bias and EOS boost on every stop id, repetition penalty; answer only, exempt tokens
    untouched)."""
    import torch
    from transformers import ExponentialDecayLengthPenalty, LogitsProcessorList, SequenceBiasLogitsProcessor

    from prodesc.config import GenerateConfig
    from prodesc.generate.processors import AnswerNoRepeatNGram, AnswerRepetitionPenalty, BatchedAnswerProcessors

    torch.manual_seed(size)
    vocab, stops, exempt = 12, [0, 2], [0, 1, 2]  # a small vocabulary: answers repeat n-grams often
    gen = GenerateConfig(no_repeat_ngram_size=size, repetition_penalty=penalty, stop_boost_after=boost_after,
                         stop_bias=bias)
    batched = BatchedAnswerProcessors(gen, 6, 64, stops, exempt, "cpu")
    rows: list[tuple[list[int], list[int], LogitsProcessorList]] = []  # (prompt, answer, its own processors)
    for step in range(40):
        if step % 4 == 0 and len(rows) < 6:
            prompt = torch.randint(0, vocab, (3 + step % 5,)).tolist()
            own = LogitsProcessorList()
            if size:
                own.append(AnswerNoRepeatNGram(size, len(prompt), exempt))
            if bias:  # the order of transformers' generate: sequence bias, then the length penalty
                own.append(SequenceBiasLogitsProcessor([[[i], bias] for i in stops]))
            if boost_after:
                own.append(ExponentialDecayLengthPenalty((boost_after, 1.05), stops, len(prompt)))
            if penalty != 1.0:
                own.append(AnswerRepetitionPenalty(penalty, len(prompt), exempt))
            batched.join(len(rows), 1)
            rows.append((prompt, [], own))
        if step == 25:  # the row in slot 1 leaves: the last one takes its slot
            batched.move(len(rows) - 1, 1)
            rows[1] = rows.pop()
        scores = torch.randn(len(rows), vocab) * 3
        got = batched.apply(0, scores.clone(), max(len(answer) for _, answer, _ in rows))
        for i, (prompt, answer, own) in enumerate(rows):
            want = own(torch.tensor([prompt + answer]), scores[i:i + 1].clone())
            assert torch.equal(got[i:i + 1], want), f"step {step}, row {i}"
        picked = torch.randint(0, 5, (len(rows),))  # tokens 0-4: repeats, and exempt ones among them
        batched.record(0, picked)
        for (_, answer, _), token in zip(rows, picked.tolist(), strict=True):
            answer.append(token)


def test_rows_with_answer_processors_get_their_solo_answers(base: Generator) -> None:
    """The smollm2 preset's processors (n-grams, repetition penalty, EOS boost, stop bias) in the engine, batched
    over rows that join at different steps: every greedy row equals its solo `describe` answer."""
    import copy

    gen = copy.copy(base)
    gen.cfg = base.cfg.model_copy(update={"generate": base.cfg.generate.model_copy(
        update={"no_repeat_ngram_size": 3, "repetition_penalty": 1.3, "stop_boost_after": 6, "stop_bias": -1.0})})
    rows = [Row(gen.prompt_ids(title), 20, 0.0, 1.0) for title in TITLES[:5]]
    ended = run_engine(gen, rows, join_every=2, slots=3, cache_len=256)
    for i, title in enumerate(TITLES[:5]):
        text = gen.tok.decode([t for t in ended[i][1] if t not in gen.stop_ids], skip_special_tokens=True)
        assert text.strip() == solo(gen, title, 20), f"row {i} ({title!r}) differs from its solo answer"


def test_an_unwanted_row_stops_within_a_token_and_frees_its_slot(base: Generator) -> None:
    gone = threading.Event()
    leaver = Row(base.prompt_ids("Red Mug 1"), 200, 0.0, 1.0, wanted=lambda: not gone.is_set())
    stayer = Row(base.prompt_ids("Blue Lamp 2"), 30, 0.0, 1.0)
    leaver.on_token = lambda _: gone.set() if len(leaver.tokens) == 5 else None
    ended = run_engine(base, [leaver, stayer], join_every=1, slots=1, cache_len=512)
    assert ended[0] == ("cancelled", ended[0][1]) and len(ended[0][1]) == 5
    assert ended[1][0] in ("stop", "length")  # it waited for the one slot, then got it
    assert base.tok.decode(ended[1][1], skip_special_tokens=True).strip() == solo(base, "Blue Lamp 2", 30)


def greedy_tokens(gen: Generator, prompt: list[int], n: int) -> list[int]:
    """The row's answer alone: n greedy tokens of plain transformers `generate`, never stopping early."""
    import torch

    with one_torch_thread():
        out = gen.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=gen.tok.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("admit_wait_s", [0.0, 60.0])
def test_rows_ending_at_different_steps_get_exactly_their_solo_tokens(base: Generator, admit_wait_s: float) -> None:
    """Rows end at different steps (stop ids met at different positions, their own max_new_tokens, one of 1, one
    cancelled at its 7th token) while others join, one a step, into 3 slots of a cache short enough to shift: each
    row's tokens, and the tokens it streamed, are exactly its solo answer cut where it ends, never one more (the
    step in flight chose a token past every end). admit_wait_s=60: newcomers are held until they fill the slots."""
    from prodesc.generate.continuous import Engine

    lengths = [30, 40, 19, 1, 33, 21, 26]
    prompts = [base.prompt_ids(title) for title in TITLES]
    alone = [greedy_tokens(base, p, 40) for p in prompts]
    stops = {alone[0][20], alone[5][4], alone[6][12]}  # ends rows 0, 5, 6 there at the latest, others maybe too
    want = []
    for tokens, n in zip(alone, lengths, strict=True):
        end = next((i + 1 for i, t in enumerate(tokens[:n]) if t in stops), None)
        want.append(("stop", tokens[:end]) if end else ("length", tokens[:n]))
    stop_ends = {len(tokens) for reason, tokens in want if reason == "stop"}
    assert len(stop_ends) >= 3 and sum(reason == "length" for reason, _ in want) >= 2  # (the random model's)
    gone = threading.Event()
    rows = [Row(p, n, 0.0, 1.0) for p, n in zip(prompts, lengths, strict=True)]
    rows[4].wanted = lambda: not gone.is_set()
    assert len(want[4][1]) > 7
    want[4] = ("cancelled", alone[4][:7])
    streamed: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    for i, row in enumerate(rows):
        row.on_token = lambda t, i=i, row=row: (streamed[i].append(t), i == 4 and len(row.tokens) == 7 and gone.set())
    engine = Engine(base.model, base.tok, base.cfg.generate, 3, max(map(len, prompts)) + 44,
                    stop_ids=sorted(stops), admit_wait_s=admit_wait_s)
    ended: dict[int, tuple] = {}
    for i, row in enumerate(rows):
        row.on_end = lambda reason, i=i, row=row: ended.__setitem__(i, (reason, list(row.tokens)))
    with one_torch_thread():
        for steps in range(500):
            if steps < len(rows):
                engine.add(rows[steps])
            if not engine.busy:
                break
            engine.step()
    assert not engine.busy and engine._flight is None
    for i in range(len(rows)):
        assert ended[i] == want[i], f"row {i}"
        assert streamed[i] == [t for t in want[i][1] if t not in stops], f"row {i} streamed"
    assert ended[3] == ("length", alone[3][:1])


def test_a_burst_joins_in_few_prefills_once_it_fills_the_slots_or_ends_or_has_waited(base: Generator) -> None:
    """With a row generating and admit_wait_s set, rows arriving one a step wait (the running row still gets its
    tokens); they join in one prefill when a step passes with no arrival, when the oldest has waited admit_wait_s,
    or at once when they fill the free slots. admit_wait_s=0: each joins at the next step, one prefill each."""
    now = [0.0]

    def engine_with(wait: float):
        engine = base.engine(8, 512, admit_wait_s=wait)
        engine.clock = lambda: now[0]
        engine.add(Row(base.prompt_ids("Red Mug 1"), 400, 0.0, 1.0))
        engine.step()
        return engine

    def row() -> Row:
        return Row(base.prompt_ids("Blue Lamp 2"), 400, 0.0, 1.0)

    with one_torch_thread():
        engine = engine_with(1.0)
        for _ in range(3):  # a burst, one a step
            engine.add(row())
            engine.step()
        assert (engine.prefills, len(engine.rows), len(engine.waiting)) == (1, 1, 3)
        assert len(engine.rows[0].tokens) == 4
        engine.step()  # nobody arrived since the last step: the burst is over
        assert (engine.prefills, engine.prefill_rows, len(engine.rows)) == (2, 4, 4)
        engine.add(row())
        engine.step()
        now[0] += 0.6
        engine.add(row())
        engine.step()
        assert (engine.prefills, len(engine.waiting)) == (2, 2)
        now[0] += 0.5  # the oldest has waited 1.1 s
        engine.add(row())  # three of the four free slots: the slots rule does not apply
        engine.step()
        assert (engine.prefills, engine.prefill_rows, len(engine.rows)) == (3, 7, 7)

        engine = engine_with(1.0)
        for _ in range(7):  # seven arrivals in one step fill the seven free slots: no reason to wait
            engine.add(row())
        engine.step()
        assert (engine.prefills, len(engine.rows)) == (2, 8)

        engine = engine_with(0.0)
        for _ in range(3):
            engine.add(row())
            engine.step()
        assert (engine.prefills, engine.prefill_rows) == (4, 4)


def test_the_engine_launches_the_next_step_before_handing_out_the_tokens_of_the_last(base: Generator) -> None:
    """One step in flight: the forward of step k+1 runs before step k's token is handed out, and the row that ends
    at its 5th token has had a 6th computed, which nobody sees. `on_wait` (where the server hands the previous
    call's tokens to its event loop) comes once a call, after the launch, before the wait for the tokens."""
    row = Row(base.prompt_ids("Red Mug 1"), 5, 0.0, 1.0)
    engine, seen = base.engine(2, 256), []
    forward = engine._forward
    engine._forward = lambda *a, **kw: (seen.append("forward"), forward(*a, **kw))[1]
    engine.on_wait = lambda: seen.append("wait")
    row.on_token = lambda _: seen.append(len(row.tokens))
    engine.add(row)
    with one_torch_thread():
        while engine.busy:
            engine.step()
    # the prefill (token 1) and step 1 (token 2) are launched before token 1 is out; step 5 chose a 6th token
    assert seen == ["forward", "forward", "wait", 1, *[x for k in range(2, 6) for x in ("forward", "wait", k)]]
    assert len(row.tokens) == 5


def test_after_a_failed_prefill_fail_returns_every_row_the_newcomers_included(base: Generator) -> None:
    """An error in a newcomer's prefill (out of memory, say): `fail` hands back the live row, the newcomers taken
    from the queue for that prefill and the rows still waiting, so the server can fail each of their requests."""
    live, joining, queued = (Row(base.prompt_ids(t), 50, 0.0, 1.0) for t in TITLES[:3])
    engine = base.engine(2, 256)
    engine.add(live)
    with one_torch_thread():
        engine.step()
        engine.step()
        engine._forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        engine.add(joining)
        engine.add(queued)  # no slot for it: it stays queued
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.step()
    assert engine.fail() == [live, joining, queued]
    assert not engine.busy


def test_a_row_longer_than_the_cache_is_refused(base: Generator) -> None:
    engine = base.engine(2, 64)
    with pytest.raises(ValueError, match="cache_len"):
        engine.add(Row(base.prompt_ids("Red Mug 1"), 64, 0.0, 1.0))


def test_sixteen_concurrent_streams_take_a_small_multiple_of_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Before continuous batching, streams ran one at a time: 16 took ~15x one. Now they share every step (the
    engine alone: 16 rows 1.9x one row; the rest is HTTP/SSE per token on the 2-core box, client included)."""
    run = make_tiny_run(tmp_path_factory.getbasetemp() / "serve")
    server = start_server(run)
    try:
        body = {"model": f"{run.name}-base", "stream": True, "max_tokens": 64,
                "messages": [{"role": "user", "content": "Red Mug 1"}]}

        def stream(_: int = 0) -> float:
            t0 = time.perf_counter()
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert r.status_code == 200 and lines[-1] == "data: [DONE]"
            return time.perf_counter() - t0

        stream()  # loads the base copy
        one = min(stream() for _ in range(3))
        from concurrent.futures import ThreadPoolExecutor

        steps, rows = server.metric("prodesc_decode_steps_total"), server.metric("prodesc_batch_size_sum")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(stream, range(16)))
        sixteen = time.perf_counter() - t0
        steps = server.metric("prodesc_decode_steps_total") - steps
        rows = server.metric("prodesc_batch_size_sum") - rows
    finally:
        stop_server(server)
    assert rows / steps > 8, f"{rows / steps:.1f} streams per decode step on average"
    # measured 5.4-8.5x on the shared 2-core box (16 client threads in this process parse the events); serial: 16x
    assert sixteen < 10 * one, f"16 streams took {sixteen:.2f} s, one {one:.2f} s"

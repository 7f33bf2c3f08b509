"""generate/speculate.py and the engine's verify steps: drafts looked up in the row's own prompt and answer, all
rows' drafts verified in one forward, and greedy answers token-for-token those of one-token steps (float32)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prodesc.generate import Generator, Row  # noqa: E402
from test_serve import make_tiny_run, one_torch_thread  # noqa: E402

TITLES = ["Red Mug 1", "A much longer title: Black Tutu 99 for dancers", "Blue Lamp 2", "zzz qq", "Green Chair 3",
          "Stainless Steel Water Bottle 1L", "Mog's Kittens"]
# The smollm2 preset's kind of processors, mild enough that the tiny random model still repeats itself (so drafts
# get accepted while the processors act at every verified position); no stop bias, which would keep the test's
# extra stop id from ever being chosen (test_verify_positions_get_the_scores_of_one_token_steps covers it)
PROCESSORS = {"no_repeat_ngram_size": 4, "repetition_penalty": 1.02, "stop_boost_after": 20}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """The tiny run's random base in float32: its greedy answers fall into loops of a few tokens, which the lookup
    finds in the answer itself, so drafts are accepted as well as rejected."""
    run = make_tiny_run(tmp_path_factory.getbasetemp() / "serve")
    return Generator.base_of_run(run)


def test_propose_drafts_what_followed_the_longest_earlier_match() -> None:
    import torch

    from prodesc.generate.speculate import propose

    junk = [1, 6, 7, 1, 6, 7]  # past each row's end: never matched, never drafted
    seq = torch.tensor([
        [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 1, 6, 7, *junk],  # "1 6 7" at 5 beats "6 7" at 1: 3 4 2 1
        [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, *junk],  # nothing repeats: no draft
        [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 1, 6, 7, *junk],  # allowed 2 drafts
        [7, 8, 7, *[0] * 11, *junk],  # "7" at 0: what follows runs to the end of the sequence (end = 2): 8 7
    ])
    end = torch.tensor([13, 13, 13, 2])
    drafts, count = propose(seq, end, torch.tensor([4, 4, 2, 4]), k=4)
    assert count.tolist() == [4, 0, 2, 2]
    assert drafts[0].tolist() == [3, 4, 2, 1]
    assert drafts[2, :2].tolist() == [3, 4] and drafts[3, :2].tolist() == [8, 7]


def test_accept_keeps_the_agreeing_drafts_and_the_models_next_token() -> None:
    import torch

    from prodesc.generate.speculate import accept

    fed = torch.tensor([[9, 1, 2, 3], [9, 1, 2, 3], [9, 1, 2, 3], [9, 1, 2, 3]])
    picked = torch.tensor([[1, 2, 3, 4], [1, 5, 3, 4], [7, 2, 3, 4], [1, 2, 3, 4]])
    # all three drafts agree: 3 + the model's 4th; the second disagrees: 1 + the model's 5; none; only 1 drafted
    assert accept(picked, fed, torch.tensor([3, 3, 3, 1])).tolist() == [4, 2, 1, 2]


def test_verify_positions_get_the_scores_of_one_token_steps() -> None:
    """Each position of a verify step gets the scores the batched processors give after the drafts before it were
    recorded one at a time (n-grams, stop bias, EOS boost, repetition penalty), on random scores and answers."""
    import torch

    from prodesc.config import GenerateConfig
    from prodesc.generate.processors import BatchedAnswerProcessors

    torch.manual_seed(0)
    vocab, stops, exempt, w = 12, [0, 2], [0, 1, 2], 4
    gen = GenerateConfig(no_repeat_ngram_size=2, repetition_penalty=1.4, stop_boost_after=3, stop_bias=-2.0)
    verify, step = (BatchedAnswerProcessors(gen, 3, 64, stops, exempt, "cpu") for _ in range(2))
    for procs in (verify, step):
        procs.join(0, 3)
    for length in (2, 5, 9):  # answers of different lengths so far
        history = torch.randint(0, 5, (3, length))
        for procs in (verify, step):
            procs.join(0, 3)
            for j in range(length):
                procs.record(0, history[:, j])
        drafts = torch.randint(0, 5, (3, w - 1))
        scores = torch.randn(3, w, vocab) * 3
        got = verify.apply_verify(0, scores.clone(), drafts, longest=length)
        for j in range(w):
            want = step.apply(0, scores[:, j].clone(), longest=length + j)
            assert torch.equal(got[:, j], want), f"answers of {length}, position {j}"
            if j < w - 1:
                step.record(0, drafts[:, j])


def _run(gen: Generator, k: int, prompts: list[list[int]], lengths: list[int], stops: set[int], greedy: list[bool],
         cancel: tuple[int, int], slots: int = 3) -> tuple[dict, dict, object, list]:
    """The prompts as rows, one joining per step into `slots` slots; row cancel[0] unwanted after cancel[1] tokens.
    Returns ({row: (reason, tokens)}, {row: streamed tokens}, the engine, and per step and row that got tokens:
    (row, tokens before, tokens handed out, tokens the step kept, reason if it ended there or "live"))."""
    from prodesc.generate.continuous import Engine

    decoding = gen.cfg.generate.model_copy(update={"speculate_tokens": k})
    engine = Engine(gen.model, gen.tok, decoding, slots, 320, stop_ids=sorted(stops), speculate="always")
    gone = threading.Event()
    rows = [Row(p, n, 0.0 if g else 1.2, 1.0 if g else 0.9) for p, n, g in zip(prompts, lengths, greedy, strict=True)]
    ended, streamed, handed = {}, {i: [] for i in range(len(rows))}, []
    for i, row in enumerate(rows):
        row.on_end = lambda reason, i=i, row=row: ended.__setitem__(i, (reason, list(row.tokens)))
        row.on_token = lambda t, i=i, row=row: (streamed[i].append(t),
                                                i == cancel[0] and len(row.tokens) == cancel[1] and gone.set())
    rows[cancel[0]].wanted = lambda: not gone.is_set()
    emit = engine._emit

    def watched(launched: list, table: list) -> int:
        before = [len(r.tokens) for r in launched]
        count = emit(launched, table)
        for r, line, n in zip(launched, table, before, strict=True):
            if len(r.tokens) > n:
                i = rows.index(r)
                handed.append((i, n, len(r.tokens) - n, line[-2], ended[i][0] if i in ended else "live"))
        return count

    engine._emit = watched
    with one_torch_thread():
        for steps in range(1000):
            if steps < len(rows):
                engine.add(rows[steps])
            if not engine.busy:
                break
            engine.step()
    assert not engine.busy
    return ended, streamed, engine, handed


@pytest.mark.parametrize("processors", [{}, PROCESSORS], ids=["plain", "processors"])
def test_speculating_rows_get_exactly_the_tokens_of_one_token_steps(base: Generator, processors: dict) -> None:
    """Rows join one a step into 3 slots while others verify drafts every step; they end at stop ids and at their
    max_new_tokens inside a verify step's kept tokens, one is cancelled inside them, one samples: every greedy row's
    tokens (and what it streamed) equal those of one-token steps, drafts are accepted, the sampled row drafts
    nothing."""
    import copy

    gen = copy.copy(base)
    gen.cfg = base.cfg.model_copy(update={"generate": base.cfg.generate.model_copy(update=processors)})
    lengths, greedy, never = [30, 40, 19, 1, 45, 21, 26], [True, True, True, True, True, False, True], (4, 10**6)
    eos = {gen.tok.eos_token_id}
    # each prompt holds its row's first 12 greedy tokens (where the random model has started repeating itself), so
    # drafts come from the prompt as well as from the answer
    prompts = [gen.prompt_ids(t) for t in TITLES]
    first, _, _, _ = _run(gen, 0, prompts, [12] * len(TITLES), eos, [True] * len(TITLES), never)
    prompts = [p + first[i][1] for i, p in enumerate(prompts)]
    plain, _, _, _ = _run(gen, 0, prompts, lengths, eos, greedy, never)
    answers = {i: tokens for i, (_, tokens) in plain.items()}
    _, _, _, handed = _run(gen, 4, prompts, lengths, eos, greedy, never)
    # a stop id that ends a row inside a step's kept tokens: the 2nd token of a step that kept 3 or more, met nowhere
    # earlier in that answer (stop ids are exempt from the processors, so the answers may change: tried in turn)
    for stop_row, stop in [(i, answers[i][n + 1]) for i, n, got, _, _ in handed if i not in (4, 5) and got >= 3
                           and answers[i][n + 1] not in answers[i][:n + 1]][:8]:
        stops = eos | {stop}
        _, _, _, handed = _run(gen, 4, prompts, lengths, stops, greedy, never)
        if any(i == stop_row and got < kept and why == "stop" for i, _, got, kept, why in handed):
            break
    runs = [(i, n, got) for i, n, got, _, why in handed if got >= 2 and why == "live"]  # steps that kept drafts
    # row 4 is cancelled one token into such a step; another row's max_new_tokens ends it at the 2nd token of one
    # (drafts never run past max_new_tokens)
    cancel_at = next(n + 1 for i, n, _ in runs if i == 4)
    short, n, _ = next((i, n, got) for i, n, got in runs if i not in (4, 5, stop_row))
    lengths[short] = n + 2
    want, want_streamed, _, _ = _run(gen, 0, prompts, lengths, stops, greedy, (4, cancel_at))
    ended, streamed, engine, handed = _run(gen, 4, prompts, lengths, stops, greedy, (4, cancel_at))
    for i in range(len(lengths)):
        if greedy[i]:
            assert ended[i] == want[i], f"row {i}"
            assert streamed[i] == want_streamed[i], f"row {i} streamed"
    assert ended[4] == ("cancelled", want[4][1]) and len(ended[4][1]) == cancel_at
    cut = {(i, reason) for i, _, got, kept, reason in handed if got < kept}
    assert {(4, "live"), (stop_row, "stop")} <= cut, cut  # (row 4 leaves at the next step)
    assert (short, 2, "length") in {(i, got, reason) for i, _, got, _, reason in handed}
    assert engine.accepted > 0
    assert engine.drafted > engine.accepted or processors  # (with the processors' answers every draft agreed)
    assert not rows_drafted(handed, [i for i, g in enumerate(greedy) if not g])


def rows_drafted(handed: list, rows: list[int]) -> bool:
    """Whether any of `rows` got more than one token from one step (kept a draft)."""
    return any(kept > 1 for i, _, _, kept, _ in handed if i in rows)


def test_describe_with_speculation_gives_the_plain_answers_and_counts_the_drafts(base: Generator) -> None:
    """`generate.speculate_tokens` routes describe through the engine: the same predictions as the one-token path
    (transformers' generate), the drafts counted for generate's closing line."""
    from prodesc.generate.generator import speculation_line

    plain = base.cfg.generate.model_copy(update={"max_new_tokens": 30, "batch_size": 3})
    with one_torch_thread():
        want = base.describe(TITLES, plain)
        got = base.describe(TITLES, plain.model_copy(update={"speculate_tokens": 3}))
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    assert [r["n_tokens"] for r in got] == [r["n_tokens"] for r in want]
    counts = base.speculation
    assert counts["accepted"] > 0 and counts["drafted"] >= counts["accepted"]
    assert "accepted (" in speculation_line(counts) and speculation_line({"verify_rows": 0}) == ""


def test_the_engine_verifies_only_while_drafts_pay_for_it_and_probes_otherwise(base: Generator) -> None:
    """A verify step runs while 1 + the drafts kept per row and step cover its cost over a one-token step; below,
    one-token steps, with a verify step every 8th, then every 16th, 32nd... while drafts keep failing."""
    from prodesc.generate.continuous import Engine

    engine = Engine(base.model, base.tok, base.cfg.generate.model_copy(update={"speculate_tokens": 4}), 4, 256)
    engine.rows = [Row([1, 2], 10, 0.0, 1.0)]
    engine._cost = {(1, 1): 0.010, (1, 5): 0.013}  # a verify step costs 1.3 one-token steps
    engine._gain = 0.4
    assert all(engine._verifying(1) for _ in range(5))
    engine._gain = 0.2
    kinds = [engine._verifying(1) for _ in range(8 + 16 + 32)]
    assert [i for i, v in enumerate(kinds) if v] == [7, 7 + 16, 7 + 16 + 32]
    engine.rows = [Row([1, 2], 10, 0.8, 1.0)]  # sampled rows draft nothing: never a verify step
    engine._gain = 3.0
    assert not engine._verifying(1)


def test_warm_up_prepares_the_engine_without_changing_answers(base: Generator) -> None:
    """warm_up before any request (on CPU: the cache allocated, no graphs) leaves the answers as they were."""
    engine = base.engine(2, 256, gen=base.cfg.generate.model_copy(update={"speculate_tokens": 2}))
    with one_torch_thread():
        engine.warm_up()
        assert engine._kv and not engine.busy
        row = Row(base.prompt_ids(TITLES[0]), 20, 0.0, 1.0)
        engine.add(row)
        while engine.busy:
            engine.step()
        alone = base.describe([TITLES[0]], base.cfg.generate.model_copy(update={"max_new_tokens": 20}))[0]
    assert base.tok.decode(row.tokens, skip_special_tokens=True).strip() == alone["prediction"]


def test_the_server_warms_its_engine_up_and_counts_drafts_in_metrics(base: Generator) -> None:
    """`prodesc serve` with speculation: the engine is warmed up at the app's start-up (before any request), a
    request's answer equals describe's, and /metrics counts drafted and accepted tokens."""
    import asyncio
    import copy

    import httpx

    from prodesc.config import ServeConfig
    from prodesc.serve.app import create_app

    gen = copy.copy(base)
    gen.cfg = base.cfg.model_copy(update={"generate": base.cfg.generate.model_copy(
        update={"speculate_tokens": 3, "max_new_tokens": 30})})
    with one_torch_thread():
        app = create_app(gen, ServeConfig(batch_window_ms=0, cache_len=512))
        assert not app.state.prodesc.batcher.engines[True]._kv  # nothing allocated before start-up

        async def main() -> tuple[httpx.Response, str]:
            transport = httpx.ASGITransport(app=app)
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
                assert app.state.prodesc.batcher.engines[True]._kv  # allocated by warm_up, before any request
                try:
                    answer = await http.post("/v1/describe", json={"titles": TITLES[:3]})
                    return answer, (await http.get("/metrics")).text
                finally:
                    await app.state.prodesc.batcher.close()

        answer, metrics = asyncio.run(main())
        want = base.describe(TITLES[:3], base.cfg.generate.model_copy(update={"max_new_tokens": 30}))
    assert answer.status_code == 200
    assert [r["description"] for r in answer.json()["descriptions"]] == [r["prediction"] for r in want]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("prodesc_draft_tokens_total", "prodesc_accepted_tokens_total"))}
    assert values["prodesc_draft_tokens_total"] >= values["prodesc_accepted_tokens_total"] > 0

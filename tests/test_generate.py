import json

import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.config import GenerateConfig
from prodesc.errors import ProdescError
from prodesc.generate import Generator
from prodesc.generate.generator import generate_cli


@pytest.fixture(scope="module")
def gen(tiny_run):
    return Generator.from_run(tiny_run, merge=False)


def test_batched_generation_equals_one_at_a_time(gen):
    titles = ["Girls Ballet Tutu Neon Pink", "Mog's Kittens", "A much longer title about a kitchen spice rack"]
    cfg = GenerateConfig(max_new_tokens=12, batch_size=3)
    batched = [r["prediction"] for r in gen.describe(titles, cfg)]
    single = [gen.describe([t], GenerateConfig(max_new_tokens=12, batch_size=1))[0]["prediction"] for t in titles]
    assert batched == single  # left padding + attention mask: padding never changes a greedy answer


def test_records_have_the_documented_fields(gen):
    rec = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=5))[0]
    assert set(rec) == {"title", "prediction", "n_tokens", "stopped_by_eos", "latency_ms"}
    assert 1 <= rec["n_tokens"] <= 5 and isinstance(rec["stopped_by_eos"], bool)


def test_base_answers_differ_from_finetuned(gen):
    cfg = GenerateConfig(max_new_tokens=10)
    tuned = gen.describe(["Mog's Kittens"], cfg)[0]["prediction"]
    assert tuned != gen.describe(["Mog's Kittens"], cfg, adapter=False)[0]["prediction"]
    assert tuned == gen.describe(["Mog's Kittens"], cfg)[0]["prediction"]  # the switch is undone afterwards


def test_repetition_penalty_spares_special_tokens_and_prompt(gen):
    import torch

    from prodesc.generate.processors import AnswerRepetitionPenalty

    proc = AnswerRepetitionPenalty(2.0, prompt_width=3, exempt_ids=[4])
    ids = torch.tensor([[4, 5, 6, 4, 7]])
    scores = torch.ones(1, 10)
    out = proc(ids, scores)
    assert out[0, 4] == 1 and out[0, 5] == 1 and out[0, 6] == 1  # special (4) and prompt-only (5, 6) untouched
    assert out[0, 7] == 0.5


def test_cli_generate_file_to_jsonl_with_references(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "p.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "--run",
            str(tiny_run),
            "--data",
            str(tiny_data),
            "--split",
            "test",
            "--limit",
            "4",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4 and all(r["reference"] and r["prediction"] is not None for r in recs)


def test_cli_titles_print_to_terminal(tiny_run):
    res = CliRunner().invoke(app, ["generate", "--run", str(tiny_run), "--max-new-tokens", "4", "Mog's Kittens"])
    assert res.exit_code == 0 and "# Mog's Kittens" in res.output


def test_run_and_model_together_are_refused(tiny_run):
    with pytest.raises(ProdescError, match="exactly one of --run"):
        generate_cli(["x"], tiny_run, "embedded:smollm2-135m", None, None, None, "test", None, None, None, [])


def test_no_titles_is_refused(tiny_run):
    with pytest.raises(ProdescError, match="exactly one way"):
        generate_cli([], tiny_run, None, None, None, None, "test", None, None, None, [])


def test_bad_jsonl_input_names_file_and_line(tiny_run, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"title": "a"}\nnot json\n')
    with pytest.raises(ProdescError, match=r"t.jsonl:2"):
        generate_cli([], tiny_run, None, None, f, None, "test", None, None, None, [])


def test_stop_boost_ends_runaway_answers(gen):
    free = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=200))[0]
    boosted = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=200, stop_boost_after=20))[0]
    assert not free["stopped_by_eos"] and free["n_tokens"] == 200  # the tiny model never stops by itself
    assert boosted["stopped_by_eos"] and boosted["n_tokens"] < 200


# ------------------------------------------------------------------------------------------ stop ids, n-grams


def test_generation_stops_on_every_stop_id_of_the_generation_config(gen):
    from prodesc import models

    first = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=6))[0]
    assert not first["stopped_by_eos"]  # the tiny model runs on; make its first greedy token a stop id
    token = gen.tok(first["prediction"], add_special_tokens=False)["input_ids"][0]
    config = gen.model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = [*models.stop_ids(gen.tok, gen.model), token]
        other = Generator(gen.model, gen.tok, gen.cfg, "x")
        assert token in other.stop_ids and gen.tok.eos_token_id in other.stop_ids
        rec = other.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=6))[0]
    finally:
        config.eos_token_id = saved
    assert rec["stopped_by_eos"] and rec["n_tokens"] == 1 and rec["prediction"] == ""


def test_stop_ids_hold_the_configured_ids_the_eos_and_the_end_of_turn(gen):
    from prodesc import models, prompts

    ids = models.stop_ids(gen.tok, gen.model)
    assert gen.tok.eos_token_id in ids and prompts.end_of_turn_id(gen.tok) in ids
    assert isinstance(gen.model.generation_config.eos_token_id, list)  # fix_pad no longer keeps one id


def _reference_bans(answer: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of `answer`, counted from scratch."""
    grams = {tuple(answer[i : i + n]) for i in range(len(answer) - n + 1)}
    return {g[-1] for g in grams if list(g[:-1]) == answer[len(answer) - n + 1 :]}


def test_no_repeat_ngrams_count_the_answer_only_so_a_neighbour_can_be_copied():
    import torch

    from prodesc.generate.processors import AnswerNoRepeatNGram

    prompt = [5, 6, 7, 8, 1, 2]  # a neighbour's phrase "5 6 7" sits in the prompt
    proc = AnswerNoRepeatNGram(3, prompt_width=len(prompt), exempt_ids=[0])
    answer = [5, 6, 7, 9, 5, 6]  # copying "5 6 7" once is allowed; a second "5 6 7" in the answer is not
    for step in range(1, len(answer) + 1):
        seq = torch.tensor([prompt + answer[:step]])
        scores = proc(seq, torch.zeros(1, 12))
        banned = {i for i in range(12) if scores[0, i] == -float("inf")}
        assert banned == _reference_bans(answer[:step], 3), step  # kept step by step = recounted each step
    assert banned == {7}
    first = AnswerNoRepeatNGram(3, prompt_width=len(prompt), exempt_ids=[0])
    scores = first(torch.tensor([prompt + [5, 6]]), torch.zeros(1, 12))
    assert not torch.isinf(scores).any()  # "5 6" -> 7 repeats the prompt, not the answer: free


def test_no_repeat_ngrams_never_ban_special_tokens():
    import torch

    from prodesc.generate.processors import AnswerNoRepeatNGram

    proc = AnswerNoRepeatNGram(2, prompt_width=1, exempt_ids=[3])
    scores = proc(torch.tensor([[9, 4, 3, 4]]), torch.zeros(1, 6))
    assert scores[0, 3] == 0  # "4 3" was seen, but 3 is special (an end of turn): never forbidden


def test_no_repeat_ngram_setting_reaches_generation(gen):
    cfg = GenerateConfig(max_new_tokens=40, no_repeat_ngram_size=2)
    out = gen.describe(["Mog's Kittens"], cfg)[0]
    ids = gen.tok(out["prediction"], add_special_tokens=False)["input_ids"]
    pairs = list(zip(ids, ids[1:], strict=False))
    assert len(pairs) > 10 and len(set(pairs)) == len(pairs)  # the tiny model loops without it


# ------------------------------------------------------------------------------------------ catalog neighbours


@pytest.fixture(scope="module")
def rag_gen(tiny_rag_run):
    return Generator.from_run(tiny_rag_run, merge=False)


def test_records_list_the_neighbours_in_the_prompt(rag_gen, tiny_rag_data):
    from prodesc.records import read_split

    train = {r["uid"]: r for r in read_split(tiny_rag_data, "train")}
    test = read_split(tiny_rag_data, "test")[:3]
    recs = rag_gen.describe([r["title"] for r in test], GenerateConfig(max_new_tokens=4))
    for rec, item in zip(recs, test, strict=True):
        assert len(rec["neighbours"]) == 2 and set(rec["neighbours"][0]) == {"uid", "title", "score"}
        assert all(n["uid"] in train and train[n["uid"]]["title"] == n["title"] for n in rec["neighbours"])
        assert rec["neighbours"][0]["score"] >= rec["neighbours"][1]["score"]
        prompt = rag_gen.tok.decode(rag_gen.prompt_ids(item["title"]))
        assert f"[1] {rec['neighbours'][0]['title']}" in prompt and f"Title: {item['title']}" in prompt


def test_titles_of_an_indexed_data_dir_need_no_embedder(tiny_rag_run, tiny_rag_data, tmp_path, monkeypatch):
    from prodesc import embedder

    def refuse(*a, **kw):
        raise AssertionError("the embedder was loaded")

    monkeypatch.setattr(embedder, "load_embedder", refuse)
    out = tmp_path / "p.jsonl"
    generate_cli([], tiny_rag_run, None, None, None, tiny_rag_data, "test", 3, out, None, ["generate.max_new_tokens=3"])
    assert all(len(json.loads(line)["neighbours"]) == 2 for line in out.read_text().splitlines())


def test_free_text_title_is_embedded_and_gets_neighbours(rag_gen):
    rec = rag_gen.describe(["A brand new product nobody indexed"], GenerateConfig(max_new_tokens=3))[0]
    assert len(rec["neighbours"]) == 2


def test_run_without_its_catalog_fails_before_weights_load(tiny_rag_run, tmp_path, monkeypatch):
    import shutil

    from prodesc import models

    run = tmp_path / "run"
    shutil.copytree(tiny_rag_run, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    shutil.rmtree(run / "catalog")
    monkeypatch.setattr(models, "load", lambda *a, **kw: pytest.fail("weights loaded"))
    with pytest.raises(ProdescError, match=r"retrieval.k=2 but run has no catalog index"):
        Generator.from_run(run)


def test_neighbours_asked_of_a_run_without_catalog_are_refused(tiny_run):
    with pytest.raises(ProdescError, match="no catalog index"):
        Generator.from_run(tiny_run, ["retrieval.k=2"])


def test_cli_base_flag_runs_the_base_model_with_the_same_prompts(tiny_rag_run):
    tuned = generate_cli(["Mog's Kittens"], tiny_rag_run, None, None, None, None, "test", None, None, None,
                         ["generate.max_new_tokens=6"])[0]  # fmt: skip
    base = generate_cli(["Mog's Kittens"], tiny_rag_run, None, None, None, None, "test", None, None, None,
                        ["generate.max_new_tokens=6"], base=True)[0]  # fmt: skip
    assert base["neighbours"] == tuned["neighbours"] and base["prediction"] != tuned["prediction"]

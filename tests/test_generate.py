import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from prodesc import config, rundir
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
    assert set(rec) == {"title", "prediction", "n_tokens", "stopped_by_eos", "latency_ms", "unsupported"}
    assert isinstance(rec["unsupported"], list)
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


def test_stop_bias_moves_where_answers_end(gen):
    def n(**kw):
        return gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=200, **kw))[0]

    assert n(stop_bias=20.0)["n_tokens"] == 1  # the end token wins at once
    boosted, held = n(stop_boost_after=20), n(stop_boost_after=20, stop_bias=-20.0)
    assert held["stopped_by_eos"] and held["n_tokens"] > boosted["n_tokens"]  # EOS calibrated down: longer


def _titles(tmp_path, n: int):
    f = tmp_path / "titles.txt"
    f.write_text("".join(f"Product number {i} in Red, {i % 7 + 1} Pack\n" for i in range(n)))
    return f


def _generate(run, titles, out, *more):
    cmd = [sys.executable, "-m", "prodesc.cli", "generate", "--run", str(run), "--input", str(titles),
           "--out", str(out), "--max-new-tokens", "12", "--set", "generate.write_every=8", *more]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # 60-150 s on 2 busy cores: 240 titles generated twice in subprocesses
def test_generate_to_file_resumes_after_kill_without_repeating_or_losing_a_line(tiny_run, tmp_path):
    titles = _titles(tmp_path, 240)
    whole = tmp_path / "whole.jsonl"
    assert _generate(tiny_run, titles, whole).wait(timeout=300) == 0
    out = tmp_path / "out.jsonl"
    proc = _generate(tiny_run, titles, out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 16):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 16 <= written < 240, "the kill should land mid-run"
    with out.open("a") as f:
        f.write('{"title": "Product number')  # a line cut by the kill
    resumed = _generate(tiny_run, titles, out, "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f"{written} predictions already written" in log and "titles/s, ETA" in log
    def lines(path):  # every field but the wall time
        return [{k: v for k, v in json.loads(x).items() if k != "latency_ms"} for x in path.read_text().splitlines()]

    assert lines(out) == lines(whole)


def test_generate_refuses_an_existing_out_without_resume_and_a_foreign_file_untouched(tiny_run, tmp_path):
    titles, out = _titles(tmp_path, 3), tmp_path / "o.jsonl"
    foreign = '{"title": "something else", "prediction": "x"}\n{"title": "cut'
    out.write_text(foreign)
    with pytest.raises(ProdescError, match="already exists: pass --resume"):
        generate_cli([], tiny_run, None, None, titles, None, "test", None, out)
    with pytest.raises(ProdescError, match=r"no o.jsonl.settings.json beside it"):
        generate_cli([], tiny_run, None, None, titles, None, "test", None, out, resume=True)
    assert out.read_text() == foreign  # its unterminated last line used to be cut before the refusal
    generate_cli([], tiny_run, None, None, titles, None, "test", 2, tmp_path / "mine.jsonl",
                 flags={"generate.max_new_tokens": 4})
    out.with_name("o.jsonl.settings.json").write_text((tmp_path / "mine.jsonl.settings.json").read_text())
    with pytest.raises(ProdescError, match="o.jsonl:1 is for 'something else'"):
        generate_cli([], tiny_run, None, None, titles, None, "test", 2, out, flags={"generate.max_new_tokens": 4},
                     resume=True)
    assert out.read_text() == foreign


@pytest.mark.parametrize("change", [{"flags": {"generate.max_new_tokens": 5}}, {"base": True},
                                    {"flags": {"generate.max_new_tokens": 4, "generate.temperature": 0.7}}],
                         ids=["max_new_tokens", "base", "temperature"])
def test_resume_refuses_another_decoding_or_model(tiny_run, tmp_path, change):
    titles, out = _titles(tmp_path, 3), tmp_path / "o.jsonl"
    generate_cli([], tiny_run, None, None, titles, None, "test", 2, out, flags={"generate.max_new_tokens": 4})
    before = out.read_text()
    kw = {"flags": {"generate.max_new_tokens": 4}, **change}
    key = "base" if "base" in change else next(k for k in kw["flags"] if k != "generate.max_new_tokens" or
                                                 kw["flags"][k] != 4)
    with pytest.raises(ProdescError, match=rf"written with other settings \({key}: "):
        generate_cli([], tiny_run, None, None, titles, None, "test", None, out, resume=True, **kw)
    assert out.read_text() == before
    assert generate_cli([], tiny_run, None, None, titles, None, "test", None, out, resume=True,
                        flags={"generate.max_new_tokens": 4}) == 3  # the same settings continue it


def test_stop_ends_the_stopped_rows_after_one_token_and_leaves_the_others(gen):
    titles = ["Mog's Kittens", "Girls Ballet Tutu Neon Pink"]
    cfg = GenerateConfig(max_new_tokens=40, batch_size=2)
    alone = gen.describe(titles[1:], cfg)[0]
    stopped, kept = gen.describe(titles, cfg, stop=lambda i: i == 0)
    assert stopped["n_tokens"] == 1  # asked after every token: the first token is the last
    assert kept["prediction"] == alone["prediction"] and kept["n_tokens"] == alone["n_tokens"] == 40


def test_stop_asked_mid_answer_ends_the_whole_call_within_a_token(gen):
    asked = []

    def stop(i: int) -> bool:
        asked.append(i)
        return len(asked) > 10  # two rows: about five tokens each, then every row stops

    recs = gen.describe(["Mog's Kittens", "Red Mug"], GenerateConfig(max_new_tokens=200, batch_size=2), stop=stop)
    assert all(4 <= r["n_tokens"] <= 7 for r in recs), [r["n_tokens"] for r in recs]


@pytest.mark.timeout(60)
def test_a_temperature_too_small_to_sample_decodes_greedily(gen):
    greedy = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=12))[0]["prediction"]
    tiny = GenerateConfig(max_new_tokens=12, temperature=1e-300)
    assert gen.describe(["Mog's Kittens"], tiny)[0]["prediction"] == greedy  # it used to give NaN probabilities


def test_generate_from_trained_items_is_refused_before_loading(tiny_run, tiny_data, monkeypatch):
    monkeypatch.setattr(Generator, "from_run", lambda *a, **k: pytest.fail("loaded a model before the leak guard"))
    with pytest.raises(ProdescError, match=r"of 3 evaluated items overlap .*--allow-overlap"):
        generate_cli([], tiny_run, None, None, None, tiny_data, "train", 3, None, None, [])


def test_cli_generate_allow_overlap_describes_trained_items(tiny_run, tiny_data):
    args = ["generate", "--run", str(tiny_run), "--data", str(tiny_data), "--split", "train", "--limit", "2"]
    res = CliRunner().invoke(app, [*args, "--max-new-tokens", "4"])
    assert res.exit_code == 1 and "2 of 2 evaluated items overlap" in res.output
    res = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--allow-overlap"])
    assert res.exit_code == 0 and "warning: 2 of 2 evaluated items overlap" in res.output


class _Loaded(Exception):
    """Raised by the stand-in for models.load once it has seen the config it was given."""


@pytest.mark.parametrize("verb", ["generate", "eval", "serve", "export", "train"])
@pytest.mark.parametrize("flag", [False, True])
def test_remote_code_needs_the_flag_whatever_the_runs_config_says(tiny_run, tiny_data, tmp_path, monkeypatch,
                                                                  verb, flag):
    import shutil
    import socket

    import yaml

    from prodesc import models

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.resolved.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True  # a run dir from someone else, asking to run its code
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    seen = []

    def load(model_cfg, *args, **kwargs):
        seen.append(model_cfg.trust_remote_code)
        raise _Loaded

    monkeypatch.setattr(models, "load", load)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "generate": ["generate", "--run", str(run), "A title"],
        "eval": ["eval", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "rep")],
        "serve": ["serve", "--run", str(run), "--port", str(port)],
        "export": ["export", str(run), "--out", str(tmp_path / "exp")],
        "train": ["train", "--data", str(tiny_data), "--out", str(run), "--resume"],
    }[verb]
    res = CliRunner().invoke(app, args + (["--trust-remote-code"] if flag else []))
    assert isinstance(res.exception, _Loaded), res.output
    assert seen == [flag]
    assert ("model.trust_remote_code from the config is ignored" in res.output) != flag


# ------------------------------------------------------------------------------------------ stop ids, n-grams


def test_generation_stops_on_every_stop_id_of_the_generation_config(gen):
    from prodesc import models

    first = gen.describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=6))[0]
    assert not first["stopped_by_eos"]  # the tiny model runs on; make its first greedy token a stop id
    import torch

    prompt = torch.tensor([gen.prompt_ids("Mog's Kittens")])
    with torch.no_grad():  # its first greedy token, as generated (re-tokenizing the text may split it otherwise)
        token = gen.model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False,
                                   pad_token_id=gen.tok.pad_token_id)[0, -1].item()
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
        assert len(rec["neighbours"]) == 2 and set(rec["neighbours"][0]) == {"uid", "title", "score", "text"}
        assert all(n["uid"] in train and train[n["uid"]]["title"] == n["title"] for n in rec["neighbours"])
        assert rec["neighbours"][0]["score"] >= rec["neighbours"][1]["score"]
        prompt = rag_gen.tok.decode(rag_gen.prompt_ids(item["title"]))
        assert f"[1] {rec['neighbours'][0]['title']}" in prompt and f"Title: {item['title']}" in prompt
        assert rec["neighbours"][0]["text"] in prompt  # what the prompt showed of it, as the review flag read it


def test_titles_of_an_indexed_data_dir_need_no_embedder(tiny_rag_run, tiny_rag_data, tmp_path, monkeypatch):
    from prodesc import embedder

    def refuse(*a, **kw):
        raise AssertionError("the embedder was loaded")

    monkeypatch.setattr(embedder, "load_embedder", refuse)
    out = tmp_path / "p.jsonl"
    generate_cli([], tiny_rag_run, None, None, None, tiny_rag_data, "test", 3, out, sets=["generate.max_new_tokens=3"])
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


def test_static_cache_path_gives_the_dynamic_paths_answers(gen):
    """generate.compile=force takes the GPU fast path's plumbing on CPU (static cache, batch padded to a power of
    two, uncompiled): the same greedy answers as the plain path."""
    titles = ["Mog's Kittens", "Girls Ballet Tutu Neon Pink", "Red Mug"]
    plain = gen.describe(titles, GenerateConfig(max_new_tokens=8, batch_size=4, compile="off"))
    static = gen.describe(titles, GenerateConfig(max_new_tokens=8, batch_size=4, compile="force"))
    assert [r["prediction"] for r in static] == [r["prediction"] for r in plain]



def test_neighbours_asked_of_a_run_without_catalog_are_refused(tiny_run):
    with pytest.raises(ProdescError, match="no catalog index"):
        Generator.from_run(tiny_run, config.resolve(rundir.run_config(tiny_run), sets=["retrieval.k=2"]))


def test_cli_base_flag_runs_the_base_model_with_the_same_prompts(tiny_rag_run, tmp_path):
    titles, tuned, base = tmp_path / "t.txt", tmp_path / "tuned.jsonl", tmp_path / "base.jsonl"
    titles.write_text("Mog's Kittens\n")
    sets = ["generate.max_new_tokens=6"]
    generate_cli([], tiny_rag_run, None, None, titles, None, "test", None, tuned, sets=sets)
    generate_cli([], tiny_rag_run, None, None, titles, None, "test", None, base, sets=sets, base=True)
    tuned, base = (json.loads(p.read_text()) for p in (tuned, base))
    assert base["neighbours"] == tuned["neighbours"] and base["prediction"] != tuned["prediction"]


def test_grounded_decoding_writes_a_digit_word_only_as_the_prompt_does(gen):
    import torch

    from prodesc import specs
    from prodesc.generate.processors import GroundedSpecifics

    tok = gen.tok
    digit = next(i for i in range(len(tok)) if tok.decode([i]).strip().isdigit() and tok.decode([i]).strip() != "7")
    word = next(i for i in range(len(tok)) if tok.decode([i]).strip().isalpha())
    proc = GroundedSpecifics(tok, [specs.Grounding(["Mug 7"])], prompt_width=1, exempt_ids=gen.exempt)
    scores = torch.zeros(1, len(tok))
    scores[0, digit], scores[0, word] = 5.0, 4.0  # the model's first choice writes a number the prompt lacks
    out = proc(torch.tensor([[0]]), scores.clone())
    assert out[0, digit] == -float("inf") and int(out.argmax()) == word
    free = GroundedSpecifics(tok, [specs.Grounding([f"Mug {tok.decode([digit]).strip()}"])], 1, gen.exempt)
    assert int(free(torch.tensor([[0]]), scores.clone()).argmax()) == digit  # stated in the prompt: allowed


@pytest.mark.parametrize("limit", ["0", "-1"])
@pytest.mark.parametrize("source", ["titles", "input", "data", "eval"])
def test_limit_below_one_is_refused_the_same_way_for_every_input(tiny_run, tiny_data, tmp_path, source, limit):
    """--limit 0 used to mean "all" for --data, "nothing" for titles and --input; -1 "all but the last" or a
    traceback."""
    from typer.testing import CliRunner

    from prodesc.cli import app

    where = {"titles": ["Red Mug", "Blue Lamp"], "input": ["--input", str(_titles(tmp_path, 3))],
             "data": ["--data", str(tiny_data), "--allow-overlap"]}
    args = (["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--out", str(tmp_path / "r")]
            if source == "eval" else ["generate", "--run", str(tiny_run), *where[source]])
    res = CliRunner().invoke(app, [*args, "--limit", limit])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert ("eval.limit: Input should be greater than or equal to 1" if source == "eval"
            else f"--limit {limit}: pass a number of items >= 1") in res.output


@pytest.mark.parametrize("how", ["input", "title", "jsonl"])
def test_a_title_over_the_cap_is_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch, how):
    """One 1 MB title in `generate --input` used to load the model and die allocating 490 GB."""
    from prodesc.generate import generator

    monkeypatch.setattr(generator.Generator, "from_run", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    huge = "Mug " * 250_000
    f = tmp_path / ("t.jsonl" if how == "jsonl" else "t.txt")
    f.write_text(json.dumps({"title": huge}) + "\n" if how == "jsonl" else f"Red Mug\n{huge}\n")
    args = ([huge], None) if how == "title" else ([], f)
    with pytest.raises(ProdescError, match=r"a title of [0-9,]{7,} characters, over data.max_title_chars=1000"):
        generate_cli(args[0], tiny_run, None, None, args[1], None, "test", None, None)


def test_train_and_eval_refuse_data_holding_a_title_over_the_cap(tiny_data, tiny_run, tmp_path):
    """Data prepared before the cap: every verb reading it refuses it, before any model loads."""
    import shutil

    import pyarrow.parquet as pq

    from fixtures_tiny import tiny_config
    from prodesc.records import read_split
    from prodesc.train import recipe as train

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("encoded"))
    for split in ("train", "test"):
        table = pq.read_table(data / f"{split}.parquet")
        titles = table.column("title").to_pylist()
        titles[1] = "x" * 5000
        pq.write_table(table.set_column(table.column_names.index("title"), "title", [titles]), data /
                       f"{split}.parquet")
    with pytest.raises(ProdescError, match=r"train.parquet: row 2 has a title of 5,000 characters"):
        train.train(tiny_config(), data, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ProdescError, match=r"test.parquet: row 2 .* prepare the data again"):
        read_split(data, "test")  # eval and generate --data read splits through it


def test_a_qlora_run_is_served_unmerged_as_generate_and_eval_run_it(tiny_run, monkeypatch, capsys):
    """`serve --run` merges (merge=True); into nf4 weights that rounds the LoRA update away, so the served model
    was not the evaluated one. An nf4 base (flagged here on the tiny base: nf4 needs CUDA) keeps its adapter."""
    from peft import PeftModel

    from prodesc.generate import Generator, generator

    real = generator._run_base

    def nf4_base(run, cfg):
        model = real(run, cfg)
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(generator, "_run_base", nf4_base)
    served = Generator.from_run(tiny_run, merge=True)
    assert isinstance(served.model, PeftModel)  # not merged into the (would-be) nf4 weights
    assert "serves its adapter unmerged" in capsys.readouterr().err
    monkeypatch.setattr(generator, "_run_base", real)
    cfg = GenerateConfig(max_new_tokens=12)
    evaluated = Generator.from_run(tiny_run, merge=False)
    assert served.describe(["Mog's Kittens"], cfg)[0]["prediction"] == \
        evaluated.describe(["Mog's Kittens"], cfg)[0]["prediction"]

import json
from pathlib import Path

import pytest

from fixtures_tiny import tiny_config
from prodesc import prompts
from prodesc.config import ModelConfig, PromptConfig
from prodesc.train import encoding, examples
from prodesc.train import recipe as train

RECORDS = [
    ("Red Mug", "A red mug.\n"),
    ("  Girls Ballet Tutu   Neon Pink ", "A layered tulle tutu for dance practice, recitals and dress-up. " * 6),
    ("Mog's Kittens «Vol. 2»", "Judith Kerr’s best–selling adventures of Mog, the forgetful cat. " * 3),
    ("12 inch cast-iron pan", "Pre-seasoned. " * 40),
    ("Boys Rain Jacket", "Waterproof."),
]
NEAR = [
    {"title": "Girls Ballet Tutu  Neon Blue", "content": "A layered tulle tutu   for dance practice and recitals."},
    {"title": "Boys Rain Jacket", "content": ""},
    {"title": "Blue Mug", "content": "A blue mug for tea, coffee and cocoa. " * 10},
]


def _tokenizer(name: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest | None = None):
    """tiny's (trained here), SmolLM2's (converted into the test model cache) or Mistral's (../shared)."""
    from prodesc.models import build_tiny, fix_pad, load_tokenizer

    if name == "tiny":
        texts = [f"{t} {c} Title: Write the product description" for t, c in RECORDS] * 20
        tok = load_tokenizer(str(build_tiny(texts, ModelConfig(name="tiny"), tmp_path_factory.mktemp("tok"))))
    elif name == "smollm2":
        tok = load_tokenizer(str(request.getfixturevalue("smollm2_dir")))
    else:
        tok = load_tokenizer(str(request.getfixturevalue("shared_dir") / "tokenizers" /
                                 "mistral-7b-instruct-v0.3-tokenizer"))
    fix_pad(tok)
    return tok


@pytest.fixture(scope="module", params=["tiny", "smollm2", "mistral"])
def tok(request, tmp_path_factory):
    return _tokenizer(request.param, tmp_path_factory, request)


@pytest.mark.parametrize("cfg", [PromptConfig(), PromptConfig(language="pt"), PromptConfig(system_prompt="Be brief.")],
                         ids=["default", "pt", "system"])
@pytest.mark.parametrize("max_length", [4096, 90, 60, 30])
@pytest.mark.parametrize("with_neighbours", [False, True])
def test_layout_fits_token_for_token_as_fit_example(tok, cfg, max_length, with_neighbours):
    try:
        near = NEAR if with_neighbours else ()
        slow = [prompts.fit_example(tok, t, c, cfg, max_length, near, 150) for t, c in RECORDS]
    except Exception as e:  # Mistral's template refuses a system turn before an answer: the fast path must too
        with pytest.raises(type(e)):
            prompts.Layout.of(tok, cfg).fit_batch(["x"], ["y"], max_length)
        return
    layout = prompts.Layout.of(tok, cfg)
    assert layout.exact
    near = [NEAR if with_neighbours else ()] * len(RECORDS)
    fast = layout.fit_batch([t for t, _ in RECORDS], [c for _, c in RECORDS], max_length, near, 150)
    assert fast == ([ex for ex, _ in slow], [cut for _, cut in slow])


def test_fitting_covers_every_kind_of_cut(tmp_path_factory):
    tok = _tokenizer("tiny", tmp_path_factory)
    cuts = [prompts.fit_example(tok, t, c, PromptConfig(), ml, NEAR, 150)[1] for t, c in RECORDS for ml in (90, 60, 30)]
    assert all(any(c[key] for c in cuts) for key in examples.CUT_KEYS)  # the comparison above met each one


def test_dropping_the_neighbours_keeps_an_example_that_then_fits(tmp_path_factory):
    tok = _tokenizer("tiny", tmp_path_factory)
    bare = prompts.encode_example(tok, "Red Mug", "A red mug.", PromptConfig())
    titles_only = prompts.encode_example(tok, "Red Mug", "A red mug.", PromptConfig(), NEAR, 0)
    limit = len(bare["input_ids"]) + 1
    assert len(titles_only["input_ids"]) > limit
    ex, cut = prompts.fit_example(tok, "Red Mug", "A red mug.", PromptConfig(), limit, NEAR, 150)
    assert ex == bare and cut["neighbours_dropped"] == 3 and cut["content_tokens_cut"] == 0


def test_a_template_that_rewrites_the_user_text_falls_back_to_fit_example(tmp_path_factory):
    import copy

    tok = copy.deepcopy(_tokenizer("tiny", tmp_path_factory))
    tok.chat_template = tok.chat_template.replace("m['content'] }}", "m['content'] | lower }}")
    layout = prompts.Layout.of(tok, PromptConfig())
    assert not layout.exact
    got = layout.fit_batch(["Red Mug"], ["A red mug."], 4096)
    assert got[0][0] == prompts.fit_example(tok, "Red Mug", "A red mug.", PromptConfig(), 4096)[0]


def test_map_over_processes_gives_the_one_process_examples(tiny_data, tmp_path_factory):
    tok = _tokenizer("tiny", tmp_path_factory)
    rows = {s: train._read_split(tiny_data, s) for s in ("train", "val")}
    one = encoding.build(tok, tiny_config("train.max_length=128"), rows)
    two = encoding.build(tok, tiny_config("train.max_length=128", "train.encode_workers=2"), rows)
    assert one[2] == two[2] and one[2]["truncated"] > 0
    assert one[0]["input_ids"] == two[0]["input_ids"] and one[0]["completion_mask"] == two[0]["completion_mask"]
    slow = [prompts.fit_example(tok, r["title"], r["content"], PromptConfig(), 128)[0] for r in rows["train"]]
    assert one[0]["input_ids"] == [ex["input_ids"] for ex in slow if ex]


def test_answer_length_percentiles_are_those_of_the_supervised_tokens(tiny_data, tmp_path_factory, monkeypatch):
    import numpy as np

    monkeypatch.setattr(encoding, "BATCH", 1)  # lengths counted 64 examples at a time: several record batches
    tok = _tokenizer("tiny", tmp_path_factory)
    rows = {s: train._read_split(tiny_data, s) for s in ("train", "val")}
    ds, _, lengths = encoding.build(tok, tiny_config("train.max_length=128"), rows)
    assert len(ds) > 64 * 2
    answers = [sum(mask) for mask in ds["completion_mask"]]
    assert len(set(answers)) > 3  # the percentiles below tell lengths apart
    assert lengths["answer_tokens"] == {f"p{q}": int(np.percentile(answers, q)) for q in (50, 60, 75, 90)}
    assert lengths["supervised_tokens"] == sum(answers)


def test_encoded_examples_are_cached_in_the_data_dir_and_read_back_without_encoding(tiny_data, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("encoded"))  # the runs' entries left out
    tok = _tokenizer("tiny", _Factory(tmp_path))
    rows = {s: train._read_split(data, s) for s in ("train", "val")}
    cfg = tiny_config("train.max_length=200")
    calls = []
    real = encoding._fit_batch
    monkeypatch.setattr(encoding, "_fit_batch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = encoding.build(tok, cfg, rows, None, data)
    assert calls and [p.name for p in (data / "encoded").iterdir()] == [encoding.cache_key(tok, cfg, data)]
    calls.clear()
    searched = []
    again = encoding.build(tok, cfg, rows, lambda: searched.append(1) or {}, data)
    assert not calls and not searched  # no encoding, no neighbour search: read from DATA/encoded/
    assert again[2] == first[2] and again[0]["input_ids"] == first[0]["input_ids"]
    stats = json.loads(next((data / "encoded").glob("*/stats.json")).read_text())
    assert stats["examples"] == len(first[0])


@pytest.mark.parametrize("damage", ["truncated arrow", "stats.json", "no train"])
def test_a_damaged_encoded_entry_is_encoded_again(tiny_data, tmp_path, capsys, damage):
    """The cache is rebuilt, with a note, where it used to end in a datasets/pyarrow traceback."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("encoded"))
    tok = _tokenizer("tiny", _Factory(tmp_path))
    rows = {s: train._read_split(data, s) for s in ("train", "val")}
    cfg = tiny_config("train.max_length=200")
    first = encoding.build(tok, cfg, rows, None, data)
    entry = data / "encoded" / encoding.cache_key(tok, cfg, data)
    if damage == "truncated arrow":
        arrow = next((entry / "train").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "stats.json":
        (entry / "stats.json").write_text("{")
    else:
        shutil.rmtree(entry / "train")
    capsys.readouterr()
    again = encoding.build(tok, cfg, rows, None, data)
    out = capsys.readouterr().out
    assert f"note: {entry} is damaged" in out and "encoded " in out
    assert again[2] == first[2] and again[0]["input_ids"] == first[0]["input_ids"]
    assert "examples read from" in (encoding.build(tok, cfg, rows, None, data) and capsys.readouterr().out)


@pytest.mark.parametrize(
    "change",
    ["train.max_length=300", "prompt.language=pt", "train.max_eval_samples=8", "retrieval.k=1", "tokenizer", "data",
     "train.drop_unsupported=prompt"],
)
def test_the_cache_key_changes_with_what_the_examples_depend_on(tiny_data, tmp_path, change):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    tok = _tokenizer("tiny", _Factory(tmp_path))
    key = encoding.cache_key(tok, tiny_config(), data)
    assert encoding.cache_key(tok, tiny_config(), data) == key  # stable
    if change == "tokenizer":
        tok.chat_template = tok.chat_template.replace("assistant", "model")
        assert encoding.cache_key(tok, tiny_config(), data) != key
    elif change == "data":
        (data / "val.parquet").write_bytes((data / "val.parquet").read_bytes() + b"\0")
        assert encoding.cache_key(tok, tiny_config(), data) != key
    else:
        assert encoding.cache_key(tok, tiny_config(change), data) != key


def test_training_encodes_before_any_weights_load(tiny_data, tmp_path, monkeypatch):
    from prodesc import models

    order = []
    real_load, real_build = models.load, encoding.build
    monkeypatch.setattr(models, "load", lambda *a, **kw: order.append("weights") or real_load(*a, **kw))
    monkeypatch.setattr(encoding, "build", lambda *a, **kw: order.append("examples") or real_build(*a, **kw))
    train.train(tiny_config("train.max_steps=1", "train.eval_steps=1"), tiny_data, tmp_path / "run")
    assert order == ["examples", "weights"]


def test_default_workers_stay_one_for_small_inputs():
    cfg = tiny_config()
    assert encoding.workers(cfg, 500) == 1
    assert 1 <= encoding.workers(cfg, 1_000_000) <= 8
    assert encoding.workers(tiny_config("train.encode_workers=3"), 10) == 3


class _Factory:
    """tmp_path_factory's mktemp on a plain tmp_path (function-scoped tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path



def test_drop_unsupported_trains_on_answers_without_what_no_prompt_text_states(tmp_path_factory):
    tok = _tokenizer("tiny", tmp_path_factory)
    rows = {"train": [{"title": "Sony Switcher - SBV40S", "content": "Sony Switcher - SBV40S/ 4 A/V Inputs/ "
                       "900mW Power Output/ Black Finish", "family": "a"}], "val": []}
    far = "Sony Switcher - SBV60S/ " + "Remote Control/ " * 20 + "900mW Power Output"  # 900mW past the 200 shown
    near = {"train": [[{"uid": "1", "title": "Sony Switcher - SBV50S", "content": "Sony Switcher - SBV50S/ "
                        "4 A/V Inputs/ Silver Finish"}, {"uid": "2", "title": "Sony SBV60S", "content": far}]],
            "val": []}  # fmt: skip
    cfg = tiny_config("retrieval.k=2", "retrieval.chars=200", "train.max_length=600")
    answers = {}
    for drop in ("off", "prompt", "title"):
        layout = prompts.Layout.of(tok, cfg.prompt)
        ds, _ = encoding.encode(layout, cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"drop_unsupported": drop})}), rows["train"], near["train"])
        ex = ds[0]
        answers[drop] = tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True) if m],
                                   skip_special_tokens=True).strip()
    assert "900mW" in answers["off"] and "Black" in answers["off"]
    assert answers["prompt"] == "Sony Switcher - SBV40S/ 4 A/V Inputs"  # the sibling states 4 inputs; no one 900mW
    assert answers["title"] == "Sony Switcher - SBV40S"  # the title alone states no input count

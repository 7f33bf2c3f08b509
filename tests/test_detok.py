"""serve/detok.py: a streamed answer's pieces, joined, are exactly the full decode, whatever the tokens cut."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from prodesc.serve.detok import IncrementalText

TEXTS = ["Ein schöner Tag — 日本語のテキスト 🎉🎉 and some more words, like “quotes” and a tab\there.",
         "  two leading spaces, trailing ones  ", "\n\nnew lines\n", "ÿ€𝄞 z", "🤖", "plain ascii words only"]


def pieces_of(tok, ids: list[int]) -> list[str]:
    text = IncrementalText(tok)
    return [p for p in [*(text.add(i) for i in ids), text.finish()] if p]


@pytest.fixture(scope="module")
def mistral(shared_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer")


@pytest.fixture(scope="module")
def byte_level():
    """A GPT-2-style byte-level BPE (SmolLM2's kind): a CJK character or an emoji is several tokens of bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["plain ascii words", "some more words here"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


@pytest.mark.parametrize("name", ["mistral", "byte_level"])
def test_pieces_join_to_the_full_decode_of_multibyte_text(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got = pieces_of(tok, ids)
        assert "".join(got) == tok.decode(ids, skip_special_tokens=True), text
        assert not any(p.endswith("\ufffd") for p in got), "a character was sent cut"


@pytest.mark.parametrize("name", ["mistral", "byte_level"])
def test_pieces_join_to_the_full_decode_of_random_tokens(name: str, request: pytest.FixtureRequest) -> None:
    """Random ids (byte-fallback bytes that make no character, special tokens skipped, a cut character at the
    very end): still exactly the full decode."""
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert "".join(pieces_of(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_mistral_byte_fallback_waits_for_the_whole_character(mistral) -> None:
    ids = mistral("🤖", add_special_tokens=False)["input_ids"]
    text = IncrementalText(mistral)
    assert [text.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)  # the robot's bytes are pending
    assert text.add(ids[-1]) + text.finish() == mistral.decode(ids)

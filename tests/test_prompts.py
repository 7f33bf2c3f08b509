from pathlib import Path

import pytest

from prodesc import prompts
from prodesc.config import PromptConfig
from prodesc.errors import ProdescError

MISTRAL = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer"


@pytest.fixture(scope="module")
def mistral_tok():
    if not MISTRAL.is_dir():
        pytest.skip("../shared/tokenizers absent")
    from transformers import AutoTokenizer

    from prodesc.models import fix_pad

    tok = AutoTokenizer.from_pretrained(MISTRAL)
    fix_pad(tok)
    return tok


def test_mistral_example_has_one_bos_masked_prompt_and_ends_on_eos(mistral_tok):
    ex = prompts.encode_example(mistral_tok, "Mog's Kittens", "Judith Kerr’s best–selling adventures.", PromptConfig())
    ids, mask = ex["input_ids"], ex["completion_mask"]
    assert ids.count(mistral_tok.bos_token_id) == 1 and ids[0] == mistral_tok.bos_token_id
    assert ids[-1] == mistral_tok.eos_token_id and mask[-1] == 1
    prompt_len = mask.index(1)
    assert "[/INST]" in mistral_tok.decode(ids[:prompt_len]) and all(m == 0 for m in mask[:prompt_len])
    assert "Judith Kerr’s best–selling" in mistral_tok.decode(ids[prompt_len:])
    # generation sees exactly the training prefix
    assert prompts.prompt_ids(mistral_tok, "Mog's Kittens", PromptConfig()) == ids[:prompt_len]


def test_mistral_pad_is_not_eos(mistral_tok):
    assert mistral_tok.pad_token_id is not None and mistral_tok.pad_token_id != mistral_tok.eos_token_id


def test_system_prompt_reaches_the_model_with_or_without_system_role(mistral_tok):
    cfg = PromptConfig(system_prompt="Answer in one sentence.")
    text = prompts.prompt_text(mistral_tok, "Mog's Kittens", cfg)
    assert "Answer in one sentence." in text and "Mog's Kittens" in text


def test_portuguese_wording_is_available():
    assert "título" in prompts.user_text("X", PromptConfig(language="pt"))


def test_custom_instruction_needs_title_placeholder():
    with pytest.raises(ProdescError, match="must contain"):
        prompts.user_text("X", PromptConfig.model_construct(instruction="Describe the product"))


@pytest.mark.parametrize(
    "cfg",
    [
        PromptConfig(),
        PromptConfig(language="pt"),
        PromptConfig(system_prompt="Answer in one sentence."),
        PromptConfig(instruction="Product: {title}\nDescribe {title} for a shop."),
    ],
    ids=["default", "pt", "system", "title-twice"],
)
def test_baked_template_turns_a_bare_title_into_the_training_prompt(mistral_tok, cfg):
    baked = prompts.baked_chat_template(mistral_tok, cfg)
    title = "  Mog's Kittens «Vol. 2» "  # the training prompt strips the title, so must the template
    text = mistral_tok.apply_chat_template(
        [{"role": "user", "content": title}], chat_template=baked, tokenize=False, add_generation_prompt=True
    )
    assert mistral_tok(text, add_special_tokens=False)["input_ids"] == prompts.prompt_ids(mistral_tok, title, cfg)


def test_baked_template_rewrites_only_the_last_user_turn_and_keeps_a_callers_system_prompt(mistral_tok):
    baked = prompts.baked_chat_template(mistral_tok, PromptConfig(system_prompt="Run's system."))
    msgs = [
        {"role": "system", "content": "Caller's system."},
        {"role": "user", "content": "Red Mug"},
        {"role": "assistant", "content": "A red mug."},
        {"role": "user", "content": "Blue Mug"},
    ]
    text = mistral_tok.apply_chat_template(msgs, chat_template=baked, tokenize=False, add_generation_prompt=True)
    assert "[INST] Red Mug[/INST]" in text and "Title: Blue Mug" in text
    assert "Caller's system." in text and "Run's system." not in text


def test_baking_refuses_a_tokenizer_without_a_chat_template(mistral_tok):
    import copy

    tok = copy.copy(mistral_tok)
    tok.chat_template = None
    with pytest.raises(ProdescError, match="no single chat template"):
        prompts.baked_chat_template(tok, PromptConfig())

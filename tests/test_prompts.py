
import pytest

from prodesc import prompts
from prodesc.config import PromptConfig
from prodesc.errors import ProdescError


@pytest.fixture(scope="module")
def mistral_tok(shared_dir):
    from transformers import AutoTokenizer

    from prodesc.models import fix_pad

    tok = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer")
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


# --------------------------------------------------------------------------------- catalog neighbours, fitting

NEAR = [
    {"title": "Girls Ballet Tutu  Neon Blue", "content": "A layered tulle tutu for dance practice and recitals."},
    {"title": "Boys Rain Jacket", "content": ""},
]


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    """The tiny model's tokenizer: byte-level BPE, ChatML template, EOS = <|im_end|>."""
    from prodesc.config import ModelConfig
    from prodesc.models import build_tiny, load_tokenizer

    texts = [f"{d['title']} {d['content']} Title: Write the product description" for d in NEAR] * 20
    return load_tokenizer(str(build_tiny(texts, ModelConfig(name="tiny"), tmp_path_factory.mktemp("tok"))))


def test_neighbours_sit_above_the_instruction_as_numbered_titles_with_cut_descriptions():
    text = prompts.user_text("Girls Ballet Tutu Neon Pink", PromptConfig(), NEAR, chars=30)
    assert text == (
        "Similar products in the catalog:\n"
        "[1] Girls Ballet Tutu Neon Blue\n"
        "A layered tulle tutu for…\n"  # cut at a word within 30 characters
        "[2] Boys Rain Jacket\n\n"  # no description: the title alone
        "Write the product description for this product title.\nTitle: Girls Ballet Tutu Neon Pink"
    )
    assert prompts.user_text("X", PromptConfig()) == prompts.user_text("X", PromptConfig(), (), chars=30)


def test_clip_keeps_short_text_and_cuts_long_text_at_a_word():
    assert prompts.clip("short  text", 50) == "short text"
    cut = prompts.clip("alpha beta gamma delta epsilon", 14)
    assert cut == "alpha beta…" and len(cut) <= 14


def test_generation_prefix_equals_the_training_prefix_with_neighbours(chatml_tok):
    ex = prompts.encode_example(chatml_tok, "Red Mug", "A red mug.", PromptConfig(), NEAR, 40)
    prompt_len = ex["completion_mask"].index(1)
    assert prompts.prompt_ids(chatml_tok, "Red Mug", PromptConfig(), NEAR, 40) == ex["input_ids"][:prompt_len]


def test_over_long_example_shrinks_neighbours_first_and_keeps_the_answer_whole(chatml_tok):
    cfg = PromptConfig()
    whole = prompts.encode_example(chatml_tok, "Red Mug", "A red mug.", cfg, NEAR, 200)
    bare = prompts.encode_example(chatml_tok, "Red Mug", "A red mug.", cfg, NEAR, 0)
    limit = len(bare["input_ids"]) + 5  # room for titles and a few description characters, not all of them
    assert len(whole["input_ids"]) > limit
    ex, cut = prompts.fit_example(chatml_tok, "Red Mug", "A red mug.", cfg, limit, NEAR, 200)
    assert len(ex["input_ids"]) <= limit and 0 < cut["neighbour_chars_cut"] < 200
    assert cut["content_tokens_cut"] == 0 and cut["neighbours_dropped"] == 0
    assert ex["input_ids"][-sum(ex["completion_mask"]) :] == whole["input_ids"][-sum(whole["completion_mask"]) :]


def test_over_long_answer_is_cut_but_eos_stays_the_last_supervised_token(chatml_tok):
    content = "A red mug with a handle. " * 40
    full = prompts.encode_example(chatml_tok, "Red Mug", content, PromptConfig())
    limit = len(full["input_ids"]) - 30
    ex, cut = prompts.fit_example(chatml_tok, "Red Mug", content, PromptConfig(), limit, NEAR, 100)
    ids, mask = ex["input_ids"], ex["completion_mask"]
    assert len(ids) == limit and len(mask) == limit
    assert ids[-1] == chatml_tok.eos_token_id and mask[-1] == 1  # never cut: the model learns to stop
    assert cut["neighbours_dropped"] == 2 and cut["content_tokens_cut"] == 30
    assert ids[: mask.index(1)] == prompts.prompt_ids(chatml_tok, "Red Mug", PromptConfig())  # no neighbours left


def test_prompt_longer_than_max_length_drops_the_example(chatml_tok):
    ex, cut = prompts.fit_example(chatml_tok, "Red Mug " * 50, "A red mug.", PromptConfig(), 20)
    assert ex is None and cut["dropped"] == 1


def test_answer_ends_at_the_templates_end_of_turn_even_when_eos_differs(chatml_tok):
    import copy

    from prodesc.models import stop_ids

    tok = copy.deepcopy(chatml_tok)
    tok.eos_token = "<s>"  # a base model whose EOS is not the template's end-of-turn (Llama-3 style)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert prompts.end_of_turn_id(tok) == im_end
    ex = prompts.encode_example(tok, "Red Mug", "A red mug.", PromptConfig())
    assert ex["input_ids"][-1] == im_end and tok.eos_token_id not in ex["input_ids"][-3:]
    assert set(stop_ids(tok)) == {im_end, tok.eos_token_id}

"""The preset families (Qwen3, Llama 3.1/3.2, Gemma 3) on their real tokenizers, cut down (tests/assets/tokenizers):
prompt as training saw it, loss on the answer and its end of turn only, pad apart from every stop id, every end of
turn stopping generation, Qwen3's thinking off, the Modelfile and the GGUF vocabulary carrying template and stops."""

import copy
import json
from pathlib import Path

import pytest

from prodesc import models, prompts
from prodesc.config import PromptConfig
from prodesc.errors import ProdescError
from prodesc.export import gguf_file, modelfile

ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
# family -> (end of turn, every id that ends an answer, the pad prodesc picks)
FAMILIES = {
    "qwen3": ("<|im_end|>", {151645, 151643}, "<|vision_pad|>"),
    "llama-3.2": ("<|eot_id|>", {128009, 128001, 128008}, "<|finetune_right_pad_id|>"),
    "llama-3.1": ("<|eot_id|>", {128009, 128001, 128008}, "<|finetune_right_pad_id|>"),
    "gemma-3": ("<end_of_turn>", {106, 1}, "<pad>"),
}
NEAR = [{"title": "Kestrel ProLine Portable SSD - KX-2041B 512GB Black",
         "content": "Kestrel ProLine Portable SSD - KX-2041B/ 512GB/ USB 3.2 Gen 1/ Shock resistant/ Black"},
        {"title": "Blue  Mug", "content": "A blue mug for tea and coffee."}]
TITLE, ANSWER = "Red Mug", "A red mug."


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / request.param)
    models.fix_pad(tok)
    return request.param, tok


def _baked(tok, cfg):
    tok = copy.copy(tok)
    tok.chat_template = prompts.baked_chat_template(tok, cfg)
    return tok


def test_prompt_carries_the_neighbours_and_instruction_and_is_the_training_prefix(family):
    name, tok = family
    cfg = PromptConfig()
    text = prompts.prompt_text(tok, TITLE, cfg, NEAR, 700)
    user = prompts.user_text(TITLE, cfg, NEAR, 700)
    assert user in text and text.index("Similar products in the catalog:\n[1] Kestrel") < text.index("Title: Red Mug")
    ex = prompts.encode_example(tok, TITLE, ANSWER, cfg, NEAR, 700)
    start = ex["completion_mask"].index(1)
    assert prompts.prompt_ids(tok, TITLE, cfg, NEAR, 700) == ex["input_ids"][:start]
    assert ex["input_ids"].count(tok.bos_token_id) <= 1  # Qwen3 has no BOS; the others exactly one, first
    if tok.bos_token_id is not None:
        assert ex["input_ids"][0] == tok.bos_token_id
    layout = prompts.Layout.of(tok, cfg)  # the batched path training uses gives the same ids
    assert layout.exact and layout.fit_batch([TITLE], [ANSWER], 4096, [NEAR], 700)[0] == [ex]


def test_loss_covers_the_answer_and_its_end_of_turn_only(family):
    name, tok = family
    eot, stops, _ = FAMILIES[name]
    ex = prompts.encode_example(tok, TITLE, ANSWER, PromptConfig())
    mask, ids = ex["completion_mask"], ex["input_ids"]
    supervised = [i for i, m in zip(ids, mask, strict=True) if m]
    assert mask == sorted(mask)  # one prompt block, then one answer block
    assert supervised == tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(eot)]
    assert prompts.end_of_turn_id(tok) == tok.convert_tokens_to_ids(eot) and ids[-1] in stops


def test_pad_is_none_of_the_stop_ids_and_every_end_of_turn_stops_generation(family):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    name, tok = family
    _, stops, pad = FAMILIES[name]
    assert set(models.stop_ids(tok)) == stops  # the tokenizer alone: generation_config.json beside it is read
    assert tok.pad_token == pad and tok.pad_token_id not in stops
    shape = json.loads((ASSETS / name / "config.json").read_text())
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8}
    config = AutoConfig.for_model(shape.pop("model_type"), **{**shape, **tiny})
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_pretrained(ASSETS / name)
    models.fix_pad(tok, model)
    assert set(model.generation_config.eos_token_id) == stops and model.generation_config.pad_token_id not in stops
    assert tok.pad_token == pad  # the same pick with the model as without


def test_qwen3_prompt_closes_an_empty_thinking_block_and_the_loss_never_sees_it():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "qwen3")
    cfg = PromptConfig()
    prompt = prompts.prompt_text(tok, TITLE, cfg)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = prompts._render(tok, prompts.messages(TITLE, cfg, tok, ANSWER), add_generation_prompt=False)
    assert full == prompt + ANSWER + "<|im_end|>\n"  # the template's own rendering of the answered turn agrees
    ex = prompts.encode_example(tok, TITLE, ANSWER, cfg)
    think = {tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")}
    answer = [i for i, m in zip(ex["input_ids"], ex["completion_mask"], strict=True) if m]
    assert think <= set(ex["input_ids"]) and not think & set(answer)
    # an exported model keeps thinking off even when a server asks for it
    baked = _baked(tok, cfg)
    served = baked.apply_chat_template([{"role": "user", "content": TITLE}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
    assert served == prompt


def test_llama_system_header_date_is_pinned_in_training_and_exports():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "llama-3.2")
    prompt = prompts.prompt_text(tok, TITLE, PromptConfig())
    assert "Today Date: 26 Jul 2024" in prompt  # not today's date: training and serving days differ
    served = _baked(tok, PromptConfig()).apply_chat_template(
        [{"role": "user", "content": TITLE}], tokenize=False, add_generation_prompt=True, date_string="01 Jan 2030"
    )
    assert served == prompt


def test_baked_template_turns_a_bare_title_into_the_training_prompt(family):
    name, tok = family
    cfg = PromptConfig(system_prompt="You write product descriptions.")
    baked = _baked(tok, cfg)
    got = baked.apply_chat_template([{"role": "user", "content": TITLE}], tokenize=False, add_generation_prompt=True)
    assert got == prompts.prompt_text(tok, TITLE, cfg)
    assert "You write product descriptions." in got  # Gemma folds it into the user turn, the others a system turn


def test_modelfile_template_ends_at_the_end_of_turn_and_stops_on_every_end_id(family):
    name, tok = family
    eot, stops, _ = FAMILIES[name]
    cfg = PromptConfig()
    go = modelfile.template(_baked(tok, cfg), runtime_adds_bos=True)
    assert go.endswith("{{ .Response }}" + eot)
    filled = go.split("{{ .Response }}")[0].replace("{{ .Prompt }}", TITLE)
    bos = tok.bos_token if tok.bos_token and prompts.prompt_text(tok, TITLE, cfg).startswith(tok.bos_token) else ""
    assert bos + filled == prompts.prompt_text(tok, TITLE, cfg)  # llama.cpp adds the BOS the template would write
    assert set(modelfile.stop_tokens(tok, ASSETS / name)) == set(tok.convert_ids_to_tokens(sorted(stops)))


def _gguf_vocab(name, tok):
    """llama.cpp's converter's vocabulary step on config + tokenizer (what gguf_file.check runs), its metadata."""
    import tempfile

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ASSETS / name)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model = gguf_file._model_class(config.architectures[0])(
            Path(tmp), gguf_file._ftype("f16"), Path(tmp) / "v.gguf", dry_run=True
        )
        model.set_vocab()
        return {k: v.value for k, v in model.gguf_writer.kv_data[0].items()}


@pytest.mark.parametrize("name, pre", [("qwen3", "qwen2"), ("llama-3.2", "llama-bpe"), ("llama-3.1", "llama-bpe")])
def test_gguf_vocabulary_carries_the_baked_template_and_the_end_of_turn(name, pre):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / name)
    models.fix_pad(tok)
    baked = _baked(tok, PromptConfig())
    kv = _gguf_vocab(name, baked)
    assert kv["tokenizer.ggml.pre"] == pre  # llama.cpp pre-tokenizes as training did
    assert kv["tokenizer.chat_template"] == baked.chat_template
    eot = baked.convert_tokens_to_ids(FAMILIES[name][0])
    assert kv["tokenizer.ggml.eos_token_id"] == eot and kv["tokenizer.ggml.padding_token_id"] == baked.pad_token_id
    assert kv["tokenizer.ggml.tokens"][eot] == FAMILIES[name][0]


def test_gemma_gguf_export_is_refused_before_weights_without_the_sentencepiece_model():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "gemma-3")
    with pytest.raises(ProdescError, match="cannot write the tokenizer"):
        gguf_file.check(str(ASSETS / "gemma-3"), tok, "q8_0")

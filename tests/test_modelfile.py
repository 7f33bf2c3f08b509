import copy
from pathlib import Path

import pytest

from prodesc import config, prompts
from prodesc.config import PromptConfig
from prodesc.export import modelfile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mistral_tok(shared_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer")


def _baked(tok, cfg):
    tok = copy.copy(tok)
    tok.chat_template = prompts.baked_chat_template(tok, cfg)
    return tok


def test_ollama_template_is_the_training_prompt_with_the_title_as_prompt(mistral_tok):
    cfg = PromptConfig()
    go = modelfile.template(_baked(mistral_tok, cfg), runtime_adds_bos=True)
    assert go == (
        "[INST] Write the product description for this product title.\nTitle: {{ .Prompt }}[/INST]"
        "{{ .Response }}</s>"
    )
    # llama.cpp adds the BOS itself: with it, the rendered template is exactly the training prompt
    filled = go.split("{{ .Response }}")[0].replace("{{ .Prompt }}", "Red Mug")
    assert mistral_tok.bos_token + filled == prompts.prompt_text(mistral_tok, "Red Mug", cfg)


def test_ollama_template_keeps_the_bos_when_the_runtime_does_not_add_one(mistral_tok):
    go = modelfile.template(_baked(mistral_tok, PromptConfig()), runtime_adds_bos=False)
    assert go.startswith("<s>[INST] ")


def test_go_action_braces_in_an_instruction_are_written_as_literal_text(mistral_tok):
    go = modelfile.template(_baked(mistral_tok, PromptConfig(instruction="Describe {{item}}: {title}")), True)
    assert '[INST] Describe {{ "{{" }}item}}: {{ .Prompt }}[/INST]' in go


def test_decoding_settings_become_ollama_parameters_and_the_rest_is_named():
    preset = config.load(ROOT / "configs" / "smollm2-135m.yaml")
    lines = modelfile.parameters(preset)
    assert "PARAMETER num_predict 512" in lines and "PARAMETER temperature 0" in lines
    assert "PARAMETER repeat_penalty 1.1" in lines and "PARAMETER repeat_last_n 512" in lines
    assert all(f in lines[-1] for f in ("no_repeat_ngram_size=4", "stop_boost_after=auto", "stop_bias=-4"))
    plain = modelfile.parameters(config.ProdescConfig())
    assert not any("repeat" in line or line.startswith("#") for line in plain)

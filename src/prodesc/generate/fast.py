"""Compiled static-cache generation on a CUDA GPU.

    kwargs = generation_kwargs(model, prompt_width=48, max_new_tokens=256)   # + pad the batch to batch_bucket()

Generation on a CUDA GPU with unquantized weights uses a static KV cache, which lets `generate` compile the decode
step with CUDA graphs (`torch.compile(mode="reduce-overhead")`): the per-token cost drops from ~32 layers of
Python and kernel launches (~90 ms a token on the H100 machines here) to one graph replay (8 ms). Shapes are
bucketed (batch to a power of two, cache length to a multiple of 256) so that a long job compiles a handful of
graphs, not one per batch. `generate.compile: off` (or PRODESC_COMPILE_GENERATE=0) turns it off (e.g. for a few
titles, where the 35-50 s compile does not pay). The attention implementation is chosen once, when the model
loads (`attention.attention_for`).
"""

from __future__ import annotations

from typing import Any

CACHE_BUCKET = 256


def generation_kwargs(model: Any, prompt_width: int, max_new_tokens: int, mode: str = "auto") -> dict[str, Any]:
    """Extra `generate` kwargs for the fast path (static cache, compiled decode), or {} where it does not apply."""
    if not fast_generation_enabled(model, mode):
        return {}
    from transformers import GenerationConfig

    kw: dict[str, Any] = {"cache_implementation": "static"}
    if hasattr(GenerationConfig(), "max_cache_len"):  # transformers >= 5.2x: one cache size across calls
        need = prompt_width + max_new_tokens
        kw["max_cache_len"] = -(-need // CACHE_BUCKET) * CACHE_BUCKET
    return kw


def fast_generation_enabled(model: Any, mode: str = "auto") -> bool:
    """Compiled static-cache decoding (`generate.compile`): auto = CUDA with unquantized weights; off; force = the
    static-cache path on CPU too, uncompiled (for tests of the plumbing)."""
    import torch

    if mode == "off" or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "hf_quantizer", None):
        return False
    on_gpu = torch.cuda.is_available() and getattr(model, "device", torch.device("cpu")).type == "cuda"
    return on_gpu or mode == "force"


def batch_bucket(n: int, cap: int) -> int:
    """Batch size to pad `n` prompts to: the next power of two, at most `cap` (fewer shapes to compile)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(cap, n))

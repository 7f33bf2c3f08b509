"""The `sdpa_varlen` attention kernel: packed training rows attend only to themselves; GQA decode without copies.

    model.attn_implementation: sdpa_varlen     # in a preset: packed sequences attend only to themselves, no L x L mask

Training with `train.packing=true` puts every sequence of a micro-batch into one row (TRL's padding-free BFD
packing) and passes their boundaries as `cu_seq_lens_q/k` (and `position_ids` that restart at 0). With plain SDPA,
transformers turns those boundaries into a dense block-diagonal mask of (tokens x tokens) and the attention kernel
still visits every block of it: for 8 packs of 2048 tokens that is a 16k x 16k mask and about as many attention
FLOPs as all the linear layers. `sdpa_varlen` calls PyTorch's flash-attention varlen kernel instead
(`torch.nn.attention.varlen.varlen_attn`), which computes only the causal triangle of each sequence (H100: 1.9x
the training throughput of the block mask, docs/PERFORMANCE.md). Without the boundaries (unpacked batches,
padding, prefill) it is transformers' SDPA path, unchanged; one-token decode steps of grouped-query models take
a GQA path that does not copy the KV cache (below). On CPU, or a torch without `varlen_attn`, packed rows are
attended one sequence at a time with SDPA: exact, slower.

Decode steps use the same kernel through `prodesc.generate.fast` (static cache, compiled decode).
"""

from __future__ import annotations

import inspect
from typing import Any

VARLEN = "sdpa_varlen"
MAX_DECODE_QUERIES = 16  # new tokens per row up to which a masked step takes the GQA decode path


def register_varlen_attention() -> str:
    """Register `sdpa_varlen` with transformers (attention function + mask builder); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                             **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: [B, H, L, D] in, [B, L, H, D] out. Packed rows (B == 1, no mask, sequence
    boundaries known) go through the varlen kernel, GQA decode steps through `_gqa_decode`, everything else
    through transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _is_gqa_decode(query, key, attention_mask) and not dropout:
        return _gqa_decode(query, key, value, attention_mask, scaling), None
    cu_seq = _sequence_bounds(query, attention_mask, sliding_window, kwargs)
    if cu_seq is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    cu, max_len = cu_seq
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = _varlen(q, k, v, cu, max_len, scaling)
    return out.unsqueeze(0), None


def attention_for(cfg_attn: str | None, mode: str, quantized: bool) -> str | None:
    """The attention implementation to load an inference model with, chosen once at load: the fast path decodes
    through `sdpa_varlen` (SDPA's math, but GQA decode steps without copying the KV cache 4x)."""
    import torch

    if cfg_attn not in (None, "sdpa") or mode == "off" or quantized or not torch.cuda.is_available():
        return cfg_attn
    return register_varlen_attention()


def _is_gqa_decode(query: Any, key: Any, attention_mask: Any) -> bool:
    """A decode step (one new token per row, or a few: the serving engine's speculative verify step, with its 4D
    mask), fewer key/value heads than query heads, a mask shared by all heads (or none, for one token)."""
    q = query.shape[2]
    if not (key.shape[1] < query.shape[1] and query.shape[1] % key.shape[1] == 0):
        return False
    if attention_mask is None:
        return q == 1
    return q <= MAX_DECODE_QUERIES and attention_mask.dim() == 4 and attention_mask.shape[1] == 1


def _gqa_decode(query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None) -> Any:
    """Decode-step attention without repeating the KV cache: the query heads of each key/value group become query
    rows of that group ([B, Hq, T, D] -> [B, Hkv, Hq/Hkv * T, D], the mask repeated to match). transformers' SDPA
    does this only outside torch.compile and without a mask; otherwise it copies the whole cache 4x per layer and
    step (Mistral: 32 query / 8 kv heads), which made compiled batch-64 decoding ~2.5x slower than the weights
    alone allow."""
    import torch.nn.functional as F

    b, hq, t, d = query.shape
    hkv = key.shape[1]
    rep = hq // hkv
    q = query.reshape(b, hkv, rep * t, d)  # query head h = group h // rep, rows (h % rep) * t + i (repeat_kv's order)
    mask = attention_mask
    if mask is not None and t > 1:
        mask = mask[:, :, None].expand(b, 1, rep, t, mask.shape[-1]).reshape(b, 1, rep * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, t, d).transpose(1, 2).contiguous()  # [B, T, Hq, D]


def _sequence_bounds(query: Any, attention_mask: Any, sliding_window: int | None,
                     kwargs: dict[str, Any]) -> tuple[Any, int] | None:
    """(cu_seq_lens, max_len) of a packed row, or None when the row is not packed (or cannot use varlen)."""
    if attention_mask is not None or sliding_window is not None or query.shape[0] != 1 or query.shape[2] < 2:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and kwargs.get("cu_seq_lens_k") is not None and not _same(cu, kwargs["cu_seq_lens_k"]):
        return None  # cross-attention shapes: not ours
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape[-1] != query.shape[2]:
            return None
        starts = (pos.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() < 2:
            return None  # one sequence: SDPA's causal kernel is the fast path already
        import torch

        cu = torch.cat([starts, starts.new_tensor([pos.shape[-1]])])
    cu = cu.to(device=query.device, dtype=_int32())
    max_len = kwargs.get("max_length_q")
    max_len = int(max_len) if max_len is not None else int(cu.diff().max())
    return cu, max_len


def _varlen(q: Any, k: Any, v: Any, cu: Any, max_len: int, scaling: float | None) -> Any:
    """Causal attention within each [cu[i], cu[i+1]) span; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    import torch

    fn = _varlen_kernel() if q.is_cuda else None
    _announce(fn)
    if fn is None:
        return _varlen_reference(q, k, v, cu, scaling)
    dtype = q.dtype
    if dtype == torch.float32:  # PEFT may upcast norms for k-bit training; flash needs half precision
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # (left, right): causal
    if scaling is not None and "scale" in params:
        kw["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (_repeat_heads(t, q.shape[1] // t.shape[1]) for t in (k, v))
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.to(dtype)


def _varlen_reference(q: Any, k: Any, v: Any, cu: Any, scaling: float | None) -> Any:
    """One SDPA call per sequence: the exact semantics of the varlen kernel, for CPU and for tests."""
    import torch
    import torch.nn.functional as F

    if k.shape[1] != q.shape[1]:
        k, v = (_repeat_heads(t, q.shape[1] // t.shape[1]) for t in (k, v))
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _varlen_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_ANNOUNCED: list[bool] = []


def _announce(fn: Any) -> None:
    """Say once per process which varlen path runs (the kernel's signature differs across torch versions)."""
    import sys

    import torch

    if _ANNOUNCED or torch.compiler.is_compiling():
        return
    _ANNOUNCED.append(True)
    how = f"torch varlen_attn{inspect.signature(fn)}" if fn is not None else "per-sequence SDPA (no varlen kernel)"
    print(f"sdpa_varlen: {how}", file=sys.stderr, flush=True)


def _repeat_heads(t: Any, n_rep: int) -> Any:
    """[T, Hkv, D] -> [T, Hkv * n_rep, D], query head h reading kv head h // n_rep (transformers' repeat_kv)."""
    if n_rep == 1:
        return t
    tokens, heads, dim = t.shape
    return t[:, :, None, :].expand(tokens, heads, n_rep, dim).reshape(tokens, heads * n_rep, dim)


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask builder for `sdpa_varlen`: none for unpadded rows without a cache (training: packing is read from the
    sequence bounds), SDPA's mask otherwise (padding, sliding windows, KV caches with unfilled slots)."""
    from transformers.masking_utils import sdpa_mask

    config = kwargs.get("config")
    no_cache = kwargs.get("kv_length") == kwargs.get("q_length") and not kwargs.get("q_offset")
    if kwargs.get("attention_mask") is None and no_cache and getattr(config, "sliding_window", None) is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _same(a: Any, b: Any) -> bool:
    return a is b or (a.shape == b.shape and bool((a == b).all()))


def _int32() -> Any:
    import torch

    return torch.int32

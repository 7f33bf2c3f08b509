"""Packed (padding-free) batches give every sequence the loss it has alone, and gradient accumulation matches one
big batch. The GPU speed of the fast preset rests on both (docs/PERFORMANCE.md).

A tiny random Llama in float32 (2 layers, hidden 64, vocab 512, 4 query / 2 key-value heads). Packed batches come
from TRL's own padding-free collator, as SFTTrainer builds them with packing=True / packing_strategy="bfd": one row,
`position_ids` restarting at 0 for each sequence, `cu_seq_lens_q/k`, no attention_mask. Tolerance: 1e-5 absolute on
per-sequence mean losses of order 6.2 (ln 512), i.e. float32 rounding (~1e-7 relative) with room for the different
summation orders of one long row vs. padded rows.
"""

from __future__ import annotations

import pytest
import torch

from prodesc import attention as speed

LENGTHS = [5, 11, 3, 8]
PAD = 0
TOL = 1e-5


def _tiny_model(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if attn == speed.VARLEN:
        speed.register_varlen_attention()
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def _sequences(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in LENGTHS]


def _packed_batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    batch = collator([{"input_ids": s} for s in seqs])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    return batch


def _seq_losses_padded(model: torch.nn.Module, seqs: list[list[int]]) -> list[float]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [_ce(logits[i, : len(s)], s) for i, s in enumerate(seqs)]


def _seq_losses_packed(model: torch.nn.Module, seqs: list[list[int]], batch: dict, use_cache: bool = False
                       ) -> list[float]:
    """Per-sequence losses of one packed row. use_cache=False as SFTTrainer.compute_loss passes it: transformers
    derives the block mask from position_ids only when the forward has no KV cache."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = use_cache
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    out, start = [], 0
    for s in seqs:
        out.append(_ce(logits[start:start + len(s)], s))
        start += len(s)
    return out


def _ce(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean next-token cross-entropy of one sequence."""
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager", speed.VARLEN])
def test_packed_sequences_do_not_attend_to_each_other(attn):
    model, seqs = _tiny_model(attn), _sequences()
    padded = _seq_losses_padded(model, seqs)
    packed = _seq_losses_packed(model, seqs, _packed_batch(seqs))
    assert max(abs(a - b) for a, b in zip(padded, packed, strict=True)) < TOL, (padded, packed)


@pytest.mark.parametrize("attn", ["sdpa", "eager", speed.VARLEN])
def test_packed_row_without_position_ids_leaks_across_sequences(attn):
    """Negative control: the same row with default positions (and no boundaries) is one long sequence."""
    model, seqs = _tiny_model(attn), _sequences()
    padded = _seq_losses_padded(model, seqs)
    batch = _packed_batch(seqs)
    leaky = _seq_losses_packed(model, seqs, {"input_ids": batch["input_ids"]})
    assert abs(leaky[0] - padded[0]) < TOL  # the first sequence sees nothing before it either way
    assert all(abs(a - b) > 1e-3 for a, b in zip(padded[1:], leaky[1:], strict=True)), (padded, leaky)


def test_sdpa_packing_leaks_when_a_kv_cache_is_built():
    """The trap behind a silently wrong packed run: a forward that builds a KV cache (use_cache defaults to True in
    the model config) skips transformers' packed-sequence detection. SFTTrainer passes use_cache=False and
    models.load(for_training=True) sets it in the config; sdpa_varlen reads the boundaries itself and is immune."""
    seqs = _sequences()
    for attn in ("sdpa", speed.VARLEN):
        model = _tiny_model(attn)
        padded = _seq_losses_padded(model, seqs)
        cached = _seq_losses_packed(model, seqs, _packed_batch(seqs), use_cache=True)
        worst = max(abs(a - b) for a, b in zip(padded, cached, strict=True))
        assert (worst > 1e-3) if attn == "sdpa" else (worst < TOL), (attn, padded, cached)


def test_varlen_reads_boundaries_from_position_ids_alone():
    """Without cu_seq_lens (e.g. a caller that passes only position_ids) the varlen path still separates them."""
    model, seqs = _tiny_model(speed.VARLEN), _sequences(seed=2)
    batch = _packed_batch(seqs)
    packed = _seq_losses_packed(model, seqs, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]})
    padded = _seq_losses_padded(model, seqs)
    assert max(abs(a - b) for a, b in zip(padded, packed, strict=True)) < TOL


def test_varlen_gradients_match_padded_batch():
    """The backward pass is per-sequence too: LoRA-free input gradients of packed == padded, float32."""
    model, seqs = _tiny_model(speed.VARLEN), _sequences(seed=3)
    emb = model.get_input_embeddings()
    batch = _packed_batch(seqs)
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    start, total = 0, 0.0
    for s in seqs:
        total = total + _ce_t(logits[start:start + len(s)], s)
        start += len(s)
    total.backward()
    packed_grad = emb.weight.grad.clone()
    model.zero_grad()
    ref = sum(_ce_t(model(input_ids=torch.tensor([s])).logits[0], s) for s in seqs)
    ref.backward()
    assert torch.allclose(packed_grad, emb.weight.grad, atol=1e-6, rtol=1e-5)


def _ce_t(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _one_step(tmp_path, batch_size: int, grad_accum: int, packing: bool) -> dict[str, torch.Tensor]:
    """One SGD step of prodesc's SFT arguments on 4 fixed examples; returns the trainable (LoRA) weights."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from prodesc.config import ProdescConfig
    from prodesc.train.recipe import _sft_args

    cfg = ProdescConfig()
    t = cfg.train
    t.batch_size, t.grad_accum, t.packing, t.max_steps, t.max_length = batch_size, grad_accum, packing, 1, 16
    t.optim, t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.max_grad_norm = "sgd", 1.0, "constant", 0.0, 1e9
    model = _tiny_model("sdpa").train()
    args = _sft_args(cfg, tmp_path / f"b{batch_size}x{grad_accum}", has_val=False, model=model)
    args.update(save_strategy="no", disable_tqdm=True, logging_steps=1, use_cpu=True)
    g = torch.Generator().manual_seed(4)
    lengths = [3, 12, 6, 9]  # different answer lengths: a mean of per-micro-batch means would weight them wrongly
    rows = []
    for n in lengths:
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0, 0] + [1] * (n - 2)})
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM", init_lora_weights="gaussian")
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(), peft_config=lora)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_equals_one_big_batch(tmp_path, packing):
    """4 examples in one micro-batch vs 2 x grad_accum 2: the same SGD update (loss normalised by the supervised
    tokens of the whole accumulated batch, `num_items_in_batch`, not averaged per micro-batch)."""
    big = _one_step(tmp_path, 4, 1, packing)
    acc = _one_step(tmp_path, 2, 2, packing)
    assert big.keys() == acc.keys()
    for name, w in big.items():
        assert torch.allclose(w, acc[name], atol=1e-6, rtol=1e-5), name
    moved = [n for n, w in big.items() if "lora_B" in n and w.abs().max() > 1e-4]  # B starts at 0: the step moved it
    assert len(moved) == sum("lora_B" in n for n in big)


@pytest.mark.parametrize("on", [False, True])
def test_sft_args_set_gradient_checkpointing_as_configured(tmp_path, on):
    """TRL's SFTConfig defaults gradient checkpointing to True: prodesc must pass False explicitly, or every run
    recomputes its activations (measured on the H100: the bf16 preset ran at the nf4+checkpointing speed)."""
    from trl import SFTConfig

    from prodesc.config import ProdescConfig
    from prodesc.train.recipe import _sft_args

    cfg = ProdescConfig()
    cfg.train.gradient_checkpointing = on
    args = SFTConfig(**_sft_args(cfg, tmp_path, has_val=False, model=_tiny_model("sdpa")), use_cpu=True)
    assert args.gradient_checkpointing is on


def test_gqa_decode_matches_sdpa(monkeypatch):
    """The decode path of compiled generation (each KV group's query heads as rows, no 4x copy of the cache) gives
    SDPA's scores: static cache, left-padded batch, float32."""
    calls = []
    original = speed._gqa_decode
    monkeypatch.setattr(speed, "_gqa_decode", lambda *a: calls.append(1) or original(*a))
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]])
    kw = dict(attention_mask=(ids != PAD).long(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              cache_implementation="static", return_dict_in_generate=True, output_scores=True, pad_token_id=PAD)
    with torch.no_grad():
        ref = _tiny_model("sdpa").generate(input_ids=ids, **kw)
        fast = _tiny_model(speed.VARLEN).generate(input_ids=ids, **kw)
    assert calls, "the GQA decode path did not run"
    assert torch.equal(ref.sequences, fast.sequences)
    for a, b in zip(ref.scores, fast.scores, strict=True):  # -inf where min_new_tokens bans EOS, in both
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert (a - b)[torch.isfinite(a)].abs().max().item() < TOL


def test_gqa_decode_of_several_tokens_per_row_matches_sdpa():
    """The serving engine's verify step (a few new tokens per row, a 4D mask over a longer cache) through the GQA
    decode path gives SDPA's output with the cache repeated per query head."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    b, hq, hkv, t, cache, d = 3, 8, 2, 5, 17, 16
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, cache, d), torch.randn(b, hkv, cache, d)
    at = torch.tensor([4, 9, 11])[:, None] + torch.arange(t)  # each row's columns of its new tokens
    mask = (torch.arange(cache)[None, None, :] <= at[:, :, None])[:, None]
    assert speed._is_gqa_decode(q, k, mask)
    got = speed._gqa_decode(q, k, v, mask, None)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv), attn_mask=mask)
    assert (got - want.transpose(1, 2)).abs().max().item() < 1e-5
    assert not speed._is_gqa_decode(q, k, None)  # several tokens without a mask: a prefill, causal

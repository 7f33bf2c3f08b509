"""Prompt-lookup speculation for the serving engine: drafts from the row's own prompt and answer, on the device.

    generate.speculate_tokens: 4     # up to 4 drafted tokens per row and step, verified in the same forward

A catalog-aware answer copies a lot: a sibling's template with a code or a capacity changed, the title's words.
Before each step, every greedy row looks its last few tokens up in its own sequence (prompt with its neighbours,
then the answer so far): the longest n-gram (up to `MAX_NGRAM` tokens) that occurred earlier, at its first
occurrence, proposes the tokens that followed it (transformers' prompt-lookup rule, `PromptLookupCandidateGenerator`,
done for all rows at once with a few tensor ops so the engine keeps its step in flight). The verify step feeds each
row its last token and its drafts; the model's choice at each position (after the answer processors, applied as if
the tokens before it had been decoded one at a time) is compared with the draft there, and the row keeps the
agreeing drafts plus the model's own token after them (`accept`). Greedy answers are therefore exactly those of
one-token steps. Sampled rows draft nothing (their one token comes from the first position's distribution,
unchanged), so sampling keeps its distribution without a rejection rule.
"""

from __future__ import annotations

from typing import Any

MAX_NGRAM = 3  # longest suffix looked up; shorter ones are tried when it does not occur


def propose(seq: Any, end: Any, allowed: Any, k: int, max_ngram: int = MAX_NGRAM) -> tuple[Any, Any]:
    """Drafts of up to `k` tokens per row: `seq` [n, width] the rows' tokens (row i's sequence is seq[i, :end[i]+1]),
    `allowed` [n] the most drafts each row may take (0: none). Returns (drafts [n, k], how many are real [n])."""
    import torch

    n, width = seq.shape
    dev = seq.device
    follow = torch.full((n,), -1, dtype=torch.long, device=dev)  # where each row's chosen continuation starts
    for g in range(min(max_ngram, width - 1), 0, -1):
        suffix = seq.gather(1, (end[:, None] - g + 1 + torch.arange(g, device=dev)).clamp(min=0))
        starts = torch.arange(width - g + 1, device=dev)
        hit = (seq.unfold(1, g, 1) == suffix[:, None, :]).all(-1)
        # an earlier occurrence, with at least one token after it inside the sequence, in a sequence of >= g tokens
        hit &= (starts[None, :] + g <= end[:, None]) & (end[:, None] >= g - 1)
        first = torch.where(hit, starts, width).amin(1)
        follow = torch.where((follow < 0) & (first < width), first + g, follow)
    count = torch.minimum((end + 1 - follow).clamp(max=k), allowed)
    count = torch.where(follow >= 0, count, 0).clamp(min=0)
    cols = (follow.clamp(min=0)[:, None] + torch.arange(k, device=dev)).clamp(max=width - 1)
    return seq.gather(1, cols), count


def accept(picked: Any, fed: Any, drafted: Any) -> Any:
    """Tokens each row keeps from a verify step: `picked` [n, w] the model's choice at each position, `fed` [n, w]
    the tokens fed (the row's last token, then its drafts), `drafted` [n] how many drafts are real. A row keeps
    its leading drafts that equal the model's choice before them, then the model's next choice: 1 + accepted."""
    import torch

    w = picked.shape[1]
    if w == 1:
        return torch.ones(picked.shape[0], dtype=torch.long, device=picked.device)
    agree = (picked[:, :-1] == fed[:, 1:]) & (torch.arange(w - 1, device=picked.device) < drafted[:, None])
    return agree.long().cumprod(1).sum(1) + 1

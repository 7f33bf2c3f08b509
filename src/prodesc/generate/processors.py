"""Logits processors for decoding."""

from __future__ import annotations

from typing import Any

from transformers import LogitsProcessor


class AnswerRepetitionPenalty(LogitsProcessor):
    """CTRL-style repetition penalty over the answer's own tokens only.

    Unlike transformers' `RepetitionPenaltyLogitsProcessor` it ignores the prompt (penalising the title's words
    discourages restating the product's attributes) and never touches special tokens: penalising the end-of-turn
    token, already present in the prompt, made fine-tuned models stop far less often (70% -> 47% measured).
    """

    def __init__(self, penalty: float, prompt_width: int, exempt_ids: list[int]) -> None:
        self.penalty, self.prompt_width, self.exempt = penalty, prompt_width, exempt_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        answer = input_ids[:, self.prompt_width :]
        if answer.shape[1] == 0:
            return scores
        seen = torch.gather(scores, 1, answer)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        out = scores.scatter(1, answer, seen)
        if self.exempt:
            ex = torch.tensor(self.exempt, device=scores.device)
            out[:, ex] = scores[:, ex]
        return out

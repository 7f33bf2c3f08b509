"""Logits processors and stopping criteria for decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import LogitsProcessor, StoppingCriteria


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


class StopRows(StoppingCriteria):
    """Ends the rows whose answers nobody wants any more (the server's client left or its deadline passed).

    `stop(i)` is asked after every new token for each row's title index `rows[row]`; a stopped row only gets
    padding from then on, and `generate` returns once every row has stopped, so a call nobody waits for ends
    within a token instead of running to `max_new_tokens`.
    """

    def __init__(self, stop: Callable[[int], bool], rows: Sequence[int]) -> None:
        self.stop, self.rows = stop, list(rows)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = [bool(self.stop(i)) for i in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

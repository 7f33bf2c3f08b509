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
class AnswerNoRepeatNGram(LogitsProcessor):
    """Forbid repeating an n-gram of the answer's own tokens (transformers' `no_repeat_ngram_size`, answer only).

    Hugging Face's processor bans every n-gram of the whole sequence, prompt included: with catalog neighbours in
    the prompt it forbids copying a neighbour's phrase, which is often the right answer. Special tokens are never
    banned. The n-grams are kept per row and extended by one token a step (greedy and sampling keep rows in
    place), instead of recounting the whole answer each step as transformers does.
    """

    def __init__(self, size: int, prompt_width: int, exempt_ids: list[int]) -> None:
        self.n, self.prompt_width, self.exempt = size, prompt_width, set(exempt_ids)
        self.seen: list[dict[tuple[int, ...], set[int]]] = []
        self.answers: list[list[int]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        width = input_ids.shape[1] - self.prompt_width
        if width < self.n - 1 or self.n < 1:
            return scores
        if len(self.answers) != input_ids.shape[0] or (self.answers and len(self.answers[0]) != width - 1):
            self._rebuild(input_ids[:, self.prompt_width :].tolist())  # first call, or not one token further
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                self._add(row, token)
        for row, answer in enumerate(self.answers):
            # the tokens that would complete an n-gram already in the answer (n = 1: any token already there)
            done = self.seen[row].get(tuple(answer[len(answer) - self.n + 1 :]), ()) if self.n > 1 else set(answer)
            banned = [t for t in done if t not in self.exempt]
            if banned:
                scores[row, banned] = -float("inf")
        return scores

    def _rebuild(self, answers: list[list[int]]) -> None:
        self.seen, self.answers = [{} for _ in answers], [[] for _ in answers]
        for row, answer in enumerate(answers):
            for token in answer:
                self._add(row, token)

    def _add(self, row: int, token: int) -> None:
        answer = self.answers[row]
        answer.append(token)
        if self.n > 1 and len(answer) >= self.n:
            gram = answer[-self.n :]
            self.seen[row].setdefault(tuple(gram[:-1]), set()).add(gram[-1])

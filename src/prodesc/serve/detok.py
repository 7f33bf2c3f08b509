"""A streamed answer's text, token by token, at a cost that does not grow with the answer.

    text = IncrementalText(tok)
    piece = text.add(token_id)       # "" while the token only starts a character (or a word piece is pending)
    rest = text.finish()             # at the end: whatever is still held back

Re-decoding the whole answer after every token costs O(length) per token (at 256 tokens, ~40 us each on the
Mistral tokenizer). This keeps two offsets into the ids (the prefix/read-offset method of transformers'
`TextIteratorStreamer` and text-generation-inference): it decodes only the tokens since the last piece plus the
few before them, and sends the difference between the two decodes, so a tokenizer's context-dependent joins
(SentencePiece's leading-space strip, byte-fallback bytes that make one character) come out as in the full decode.
The pieces of an answer, joined, equal `tok.decode(ids, skip_special_tokens=True)` (tests/test_detok.py).
"""

from __future__ import annotations

from typing import Any

CUT = "\ufffd"  # what a character cut mid-bytes decodes to: wait for the next token


class IncrementalText:
    """The text pieces of one answer: `add` each token, `finish` once."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.ids = tok, []
        self.prefix = 0  # ids[prefix:read] were decoded before: their text is the context of the next piece
        self.read = 0  # ids[:read] are sent

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def finish(self) -> str:
        """What is left at the end of the answer, a cut character included (the full decode has it too)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(CUT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

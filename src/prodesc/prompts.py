"""The chat prompt shared by train, generate and serve: one function turns a title into the model's input.

    ids = prompt_ids(tokenizer, "Girls Ballet Tutu Neon Pink", cfg.prompt)
    ids = prompt_ids(tokenizer, title, cfg.prompt, neighbours, chars=700)    # catalog neighbours above the title
    ex = encode_example(tokenizer, title, content, cfg.prompt)   # {"input_ids", "completion_mask"}
    ex, cut = fit_example(tokenizer, title, content, cfg.prompt, max_length=1024, neighbours=nb, chars=700)
    layout = Layout.of(tokenizer, cfg.prompt)    # the template's facts, found once: many examples at a time
    exs, cuts = layout.fit_batch(titles, contents, max_length=1024, neighbours=nbs, chars=700)   # = fit_example's

The tokenizer's own chat template renders the conversation (user turn = instruction with the title, assistant turn
= content). We render text, then tokenize without adding special tokens, so the sequence holds exactly the BOS the
template writes (a template without one gets the tokenizer's BOS once). The completion ends at the assistant's EOS:
anything the template writes after it (ChatML's trailing newline) is cut, so EOS is the last supervised token and
generation stops on it. The end of the answer is the first special token the template writes after it (its
end-of-turn: `<|im_end|>`, `<|eot_id|>`, `</s>`), else the tokenizer's EOS, appended.

Catalog neighbours (retrieval.k > 0) go above the usual instruction in the user turn, each `[i] title` and its
description cut to `chars` characters at a word:

    Similar products in the catalog:
    [1] Girls Ballet Tutu Neon Blue
    A layered tulle tutu for dance practice ...

    Write the product description for this product title.
    Title: Girls Ballet Tutu Neon Pink

`baked_chat_template` wraps the tokenizer's own template so that exported models (`prodesc export`) turn a bare
title into exactly this prompt on any server that renders the template (vLLM, llama.cpp, LM Studio).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from prodesc.config import PromptConfig
from prodesc.errors import ProdescError

INSTRUCTIONS = {
    "en": "Write the product description for this product title.\nTitle: {title}",
    # The notebook's wording (Portuguese): "Generate a description for the product titled ...".
    "pt": "Gere uma descrição para o produto com o título: {title}",
}
NEIGHBOURS_HEADER = {"en": "Similar products in the catalog:", "pt": "Produtos semelhantes no catálogo:"}
# What a chat template reads besides the messages, fixed so that training, generation, serving and exports render
# one prompt: Qwen3 closes an empty thinking block in the prompt (`enable_thinking`: off, a description needs no
# reasoning, and the answer alone is supervised); Llama 3.2 writes today's date into its system header
# (`strftime_now`) unless `date_string` is given, so a run trained one day would be served another prompt the next
# (26 Jul 2024 is the templates' own fallback). Templates that don't read them ignore them.
TEMPLATE_VARS = {"enable_thinking": False, "date_string": "26 Jul 2024"}
Neighbours = Sequence[Mapping[str, Any]]  # each with "title" and "content" (catalog.Catalog.neighbours)


# Prepended to the tokenizer's template. Plain Jinja that HF (vLLM), llama.cpp's engine and LM Studio all run: no
# list.append (HF's sandbox forbids it), a namespace to carry values out of loops, `messages` reassigned at the top.
_BAKE = """\
{#- prodesc: the title sent as the last user message is wrapped in the training instruction -#}
{%- set enable_thinking = @THINKING@ -%}{%- set date_string = @DATE@ -%}
{%- set prodesc_ns = namespace(last=-1, out=[], has_system=false) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}{%- set prodesc_ns.last = loop.index0 -%}{%- endif -%}
  {%- if m['role'] == 'system' -%}{%- set prodesc_ns.has_system = true -%}{%- endif -%}
{%- endfor -%}
{%- if @SYSTEM@ is not none and not prodesc_ns.has_system -%}
  {%- set prodesc_ns.out = [{'role': 'system', 'content': @SYSTEM@}] -%}
{%- endif -%}
{%- for m in messages -%}
  {%- if loop.index0 == prodesc_ns.last and m['content'] is string -%}
    {%- set prodesc_ns.out = prodesc_ns.out + [{'role': 'user', 'content': @PARTS@ | join(m['content'] | trim)}] -%}
  {%- else -%}
    {%- set prodesc_ns.out = prodesc_ns.out + [m] -%}
  {%- endif -%}
{%- endfor -%}
{%- set messages = prodesc_ns.out %}"""  # no `-` at the very end: the original template's leading whitespace stays
_BAKE_START, _BAKE_END = _BAKE.split("\n", 1)[0], "{%- set messages = prodesc_ns.out %}"


def user_text(title: str, cfg: PromptConfig, neighbours: Neighbours = (), chars: int = 0) -> str:
    """The user turn for a title, with its catalog neighbours above the instruction when there are any."""
    template = cfg.instruction or INSTRUCTIONS[cfg.language]
    if "{title}" not in template:
        raise ProdescError("prompt.instruction must contain '{title}': e.g. 'Describe: {title}'")
    text = template.replace("{title}", title.strip())
    if not neighbours:
        return text
    return f"{neighbour_block(neighbours, chars, cfg.language)}\n\n{text}"


def neighbour_block(neighbours: Neighbours, chars: int, language: str = "en") -> str:
    """`[i] title` + the description cut to `chars` characters (0: titles only), one neighbour after another."""
    lines = [NEIGHBOURS_HEADER[language]]
    for i, n in enumerate(neighbours, 1):
        lines.append(f"[{i}] {' '.join(str(n['title']).split())}")
        desc = clip(str(n.get("content") or ""), chars)
        if desc:
            lines.append(desc)
    return "\n".join(lines)


def shown(title: str, neighbours: Neighbours = (), chars: int = 0) -> list[str]:
    """What a prompt shows of a product, as texts: its title, then each neighbour's title and its description as
    `neighbour_block` cuts it (what a statement of the answer may rest on: prodesc/specs.py)."""
    return [title, *(x for n in neighbours for x in (str(n["title"]), clip(str(n.get("content") or ""), chars)))]


def clip(text: str, chars: int) -> str:
    """`text` (whitespace collapsed) cut to at most `chars` characters at a word boundary, with "…" when cut."""
    text = " ".join(text.split())
    if len(text) <= chars:
        return text
    cut = text[: max(chars - 1, 0)]
    space = cut.rfind(" ")
    if space > chars // 2:  # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…" if cut else ""


def messages(
    title: str,
    cfg: PromptConfig,
    tokenizer: Any,
    content: str | None = None,
    neighbours: Neighbours = (),
    chars: int = 0,
) -> list[dict[str, str]]:
    """Chat messages for a title (and its content, for training). The system prompt is folded into the user turn
    for templates that reject a system role (Mistral v0.3 raises on some orders)."""
    user = user_text(title, cfg, neighbours, chars)
    msgs: list[dict[str, str]] = []
    if cfg.system_prompt:
        if supports_system(tokenizer):
            msgs.append({"role": "system", "content": cfg.system_prompt})
        else:
            user = f"{cfg.system_prompt}\n\n{user}"
    msgs.append({"role": "user", "content": user})
    if content is not None:
        msgs.append({"role": "assistant", "content": content.strip()})
    return msgs


def prompt_text(tokenizer: Any, title: str, cfg: PromptConfig, neighbours: Neighbours = (), chars: int = 0) -> str:
    """Rendered prompt text, ending where the assistant's answer starts."""
    return _render(tokenizer, messages(title, cfg, tokenizer, None, neighbours, chars), add_generation_prompt=True)


def prompt_ids(
    tokenizer: Any, title: str, cfg: PromptConfig, neighbours: Neighbours = (), chars: int = 0
) -> list[int]:
    """Token ids of the prompt: what generation feeds the model, identical to the training prefix."""
    return _with_one_bos(tokenizer, _tokenize(tokenizer, prompt_text(tokenizer, title, cfg, neighbours, chars)))


def encode_example(
    tokenizer: Any, title: str, content: str, cfg: PromptConfig, neighbours: Neighbours = (), chars: int = 0
) -> dict[str, list[int]]:
    """Training example: `input_ids` and `completion_mask` (1 on the answer and its end token, 0 on the prompt)."""
    prompt = prompt_text(tokenizer, title, cfg, neighbours, chars)
    full = _render(tokenizer, messages(title, cfg, tokenizer, content, neighbours, chars), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ProdescError(
            "the tokenizer's chat template renders the prompt differently with and without the answer: "
            "set prompt.instruction or use a model with a standard chat template"
        )
    p_ids = _with_one_bos(tokenizer, _tokenize(tokenizer, prompt))
    c_ids = _end_at_stop(tokenizer, _tokenize(tokenizer, full[len(prompt) :]))
    return {"input_ids": p_ids + c_ids, "completion_mask": [0] * len(p_ids) + [1] * len(c_ids)}


def baked_chat_template(tokenizer: Any, cfg: PromptConfig) -> str:
    """The tokenizer's chat template with the training instruction built in: the last user message's content is
    taken as the title and rewritten to `user_text(title)` (plus the run's system prompt) before the original
    template runs, so the model family's own formatting is kept whatever it is. Rendering a bare title gives
    exactly `prompt_text`; the check at the end refuses a template where it would not."""
    original = tokenizer.chat_template
    if not isinstance(original, str) or not original:
        raise ProdescError(
            f"tokenizer of {tokenizer.name_or_path!r} has no single chat template to extend: "
            "use a model whose tokenizer_config.json has one chat_template"
        )
    parts = user_text("\x00", cfg).split("\x00")  # the instruction around (each) {title}
    system = cfg.system_prompt if cfg.system_prompt and supports_system(tokenizer) else None
    if cfg.system_prompt and system is None:
        parts[0] = f"{cfg.system_prompt}\n\n{parts[0]}"  # as `messages` folds it for templates without a system role
    lit = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731 - JSON strings and lists are Jinja literals
    head = _BAKE.replace("@SYSTEM@", lit(system) if system else "none").replace("@PARTS@", lit(parts))
    head = head.replace("@THINKING@", "false").replace("@DATE@", lit(TEMPLATE_VARS["date_string"]))
    baked = head + original
    _check_baked(tokenizer, baked, cfg)
    return baked


def fit_example(
    tokenizer: Any,
    title: str,
    content: str,
    cfg: PromptConfig,
    max_length: int,
    neighbours: Neighbours = (),
    chars: int = 0,
) -> tuple[dict[str, list[int]] | None, dict[str, int]]:
    """`encode_example` within `max_length` tokens, the end token always kept as the last supervised one.

    Neighbours shrink first (the longest description length that fits, down to titles only, then none): the
    answer is what the model learns from, the neighbours only help. Then the answer is cut, its end token kept.
    Returns (example or None when the prompt alone fills max_length, what was cut)."""
    cut = {"neighbour_chars_cut": 0, "neighbours_dropped": 0, "content_tokens_cut": 0, "dropped": 0}
    ex = encode_example(tokenizer, title, content, cfg, neighbours, chars)
    if len(ex["input_ids"]) <= max_length:
        return ex, cut
    if neighbours:
        lo, hi = 0, chars  # largest description length that fits: lengths only grow with chars
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode_example(tokenizer, title, content, cfg, neighbours, mid)["input_ids"]) <= max_length:
                lo = mid
            else:
                hi = mid - 1
        ex = encode_example(tokenizer, title, content, cfg, neighbours, lo)
        cut["neighbour_chars_cut"] = chars - lo
        if len(ex["input_ids"]) <= max_length:
            return ex, cut
        cut["neighbours_dropped"] = len(neighbours)
        ex = encode_example(tokenizer, title, content, cfg)
        if len(ex["input_ids"]) <= max_length:  # the header and titles were what did not fit
            return ex, cut
    prompt_len = ex["completion_mask"].index(1)
    room = max_length - prompt_len
    if room < 2:  # not one answer token besides the end token
        return None, {**cut, "dropped": 1}
    ids = ex["input_ids"]
    cut["content_tokens_cut"] = len(ids) - max_length
    ids = ids[: max_length - 1] + ids[-1:]  # the answer cut, its end token kept
    return {"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * room}, cut


_USER, _ANSWER = "@@PRODESC_USER@@", "@@PRODESC_ANSWER@@"  # placeholders no template rewrites (trim would eat \x1f)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the chat template writes around the user text and around the answer, found once per tokenizer and
    prompt config: examples are then rendered by joining strings and tokenized many at a time, token for token
    what `fit_example` gives (`of` checks that on probes). A template that rewrites the user text or the answer
    leaves `exact` False, and `fit_batch` then calls `fit_example` for each example."""

    tokenizer: Any
    cfg: PromptConfig
    exact: bool
    prompt_parts: tuple[str, ...] = ("", "")  # the rendered prompt is prompt_parts[0] + user text + [1]
    answer_parts: tuple[str, ...] = ("", "")  # what the answer adds: answer_parts[0] + content + [1]
    bos: int | None = None  # the tokenizer's BOS when it adds one: put first when the template wrote none
    rust: bool = False  # tokenize with the fast tokenizer's Rust backend directly (what `tokenizer(...)` calls)

    @classmethod
    def of(cls, tokenizer: Any, cfg: PromptConfig) -> Layout:
        user_text("", cfg)  # a bad instruction is refused here, as per example
        system = bool(cfg.system_prompt) and supports_system(tokenizer)
        fold = f"{cfg.system_prompt}\n\n" if cfg.system_prompt and not system else ""
        msgs = [{"role": "system", "content": cfg.system_prompt}] if system else []
        msgs.append({"role": "user", "content": fold + _USER})
        prompt = _render(tokenizer, msgs, add_generation_prompt=True)
        full = _render(tokenizer, [*msgs, {"role": "assistant", "content": _ANSWER}], add_generation_prompt=False)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        layout = cls(tokenizer, cfg, exact=False, bos=bos if adds_bos else None)
        rest = full[len(prompt) :]
        if prompt.count(_USER) != 1 or not full.startswith(prompt) or rest.count(_ANSWER) != 1:
            return layout
        parts = {"prompt_parts": tuple(prompt.split(_USER)), "answer_parts": tuple(rest.split(_ANSWER))}
        near = [{"title": "Blue  Mug", "content": "A blue mug for tea and coffee."}]
        probes = [("Red Mug", " A red mug.\n", ()), (" Red Mug ", "A red mug…  Ünïcode.", near)]
        slow = [fit_example(tokenizer, title, content, cfg, 1 << 20, nb, 20) for title, content, nb in probes]
        for rust in (hasattr(tokenizer, "backend_tokenizer"), False):  # the backend when it gives the same ids
            fast = dataclasses.replace(layout, exact=True, rust=rust, **parts)
            if fast.fit_batch(*zip(*[p[:2] for p in probes], strict=True), 1 << 20, [p[2] for p in probes], 20) == (
                [ex for ex, _ in slow], [cut for _, cut in slow]
            ):
                return fast
        return layout

    def fit_batch(
        self,
        titles: Sequence[str],
        contents: Sequence[str],
        max_length: int,
        neighbours: Sequence[Neighbours] | None = None,
        chars: int = 0,
    ) -> tuple[list[dict[str, list[int]] | None], list[dict[str, int]]]:
        """`fit_example` of each (title, content, neighbours): the examples (None: dropped) and what each lost."""
        near: Sequence[Neighbours] = neighbours if neighbours is not None else [()] * len(titles)
        if not self.exact:
            pairs = [
                fit_example(self.tokenizer, t, c, self.cfg, max_length, nb, chars)
                for t, c, nb in zip(titles, contents, near, strict=True)
            ]
            return [ex for ex, _ in pairs], [cut for _, cut in pairs]
        users = [user_text(t, self.cfg, nb, chars) for t, nb in zip(titles, near, strict=True)]
        prompts, answers = self._prompt_ids(users), self._answer_ids(contents)
        fitted = [
            self._fit(t, nb, chars, p, c, max_length)
            for t, nb, p, c in zip(titles, near, prompts, answers, strict=True)
        ]
        return [ex for ex, _ in fitted], [cut for _, cut in fitted]

    def _fit(
        self, title: str, near: Neighbours, chars: int, p: list[int], c: list[int], max_length: int
    ) -> tuple[dict[str, list[int]] | None, dict[str, int]]:
        """fit_example's steps on ids: neighbours shrink (the same search), are dropped, then the answer is cut."""
        cut = {"neighbour_chars_cut": 0, "neighbours_dropped": 0, "content_tokens_cut": 0, "dropped": 0}
        if len(p) + len(c) <= max_length:
            return _example(p, c), cut
        if near:
            prompt = lambda n: self._prompt_ids([user_text(title, self.cfg, near, n)])[0]  # noqa: E731
            lo, hi = 0, chars
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(prompt(mid)) + len(c) <= max_length:
                    lo = mid
                else:
                    hi = mid - 1
            p, cut["neighbour_chars_cut"] = prompt(lo), chars - lo
            if len(p) + len(c) <= max_length:
                return _example(p, c), cut
            cut["neighbours_dropped"] = len(near)
            p = self._prompt_ids([user_text(title, self.cfg)])[0]
            if len(p) + len(c) <= max_length:
                return _example(p, c), cut
        room = max_length - len(p)
        if room < 2:  # not one answer token besides the end token
            return None, {**cut, "dropped": 1}
        cut["content_tokens_cut"] = len(p) + len(c) - max_length
        ids = (p + c)[: max_length - 1] + c[-1:]  # the answer cut, its end token kept
        return {"input_ids": ids, "completion_mask": [0] * len(p) + [1] * room}, cut

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.rust:  # skips transformers' per-text conversion: a third of the time on short texts
            backend = self.tokenizer.backend_tokenizer
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: tokenizers >= 0.21
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, users: list[str]) -> list[list[int]]:
        head, tail = self.prompt_parts
        rows = self._ids([head + u + tail for u in users])
        if self.bos is None:
            return rows
        return [ids if ids and ids[0] == self.bos else [self.bos, *ids] for ids in rows]

    def _answer_ids(self, contents: Sequence[str]) -> list[list[int]]:
        head, tail = self.answer_parts
        rows = self._ids([head + c.strip() + tail for c in contents])
        return [_end_at_stop(self.tokenizer, ids) for ids in rows]


@functools.lru_cache(maxsize=16)  # keyed on the tokenizer object: one probe per tokenizer, not per example
def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant answer (None: it writes none)."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "PROBE"}]
    try:
        full = _render(tokenizer, probe, add_generation_prompt=False)
    except ProdescError:
        return None
    tail = full[full.rfind("PROBE") + len("PROBE") :]
    # added special tokens too: Llama-3's <|eot_id|> is not among the named special tokens of a base tokenizer
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    return next((i for i in _tokenize(tokenizer, tail) if i in special), None)


def supports_system(tokenizer: Any) -> bool:
    """Whether the chat template accepts a leading system message followed by a user turn."""
    try:
        out = _render(
            tokenizer,
            [{"role": "system", "content": "SYS-PROBE"}, {"role": "user", "content": "u"}],
            add_generation_prompt=True,
        )
    except Exception:  # jinja raise_exception(...) in the template
        return False
    return "SYS-PROBE" in out


def _check_baked(tokenizer: Any, baked: str, cfg: PromptConfig) -> None:
    title = "Girls Ballet Tutu Neon Pink"
    want = prompt_text(tokenizer, title, cfg)
    got = tokenizer.apply_chat_template(  # no TEMPLATE_VARS: the baked template must set them itself
        [{"role": "user", "content": title}], chat_template=baked, tokenize=False, add_generation_prompt=True
    )
    if got != want:
        raise ProdescError(
            f"the chat template of {tokenizer.name_or_path!r} renders a wrapped title differently from training: "
            "export with --no-merge and send the training prompt yourself"
        )


def _render(tokenizer: Any, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ProdescError(
            f"tokenizer of {tokenizer.name_or_path!r} has no chat template: use an instruct/chat model "
            "or set one in its tokenizer_config.json"
        )
    template = tokenizer.chat_template
    kw = {}
    if isinstance(template, str) and template.startswith(_BAKE_START):  # an export's: prodesc writes the turn itself
        kw["chat_template"] = template.split(_BAKE_END, 1)[1]
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **TEMPLATE_VARS, **kw
    )


def _end_at_stop(tokenizer: Any, c_ids: list[int]) -> list[int]:
    """The answer up to and including its end token: the template's end-of-turn (what follows it, ChatML's
    newline, is cut), else the tokenizer's EOS; appended when the template writes neither."""
    for stop in (end_of_turn_id(tokenizer), tokenizer.eos_token_id):
        if stop is not None and stop in c_ids:
            return c_ids[: len(c_ids) - c_ids[::-1].index(stop)]  # the last one: the answer's text may hold one
    return c_ids + [tokenizer.eos_token_id]


def _example(p_ids: list[int], c_ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": p_ids + c_ids, "completion_mask": [0] * len(p_ids) + [1] * len(c_ids)}


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _with_one_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Templates that don't write a BOS get the tokenizer's BOS once, if it normally adds one."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return ids
    adds_bos = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return [bos] + ids if adds_bos else ids

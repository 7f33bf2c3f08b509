"""The chat prompt shared by train, generate and serve: one function turns a title into the model's input.

    ids = prompt_ids(tokenizer, "Girls Ballet Tutu Neon Pink", cfg.prompt)
    ex = encode_example(tokenizer, title, content, cfg.prompt)   # {"input_ids", "completion_mask"}

The tokenizer's own chat template renders the conversation (user turn = instruction with the title, assistant turn
= content). We render text, then tokenize without adding special tokens, so the sequence holds exactly the BOS the
template writes (a template without one gets the tokenizer's BOS once). The completion ends at the assistant's EOS:
anything the template writes after it (ChatML's trailing newline) is cut, so EOS is the last supervised token and
generation stops on it.

`baked_chat_template` wraps the tokenizer's own template so that exported models (`prodesc export`) turn a bare
title into exactly this prompt on any server that renders the template (vLLM, llama.cpp, LM Studio).
"""

from __future__ import annotations

import json
from typing import Any

from prodesc.config import PromptConfig
from prodesc.errors import ProdescError

INSTRUCTIONS = {
    "en": "Write the product description for this product title.\nTitle: {title}",
    # The notebook's wording (Portuguese): "Generate a description for the product titled ...".
    "pt": "Gere uma descrição para o produto com o título: {title}",
}


# Prepended to the tokenizer's template. Plain Jinja that HF (vLLM), llama.cpp's engine and LM Studio all run: no
# list.append (HF's sandbox forbids it), a namespace to carry values out of loops, `messages` reassigned at the top.
_BAKE = """\
{#- prodesc: the title sent as the last user message is wrapped in the training instruction -#}
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


def user_text(title: str, cfg: PromptConfig) -> str:
    """The user turn for a title."""
    template = cfg.instruction or INSTRUCTIONS[cfg.language]
    if "{title}" not in template:
        raise ProdescError("prompt.instruction must contain '{title}': e.g. 'Describe: {title}'")
    return template.replace("{title}", title.strip())


def messages(
    title: str, cfg: PromptConfig, tokenizer: Any, content: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for a title (and its content, for training). The system prompt is folded into the user turn
    for templates that reject a system role (Mistral v0.3 raises on some orders)."""
    user = user_text(title, cfg)
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


def prompt_text(tokenizer: Any, title: str, cfg: PromptConfig) -> str:
    """Rendered prompt text, ending where the assistant's answer starts."""
    return _render(tokenizer, messages(title, cfg, tokenizer), add_generation_prompt=True)


def prompt_ids(tokenizer: Any, title: str, cfg: PromptConfig) -> list[int]:
    """Token ids of the prompt: what generation feeds the model, identical to the training prefix."""
    return _with_one_bos(tokenizer, _tokenize(tokenizer, prompt_text(tokenizer, title, cfg)))


def encode_example(tokenizer: Any, title: str, content: str, cfg: PromptConfig) -> dict[str, list[int]]:
    """Training example: `input_ids` and `completion_mask` (1 on the answer and its EOS, 0 on the prompt)."""
    prompt = prompt_text(tokenizer, title, cfg)
    full = _render(tokenizer, messages(title, cfg, tokenizer, content), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ProdescError(
            "the tokenizer's chat template renders the prompt differently with and without the answer: "
            "set prompt.instruction or use a model with a standard chat template"
        )
    p_ids = _with_one_bos(tokenizer, _tokenize(tokenizer, prompt))
    c_ids = _tokenize(tokenizer, full[len(prompt) :])
    eos = tokenizer.eos_token_id
    if eos in c_ids:
        c_ids = c_ids[: len(c_ids) - c_ids[::-1].index(eos)]  # cut what follows the last EOS
    else:
        c_ids = c_ids + [eos]
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
    baked = head + original
    _check_baked(tokenizer, baked, cfg)
    return baked


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
    got = tokenizer.apply_chat_template(
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
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _with_one_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Templates that don't write a BOS get the tokenizer's BOS once, if it normally adds one."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return ids
    adds_bos = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return [bos] + ids if adds_bos else ids

"""The chat prompt shared by train, generate and serve: one function turns a title into the model's input.

    ids = prompt_ids(tokenizer, "Girls Ballet Tutu Neon Pink", cfg.prompt)
    ex = encode_example(tokenizer, title, content, cfg.prompt)   # {"input_ids", "completion_mask"}

The tokenizer's own chat template renders the conversation (user turn = instruction with the title, assistant turn
= content). We render text, then tokenize without adding special tokens, so the sequence holds exactly the BOS the
template writes (a template without one gets the tokenizer's BOS once). The completion ends at the assistant's EOS:
anything the template writes after it (ChatML's trailing newline) is cut, so EOS is the last supervised token and
generation stops on it.
"""

from __future__ import annotations

from typing import Any

from prodesc.config import PromptConfig
from prodesc.errors import ProdescError

INSTRUCTIONS = {
    "en": "Write the product description for this product title.\nTitle: {title}",
    # The notebook's wording (Portuguese): "Generate a description for the product titled ...".
    "pt": "Gere uma descrição para o produto com o título: {title}",
}


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

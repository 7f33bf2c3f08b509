"""The Ollama Modelfile written beside an exported GGUF: prompt template, stop tokens and the run's decoding settings.

    ollama create smol -f exports/smol-gguf/Modelfile && ollama run smol "Girls Ballet Tutu Neon Pink"

Ollama templates are Go templates, not Jinja, so the template is not translated from the model family's Jinja:
it is the training prompt itself, rendered by the baked chat template with a placeholder where the title goes
(`{{ .Prompt }}`, the user's message). A description model is single-turn, so one turn is all it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prodesc.config import ProdescConfig

_TITLE, _ANSWER = "\x00TITLE\x00", "\x00ANSWER\x00"


def write(out_dir: Path, gguf_name: str, merged: Path, cfg: ProdescConfig, run_name: str) -> Path:
    """Write `out_dir/Modelfile` for `gguf_name`, converted from the merged checkpoint `merged` (whose tokenizer
    carries the baked chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    lines = [
        f"# Ollama Modelfile for the prodesc run {run_name!r} (base: {cfg.model.name})",
        f"#   ollama create {run_name} -f Modelfile && ollama run {run_name} \"Girls Ballet Tutu Neon Pink\"",
        "# Send the bare product title: the template adds the instruction the model was trained with.",
        *([f"# This run was trained with {cfg.retrieval.k} catalog neighbours above each title; a GGUF carries no "
           "catalog, so its prompts hold the title alone and answers lose what the neighbours gave (not measured). "
           "`prodesc serve --run` or an `--format hf` export keep them."]
          if cfg.retrieval.k else []),
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template(tokenizer, _adds_bos(out_dir / gguf_name))}"""',
        *(f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tokenizer, merged)),
        *parameters(cfg),
    ]
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def template(tokenizer: Any, runtime_adds_bos: bool) -> str:
    """The Go template: the training prompt with `{{ .Prompt }}` for the title, then the answer and its end."""
    user = [{"role": "user", "content": _TITLE}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": _ANSWER}], tokenize=False, add_generation_prompt=False
    )
    # what the template writes after the answer, up to its end-of-turn token (ChatML's and Gemma's trailing "\n"
    # is cut; Gemma's end of turn is not its EOS)
    end = full.split(_ANSWER, 1)[1] if _ANSWER in full else tokenizer.eos_token
    stops = [s for s in (_end_of_turn(tokenizer), tokenizer.eos_token) if s and s in end]
    if stops:
        first = min(stops, key=end.index)
        end = end[: end.index(first) + len(first)]
    bos = tokenizer.bos_token
    if runtime_adds_bos and bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]  # llama.cpp adds BOS itself: written twice, the model would see two
    go = lambda s: s.replace("{{", '{{ "{{" }}')  # noqa: E731 - literal text must not open a Go action
    return go(prompt).replace(_TITLE, "{{ .Prompt }}") + "{{ .Response }}" + go(end)


def stop_tokens(tokenizer: Any, merged: Path) -> list[str]:
    """End-of-turn tokens: the tokenizer's EOS, the chat template's end of turn and those the checkpoint's
    generation_config.json lists."""
    stops = [tokenizer.eos_token, _end_of_turn(tokenizer)]
    gen = merged / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id") or []
        stops += tokenizer.convert_ids_to_tokens(ids if isinstance(ids, list) else [ids])
    return list(dict.fromkeys(s for s in stops if s))


def parameters(cfg: ProdescConfig) -> list[str]:
    """The decoding settings the run was evaluated with (its `generate:` section), in Ollama's names."""
    g = cfg.generate
    lines = [
        f"PARAMETER temperature {g.temperature:g}",
        f"PARAMETER top_p {g.top_p:g}",
        f"PARAMETER num_predict {g.max_new_tokens}",
    ]
    if g.repetition_penalty != 1.0:
        # a window as long as the longest answer. Unlike prodesc, llama.cpp also counts the prompt's tokens
        # (title words, the end-of-turn token after the instruction), so answers may stop a little later.
        lines += [f"PARAMETER repeat_penalty {g.repetition_penalty:g}", f"PARAMETER repeat_last_n {g.max_new_tokens}"]
    missing = {
        "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "stop_boost_after": g.stop_boost_after,
        "stop_bias": g.stop_bias,
    }
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        lines.append(
            "# not expressible in Ollama (prodesc-only decoding; expect more repetition than in the eval): "
            + ", ".join(f"generate.{k}={v}" for k, v in missing.items())
        )
    return lines


def _end_of_turn(tokenizer: Any) -> str | None:
    from prodesc.prompts import end_of_turn_id

    eot = end_of_turn_id(tokenizer)
    return tokenizer.convert_ids_to_tokens(eot) if eot is not None else None


def _adds_bos(gguf_path: Path) -> bool:
    """Whether llama.cpp prepends BOS when it tokenizes a prompt of this GGUF (`tokenizer.ggml.add_bos_token`)."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False

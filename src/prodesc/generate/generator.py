"""`prodesc generate`: batched generation from a run (base + adapter) or a plain model.

    prodesc generate --run runs/smol "Girls Ballet Tutu Neon Pink" "Mog's Kittens"
    prodesc generate --run runs/smol --data demo/data --split test --out preds.jsonl
    prodesc generate --model embedded:smollm2-135m --input titles.txt          # the untuned model
    prodesc generate --run runs/smol --base --data demo/data --out base.jsonl   # the run's base, same prompts

Prompts are built by `prompts.prompt_ids`, the same function training used, left-padded, sorted by length so a
batch wastes little padding, greedy unless temperature > 0, and stop at any stop id (`models.stop_ids`: the
generation config's EOS ids and the template's end-of-turn). A run trained with retrieval.k > 0 puts each title's
k nearest catalog items (RUN/catalog/) in its prompt; titles of a prepared data dir with an index (`prodesc data
index`) are looked up there instead of embedded. Each output line holds `title`, `prediction`, `reference` (when
known), `n_tokens`, `stopped_by_eos` (stopped on any stop id), `latency_ms` (wall time of the batch call) and, with
neighbours, `neighbours` (uid, title, score of each).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prodesc import config as configmod
from prodesc import models, prompts
from prodesc.catalog import CATALOG_DIR, Catalog
from prodesc.config import GenerateConfig, ProdescConfig
from prodesc.errors import ProdescError
from prodesc.generate import fast
from prodesc.records import read_split, write_jsonl
from prodesc.rundir import read_manifest


class Generator:
    """A loaded model + tokenizer + prompt settings; `describe(titles)` → prediction records."""

    def __init__(
        self, model: Any, tokenizer: Any, cfg: ProdescConfig, name: str, catalog: Catalog | None = None
    ) -> None:
        self.model, self.tok, self.cfg, self.name, self.catalog = model, tokenizer, cfg, name, catalog
        self.tok.padding_side = "left"  # decoder-only batches grow on the right
        self.stop_ids = models.stop_ids(tokenizer, model)
        self.exempt = sorted({i for i in [*tokenizer.all_special_ids, *self.stop_ids] if i is not None})

    @classmethod
    def from_run(cls, run: Path, overrides: list[str] = (), merge: bool | None = None) -> Generator:
        """Base model from the run's manifest + its adapter. `merge` folds LoRA into the weights (default: on
        GPU for unquantized models, where it saves the adapter's extra matmuls on every token)."""
        from peft import PeftModel

        cfg = configmod.load(run / "config.yaml", overrides) if (run / "config.yaml").exists() else None
        if cfg is None:
            raise ProdescError(f"{run}/config.yaml missing: pass the --out dir of a finished `prodesc train`")
        catalog = _catalog(run / CATALOG_DIR, cfg, run.name)  # before the weights: a missing index fails fast
        base = read_manifest(run)["base_model"]
        path = str(run / base["path"]) if base.get("path") else None
        model, _ = models.load(cfg.model, path=path)
        tok = models.load_tokenizer(str(run / "adapter"))
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
        if merge if merge is not None else _gpu_unquantized(model):
            model = model.merge_and_unload()
        model.eval()
        return cls(model, tok, cfg, name=f"{run.name}", catalog=catalog)

    @classmethod
    def from_model(cls, name: str, adapter: Path | None = None, overrides: list[str] = ()) -> Generator:
        """A plain model (Hub id, dir, embedded:...) with an optional PEFT adapter dir. A merged export of a run
        with neighbours (`prodesc export`) brings its catalog and its prompt and retrieval settings."""
        exported = _export_settings(Path(name))
        cfg = configmod.load(None, [f"model.name={name}", *exported, *overrides])
        catalog = _catalog(Path(name) / CATALOG_DIR, cfg, name)
        model, tok = models.load(cfg.model)
        if adapter is not None:
            from peft import PeftModel

            if not (adapter / "adapter_config.json").exists():
                raise ProdescError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        return cls(model, tok, cfg, name=name, catalog=catalog)

    @staticmethod
    def catalog_of(run: Path, cfg: ProdescConfig) -> Catalog | None:
        """A run's catalog (None for runs without neighbours), without loading the model."""
        return _catalog(run / CATALOG_DIR, cfg, run.name)

    def use_data_index(self, data: Path | None) -> None:
        """Look the titles of a prepared data dir up in its index (`prodesc data index`) instead of embedding them."""
        if self.catalog is not None:
            self.catalog.use_data_index(data)

    def describe(
        self,
        titles: list[str],
        gen: GenerateConfig | None = None,
        progress: bool = False,
        adapter: bool = True,
    ) -> list[dict[str, Any]]:
        """Generate a description per title (order kept). `adapter=False` runs the base model of a PEFT model."""
        gen = gen or self.cfg.generate
        near = self.neighbours(titles)
        order = sorted(range(len(titles)), key=lambda i: -len(titles[i]))  # similar lengths share a batch
        results: dict[int, dict[str, Any]] = {}
        bar = _progress(len(titles), progress)
        for start in range(0, len(order), gen.batch_size):
            idx = order[start : start + gen.batch_size]
            batch = self._batch([titles[i] for i in idx], [near[i] for i in idx], gen, adapter)
            for i, rec in zip(idx, batch, strict=True):
                results[i] = rec
            bar.update(len(idx))
        bar.close()
        return [results[i] for i in range(len(titles))]

    def neighbours(self, titles: list[str]) -> list[list[dict[str, Any]]]:
        """Each title's retrieval.k nearest catalog items ([] each when k = 0)."""
        k = self.cfg.retrieval.k
        if k and self.catalog is None:
            raise ProdescError(_no_catalog(self.name, k))
        return self.catalog.neighbours(titles, k) if k else [[] for _ in titles]

    def stream(self, title: str, gen: GenerateConfig | None = None, adapter: bool = True) -> Iterator[str]:
        """Yield the description of one title piece by piece (for the server's streaming answers).
        `adapter=False` streams the base model's answer of a PEFT model."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        gen = gen or self.cfg.generate
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        inputs = self._encode([title])
        kwargs = dict(**inputs, **self._gen_kwargs(gen, inputs["input_ids"].shape[1]), streamer=streamer)
        kwargs["use_adapter"] = adapter
        thread = Thread(target=self._run_generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()

    def _batch(
        self, titles: list[str], near: list[list[dict]], gen: GenerateConfig, adapter: bool
    ) -> list[dict[str, Any]]:
        import contextlib

        import torch

        compiled = fast.fast_generation_enabled(self.model)  # CUDA, unquantized: static cache + compiled decode
        fill = fast.batch_bucket(len(titles), gen.batch_size) - len(titles) if compiled else 0
        inputs = self._encode(titles + titles[-1:] * fill, near + near[-1:] * fill)  # few shapes, each compiled once
        width = inputs["input_ids"].shape[1]
        kwargs = self._gen_kwargs(gen, width)
        if compiled:
            kwargs.update(fast.generation_kwargs(self.model, width, gen.max_new_tokens))
        no_adapter = getattr(self.model, "disable_adapter", None)
        ctx = no_adapter() if (not adapter and no_adapter) else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx, torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        ms = (time.perf_counter() - t0) * 1000
        rows = out[: len(titles)]
        return [self._record(t, row[width:].tolist(), ms, nb) for t, row, nb in zip(titles, rows, near, strict=True)]

    def prompt_ids(self, title: str, near: list[dict] | None = None) -> list[int]:
        """The prompt of one title, its neighbours included (looked up when not given)."""
        near = self.neighbours([title])[0] if near is None else near
        return prompts.prompt_ids(self.tok, title, self.cfg.prompt, near, self.cfg.retrieval.chars)

    def _encode(self, titles: list[str], near: list[list[dict]] | None = None) -> dict[str, Any]:
        near = self.neighbours(titles) if near is None else near
        ids = [self.prompt_ids(t, nb) for t, nb in zip(titles, near, strict=True)]
        batch = self.tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _gen_kwargs(self, gen: GenerateConfig, prompt_width: int) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        from prodesc.generate.processors import AnswerNoRepeatNGram, AnswerRepetitionPenalty

        kw: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.stop_ids,  # every stop id, not only the tokenizer's EOS
            do_sample=gen.temperature > 0,
        )
        if gen.temperature > 0:
            kw.update(temperature=gen.temperature, top_p=gen.top_p)
        if gen.stop_boost_after:
            kw["exponential_decay_length_penalty"] = (gen.stop_boost_after, 1.05)
        # Both count the answer only: the prompt's words (a neighbour's phrase, the title) stay free to copy.
        processors = []
        if gen.repetition_penalty != 1.0:
            processors.append(AnswerRepetitionPenalty(gen.repetition_penalty, prompt_width, self.exempt))
        if gen.no_repeat_ngram_size:
            processors.append(AnswerNoRepeatNGram(gen.no_repeat_ngram_size, prompt_width, self.exempt))
        if processors:
            kw["logits_processor"] = LogitsProcessorList(processors)
        return kw

    def _run_generate(self, use_adapter: bool = True, **kwargs: Any) -> None:
        import contextlib

        import torch

        no_adapter = getattr(self.model, "disable_adapter", None)
        ctx = no_adapter() if (not use_adapter and no_adapter) else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            self.model.generate(**kwargs)

    def _record(self, title: str, new_ids: list[int], ms: float, near: list[dict]) -> dict[str, Any]:
        stops, pad = set(self.stop_ids), self.tok.pad_token_id
        end = next((i for i, t in enumerate(new_ids) if t in stops), None)
        stopped = end is not None
        if stopped:
            new_ids = new_ids[:end]
        new_ids = [i for i in new_ids if i != pad]
        text = self.tok.decode(new_ids, skip_special_tokens=True).strip()
        rec = {
            "title": title,
            "prediction": text,
            "n_tokens": len(new_ids) + int(stopped),
            "stopped_by_eos": stopped,
            "latency_ms": round(ms, 1),
        }
        if self.cfg.retrieval.k:
            rec["neighbours"] = [{"uid": n["uid"], "title": n["title"], "score": n["score"]} for n in near]
        return rec


def generate_cli(
    titles: list[str],
    run: Path | None,
    model: str | None,
    adapter: Path | None,
    input: Path | None,
    data: Path | None,
    split: str,
    limit: int | None,
    out: Path | None,
    config: Path | None,
    overrides: list[str],
    base: bool = False,
) -> list[dict[str, Any]]:
    """The `prodesc generate` verb: check the arguments, load once, describe, print or write JSONL."""
    items = _items(titles, input, data, split, limit)
    if (run is None) == (model is None):
        raise ProdescError("pass exactly one of --run RUN_DIR or --model MODEL")
    if base and run is None:
        raise ProdescError("--base runs a run's base model with its prompts: pass --run RUN_DIR (or --model alone)")
    if config is not None:
        overrides = [*_as_overrides(configmod.load(config)), *overrides]
    if run is not None:  # --base: unmerged, so the adapter can be switched off
        gen = Generator.from_run(run, overrides, merge=False if base else None)
    else:
        gen = Generator.from_model(model, adapter, overrides)
    gen.use_data_index(data)
    records = gen.describe([it["title"] for it in items], progress=out is not None, adapter=not base)
    for rec, it in zip(records, items, strict=True):
        if it.get("reference") is not None:
            rec["reference"] = it["reference"]
    if out is not None:
        write_jsonl(records, out)
        print(f"wrote {len(records)} predictions to {out}")
    if titles or out is None:
        for rec in records:
            print(f"\n# {rec['title']}\n{rec['prediction']}")
    return records


def _items(
    titles: list[str], input: Path | None, data: Path | None, split: str, limit: int | None
) -> list[dict[str, Any]]:
    sources = sum(bool(x) for x in (titles, input, data))
    if sources != 1:
        raise ProdescError(
            "give titles in exactly one way: TITLE arguments, --input FILE, or --data DIR --split"
        )
    if titles:
        items = [{"title": t} for t in titles]
    elif input is not None:
        items = _read_input(input)
    else:
        items = [{"title": r["title"], "reference": r["content"]} for r in read_split(data, split)]
    items = items[:limit] if limit else items
    empty = [i for i, it in enumerate(items) if not str(it["title"]).strip()]
    if empty:
        raise ProdescError(f"empty title at item {empty[0] + 1}: remove it or give a title")
    return items


def _read_input(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ProdescError(f"input file not found: {path}")
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                items.append({"title": line.strip()})
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ProdescError(
                    f"{path}:{n}: not valid JSON; one object per line with a 'title'"
                ) from None
            if "title" not in obj:
                raise ProdescError(f"{path}:{n}: no 'title' field; one object per line with a 'title'")
            items.append({"title": obj["title"], "reference": obj.get("reference", obj.get("content"))})
    if not items:
        raise ProdescError(f"{path} holds no titles")
    return items


def _as_overrides(cfg: ProdescConfig) -> list[str]:
    return [f"generate.{k}={json.dumps(v)}" for k, v in cfg.generate.model_dump().items()]


def _catalog(path: Path, cfg: ProdescConfig, name: str) -> Catalog | None:
    """The catalog a model with neighbours needs (None for k = 0); a missing one fails before any weights load."""
    if not cfg.retrieval.k:
        return None
    if not (path / "meta.json").exists():
        raise ProdescError(_no_catalog(name, cfg.retrieval.k))
    return Catalog.load(path, cfg.retrieval)


def _no_catalog(name: str, k: int) -> str:
    return (
        f"retrieval.k={k} but {name} has no catalog index ({CATALOG_DIR}/): train it with retrieval.k > 0, "
        "or set retrieval.k=0"
    )


def _export_settings(path: Path) -> list[str]:
    """A merged export's prompt and retrieval settings (`prodesc export` writes them), as overrides."""
    meta = path / "prodesc_export.json"
    if not meta.is_file():
        return []
    saved = json.loads(meta.read_text())
    sections = ("prompt", "retrieval")
    return [f"{sec}.{k}={json.dumps(v)}" for sec in sections for k, v in saved.get(sec, {}).items()]


def _gpu_unquantized(model: Any) -> bool:
    import torch

    return torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled or total < 2, file=sys.stderr, unit="title")

"""`prodesc generate`: batched generation from a run (base + adapter) or a plain model.

    prodesc generate --run runs/smol "Girls Ballet Tutu Neon Pink" "Mog's Kittens"
    prodesc generate --run runs/smol --data demo/data --split test --out preds.jsonl
    prodesc generate --model embedded:smollm2-135m --input titles.txt          # the untuned model

Prompts are built by `prompts.prompt_ids`, the same function training used, left-padded, sorted by length so a
batch wastes little padding, greedy unless temperature > 0, and stop at EOS. Each output line holds `title`,
`prediction`, `reference` (when known), `n_tokens`, `stopped_by_eos`, `latency_ms` (wall time of the batch call).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prodesc import config as configmod
from prodesc import models, prompts, rundir
from prodesc.config import MIN_SAMPLING_TEMPERATURE, GenerateConfig, ProdescConfig
from prodesc.data import check_overlap
from prodesc.errors import ProdescError
from prodesc.generate import fast, stream
from prodesc.generate.fast import batch_bucket
from prodesc.rundir import read_manifest


class Generator:
    """A loaded model + tokenizer + prompt settings; `describe(titles)` → prediction records."""

    def __init__(self, model: Any, tokenizer: Any, cfg: ProdescConfig, name: str) -> None:
        self.model, self.tok, self.cfg, self.name = model, tokenizer, cfg, name
        self.tok.padding_side = "left"  # decoder-only batches grow on the right
        self.exempt = sorted({i for i in tokenizer.all_special_ids if i is not None})

    @classmethod
    def from_run(cls, run: Path, cfg: ProdescConfig | None = None, merge: bool | None = None) -> Generator:
        """Base model from the run's manifest + its adapter, with the run's resolved settings unless `cfg` is given
        (resolve it with `rundir.settings`). `merge` folds LoRA into the weights (default: on GPU for unquantized
        models, where it saves the adapter's extra matmuls on every token)."""
        from peft import PeftModel

        cfg = cfg or rundir.settings(run)
        base = read_manifest(run)["base_model"]
        path = str(run / base["path"]) if base.get("path") else None
        model, _ = models.load(cfg.model, path=path, decode=cfg.generate.compile)
        tok = models.load_tokenizer(str(run / "adapter"))
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
        if merge if merge is not None else _gpu_unquantized(model):
            model = model.merge_and_unload()
        model.eval()
        return cls(model, tok, cfg, name=f"{run.name}")

    @classmethod
    def base_of_run(cls, run: Path, cfg: ProdescConfig | None = None) -> Generator:
        """The run's base model alone (no adapter), with the run's tokenizer and prompt: `prodesc serve`'s
        `<name>-base`, loaded as a second copy beside the merged fine-tuned model."""
        cfg = cfg or rundir.settings(run)
        base = read_manifest(run)["base_model"]
        path = str(run / base["path"]) if base.get("path") else None
        model, _ = models.load(cfg.model, path=path, decode=cfg.generate.compile)
        model.eval()
        return cls(model, models.load_tokenizer(str(run / "adapter")), cfg, name=f"{run.name}-base")

    @classmethod
    def from_model(cls, name: str, adapter: Path | None = None, cfg: ProdescConfig | None = None) -> Generator:
        """A plain model (Hub id, dir, embedded:...) with an optional PEFT adapter dir."""
        cfg = cfg or configmod.resolve(flags={"model.name": name})
        if adapter is not None and not (adapter / "adapter_config.json").exists():
            raise ProdescError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
        model, tok = models.load(cfg.model, decode=cfg.generate.compile)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        return cls(model, tok, cfg, name=name)

    def prompt_ids(self, title: str) -> list[int]:
        """The prompt the model is given for a title (the same function training used)."""
        return prompts.prompt_ids(self.tok, title, self.cfg.prompt)

    def engine(self, slots: int, cache_len: int) -> Any:
        """A continuous-batching engine on this model (`prodesc serve`): `slots` rows at once, each with room for
        `cache_len` prompt + answer tokens; decode steps as CUDA graphs where the fast path applies."""
        from prodesc.generate.continuous import Engine

        on_cuda = getattr(self.model, "device", None) is not None and self.model.device.type == "cuda"
        graphs = on_cuda and fast.fast_generation_enabled(self.model, self.cfg.generate.compile)
        return Engine(self.model, self.tok, self.cfg.generate, slots, cache_len, graphs=graphs)

    def describe(
        self,
        titles: list[str],
        gen: GenerateConfig | None = None,
        progress: bool = False,
        adapter: bool = True,
        stop: Callable[[int], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate a description per title (order kept). `adapter=False` runs the base model of a PEFT model.
        `stop(i)`, asked after every token, ends title i's answer early (the server: its client left)."""
        gen = gen or self.cfg.generate
        order = sorted(range(len(titles)), key=lambda i: -len(titles[i]))  # similar lengths share a batch
        results: dict[int, dict[str, Any]] = {}
        bar = _progress(len(titles), progress)
        for start in range(0, len(order), gen.batch_size):
            idx = order[start : start + gen.batch_size]
            for i, rec in zip(idx, self._batch([titles[i] for i in idx], gen, adapter, stop, idx), strict=True):
                results[i] = rec
            bar.update(len(idx))
        bar.close()
        return [results[i] for i in range(len(titles))]

    def stream(self, title: str, gen: GenerateConfig | None = None, adapter: bool = True,
               stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield the description of one title piece by piece (for the server's streaming answers).
        `adapter=False` streams the base model's answer of a PEFT model; `stop()`, asked after every token, ends
        it early. Generation runs in a thread that never outlives this iterator: closing the iterator stops it
        within a token and waits for it, so the model is free for the next caller, and its error is re-raised."""
        from threading import Event, Thread

        from transformers import TextIteratorStreamer

        gen = gen or self.cfg.generate
        closed = Event()
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        inputs = self._encode([title])
        width = inputs["input_ids"].shape[1]
        ended = (lambda _: closed.is_set() or stop()) if stop is not None else (lambda _: closed.is_set())
        kwargs = dict(**inputs, **self._gen_kwargs(gen, width, ended, [0]), streamer=streamer)
        failed: list[BaseException] = []
        thread = Thread(target=self._generate_into, args=(streamer, failed, adapter, kwargs), daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            closed.set()
            thread.join()
        if failed:
            raise failed[0]

    def _batch(self, titles: list[str], gen: GenerateConfig, adapter: bool,
               stop: Callable[[int], bool] | None, rows: list[int]) -> list[dict[str, Any]]:
        import contextlib

        import torch

        compiled = fast.fast_generation_enabled(self.model, gen.compile)  # static cache + compiled decode
        fill = batch_bucket(len(titles), gen.batch_size) - len(titles) if compiled else 0
        inputs = self._encode(titles + titles[-1:] * fill)  # a few batch shapes, each compiled once
        width = inputs["input_ids"].shape[1]
        kwargs = self._gen_kwargs(gen, width, stop, rows + rows[-1:] * fill)
        if compiled:
            kwargs.update(fast.generation_kwargs(self.model, width, gen.max_new_tokens, gen.compile))
        no_adapter = getattr(self.model, "disable_adapter", None)
        ctx = no_adapter() if (not adapter and no_adapter) else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx, torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        ms = (time.perf_counter() - t0) * 1000
        return [self._record(t, row[width:].tolist(), ms) for t, row in zip(titles, out[: len(titles)], strict=True)]

    def _encode(self, titles: list[str]) -> dict[str, Any]:
        ids = [prompts.prompt_ids(self.tok, t, self.cfg.prompt) for t in titles]
        batch = self.tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _gen_kwargs(self, gen: GenerateConfig, prompt_width: int, stop: Callable[[int], bool] | None = None,
                    rows: list[int] = ()) -> dict[str, Any]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        sample = gen.temperature >= MIN_SAMPLING_TEMPERATURE  # smaller ones overflow to a NaN distribution
        kw: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
            do_sample=sample,
        )
        if sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p)
        if stop is not None:
            from prodesc.generate.processors import StopRows

            kw["stopping_criteria"] = StoppingCriteriaList([StopRows(stop, rows)])
        if gen.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
        if gen.stop_boost_after:
            kw["exponential_decay_length_penalty"] = (gen.stop_boost_after, 1.05)
        if gen.repetition_penalty != 1.0:
            from prodesc.generate.processors import AnswerRepetitionPenalty

            kw["logits_processor"] = LogitsProcessorList(
                [AnswerRepetitionPenalty(gen.repetition_penalty, prompt_width, self.exempt)]
            )
        return kw

    def _generate_into(self, streamer: Any, failed: list[BaseException], adapter: bool,
                       kwargs: dict[str, Any]) -> None:
        """The stream's generation thread. On an error it ends the stream itself (generate only ends it on
        success), so the reader is never left waiting for text that will not come."""
        import contextlib

        import torch

        no_adapter = getattr(self.model, "disable_adapter", None)
        ctx = no_adapter() if (not adapter and no_adapter) else contextlib.nullcontext()
        try:
            with ctx, torch.inference_mode():
                self.model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which re-raises it
            failed.append(e)
            streamer.end()

    def _record(self, title: str, new_ids: list[int], ms: float) -> dict[str, Any]:
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        stopped = eos in new_ids
        if stopped:
            new_ids = new_ids[: new_ids.index(eos)]
        new_ids = [i for i in new_ids if i != pad]
        text = self.tok.decode(new_ids, skip_special_tokens=True).strip()
        return {
            "title": title,
            "prediction": text,
            "n_tokens": len(new_ids) + int(stopped),
            "stopped_by_eos": stopped,
            "latency_ms": round(ms, 1),
        }


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
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    allow_overlap: bool = False,
) -> int:
    """The `prodesc generate` verb: check the arguments, settings and items, load once, then describe: TITLE
    arguments to the terminal; `--input`/`--data` a chunk at a time to `--out` (stream.py), or the terminal."""
    if sum(bool(x) for x in (titles, input, data)) != 1:
        raise ProdescError("give titles in exactly one way: TITLE arguments, --input FILE, or --data DIR --split")
    if (run is None) == (model is None):
        raise ProdescError("pass exactly one of --run RUN_DIR or --model MODEL")
    if resume and out is None:
        raise ProdescError("--resume continues an --out file: pass --out FILE")
    if titles:
        if any(not t.strip() for t in titles):
            raise ProdescError("an empty TITLE argument: give a product title")
        items, total = (lambda: iter([{"title": t} for t in titles[:limit]])), len(titles[:limit])
    else:
        items, total = stream.item_source(input, data, split, limit)
    if data is not None and run is not None:  # a split of prepared data: were these items trained on?
        check_overlap(run, [{"title": x["title"], "content": x["reference"]} for x in items()], allow_overlap)
    flags = {**(flags or {}), **({"model.name": model} if model else {})}
    cfg = rundir.settings(run, config, flags, sets)
    done = stream.resume_point(out, items, resume) if out is not None else 0
    gen = Generator.from_run(run, cfg) if run else Generator.from_model(model, adapter, cfg)
    if out is not None:
        n = stream.generate_to_file(gen.describe, items, total, out, chunk=cfg.generate.write_every, done=done)
        print(f"{out}: {n} predictions")
        return n
    for rec in gen.describe([x["title"] for x in items()], progress=total > 1):
        print(f"\n# {rec['title']}\n{rec['prediction']}")
    return total


def _gpu_unquantized(model: Any) -> bool:
    import torch

    return torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled or total < 2, file=sys.stderr, unit="title")

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prodesc import models, prompts, rundir, specs
from prodesc.catalog import CATALOG_DIR, Catalog
from prodesc.config import MIN_SAMPLING_TEMPERATURE, GenerateConfig, ProdescConfig
from prodesc.data import check_overlap
from prodesc.errors import ProdescError
from prodesc.generate import fast, stream
from prodesc.generate.fast import batch_bucket
from prodesc.records import check_title
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
        self._engine: tuple[Any, Any] | None = None  # describe's engine when speculating: (settings, Engine)
        # drafted tokens verified, drafts kept, and row-steps that verified, over describe's calls (speculating)
        self.speculation = {"drafted": 0, "accepted": 0, "verify_rows": 0}

    @classmethod
    def from_run(cls, run: Path, cfg: ProdescConfig | None = None, merge: bool | None = None) -> Generator:
        """Base model from the run's manifest + its adapter, with the run's resolved settings unless `cfg` is given
        (resolve it with `rundir.settings`). `merge` folds LoRA into the weights (default: on GPU for unquantized
        models, where it saves the adapter's extra matmuls on every token)."""
        from peft import PeftModel

        cfg = rundir.with_length_prior(cfg, run) if cfg else rundir.settings(run)
        catalog = _catalog(run / CATALOG_DIR, cfg, run.name)  # before the weights: a missing index fails fast
        model = PeftModel.from_pretrained(_run_base(run, cfg), str(run / "adapter"))
        tok = models.load_tokenizer(str(run / "adapter"))
        if merge and _quantized(model):  # merging into nf4 rounds the LoRA update away: not the evaluated model
            print("note: a QLoRA run serves its adapter unmerged on the nf4 base, as generate and eval run it (merged "
                  "weights: `prodesc export`, which de-quantizes first)", file=sys.stderr)
            merge = False
        if merge if merge is not None else _gpu_unquantized(model):
            model = model.merge_and_unload()
        model.eval()
        return cls(model, tok, cfg, name=f"{run.name}", catalog=catalog)

    @classmethod
    def base_of_run(cls, run: Path, cfg: ProdescConfig | None = None) -> Generator:
        """The run's base model alone (no adapter), with the run's tokenizer, prompt and catalog: `prodesc serve`'s
        `<name>-base`, loaded as a second copy beside the merged fine-tuned model."""
        cfg = rundir.with_length_prior(cfg, run) if cfg else rundir.settings(run)
        catalog = _catalog(run / CATALOG_DIR, cfg, run.name)
        model = _run_base(run, cfg).eval()
        return cls(model, models.load_tokenizer(str(run / "adapter")), cfg, name=f"{run.name}-base", catalog=catalog)

    @classmethod
    def from_model(cls, name: str, adapter: Path | None = None, cfg: ProdescConfig | None = None) -> Generator:
        """A plain model (Hub id, dir, embedded:...) with an optional PEFT adapter dir. A merged export of a run
        with neighbours (`prodesc export`) brings its catalog and its prompt and retrieval settings
        (`rundir.settings(None, flags={"model.name": name})` reads them)."""
        flags = {"model.name": name}
        cfg = rundir.with_length_prior(cfg, None, Path(name)) if cfg else rundir.settings(None, flags=flags)
        if adapter is not None and not (adapter / "adapter_config.json").exists():
            raise ProdescError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
        catalog = _catalog(Path(name) / CATALOG_DIR, cfg, name)
        model, tok = models.load(cfg.model, decode=cfg.generate.compile)
        if adapter is not None:
            from peft import PeftModel

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

    def engine(self, slots: int, cache_len: int, admit_wait_s: float = 0.0, gen: GenerateConfig | None = None,
               compile: bool | None = None) -> Any:
        """A continuous-batching engine on this model (`prodesc serve`): `slots` rows at once, each with room for
        `cache_len` prompt + answer tokens; decode steps as CUDA graphs where the fast path applies (their forward
        compiled unless `compile=False`); with rows generating, waiting rows may be held up to `admit_wait_s` to
        join in fewer prefills. Call its `warm_up()` to capture every graph before the first request."""
        from prodesc.generate.continuous import Engine

        gen = gen or self.cfg.generate
        on_cuda = getattr(self.model, "device", None) is not None and self.model.device.type == "cuda"
        graphs = on_cuda and fast.fast_generation_enabled(self.model, gen.compile)
        return Engine(self.model, self.tok, gen, slots, cache_len, graphs=graphs, stop_ids=self.stop_ids,
                      admit_wait_s=admit_wait_s, compile=graphs if compile is None else compile and graphs)

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
        near = self.neighbours(titles)
        if gen.speculate_tokens and gen.grounded == "off":  # transformers' prompt lookup decodes one row at a time
            return self._describe_speculating(titles, near, gen, progress, adapter, stop)
        order = sorted(range(len(titles)), key=lambda i: -len(titles[i]))  # similar lengths share a batch
        results: dict[int, dict[str, Any]] = {}
        bar = _progress(len(titles), progress)
        for start in range(0, len(order), gen.batch_size):
            idx = order[start : start + gen.batch_size]
            batch = self._batch([titles[i] for i in idx], [near[i] for i in idx], gen, adapter, stop, idx)
            for i, rec in zip(idx, batch, strict=True):
                results[i] = rec
            bar.update(len(idx))
        bar.close()
        return [results[i] for i in range(len(titles))]

    def _describe_speculating(self, titles: list[str], near: list[list[dict]], gen: GenerateConfig, progress: bool,
                              adapter: bool, stop: Callable[[int], bool] | None) -> list[dict[str, Any]]:
        """`describe` through the serving engine, `generate.batch_size` rows at a time, drafting from each prompt
        (generate/speculate.py); greedy answers equal the one-token path's. Adds the drafts to `self.speculation`."""
        import contextlib

        import torch

        from prodesc.generate.continuous import Row

        prompts = [self.prompt_ids(t, nb) for t, nb in zip(titles, near, strict=True)]
        need = max(map(len, prompts)) + gen.max_new_tokens
        engine = self._engine_for(gen, -(-need // fast.CACHE_BUCKET) * fast.CACHE_BUCKET, adapter)
        before = (engine.drafted, engine.accepted, engine.verify_rows)
        bar, rows = _progress(len(titles), progress), []
        for i, ids in enumerate(prompts):
            row = Row(ids, gen.max_new_tokens, gen.temperature, gen.top_p, on_end=lambda _: bar.update(1))
            if stop is not None:
                row.wanted = lambda i=i: not stop(i)
            rows.append(row)
            engine.add(row)
        no_adapter = getattr(self.model, "disable_adapter", None)
        ctx = no_adapter() if (not adapter and no_adapter) else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx, torch.inference_mode():
            while engine.busy:
                engine.step()
        ms = (time.perf_counter() - t0) * 1000
        bar.close()
        for key, was in zip(("drafted", "accepted", "verify_rows"), before, strict=True):
            self.speculation[key] += getattr(engine, key) - was
        return [self._record(t, r.tokens, ms, nb) for t, r, nb in zip(titles, rows, near, strict=True)]

    def _engine_for(self, gen: GenerateConfig, cache_len: int, adapter: bool) -> Any:
        """The engine of the last `describe` call if it has these settings (its graphs captured already), else a
        new one (one at a time: each holds a KV cache)."""
        key = (gen.model_dump_json(), cache_len, adapter)
        if self._engine is None or self._engine[0] != key:
            self._engine = None  # free the old cache first
            # its steps as CUDA graphs of the eager forward, as measured (docs/PERFORMANCE.md, issue 25): compiling
            # them is what made SmolLM2's server warm-up take 160 s on an H100 (two compiles), a cost a short
            # generate or eval call would pay again each time
            self._engine = (key, self.engine(gen.batch_size, cache_len, gen=gen, compile=False))
        return self._engine[1]

    def neighbours(self, titles: list[str]) -> list[list[dict[str, Any]]]:
        """Each title's retrieval.k nearest catalog items ([] each when k = 0)."""
        k = self.cfg.retrieval.k
        if k and self.catalog is None:
            raise ProdescError(_no_catalog(self.name, k))
        return self.catalog.neighbours(titles, k) if k else [[] for _ in titles]

    def _batch(self, titles: list[str], near: list[list[dict]], gen: GenerateConfig, adapter: bool,
               stop: Callable[[int], bool] | None, rows: list[int]) -> list[dict[str, Any]]:
        import contextlib

        import torch

        compiled = fast.fast_generation_enabled(self.model, gen.compile)  # static cache + compiled decode
        fill = batch_bucket(len(titles), gen.batch_size) - len(titles) if compiled else 0
        titles_f, near_f = titles + titles[-1:] * fill, near + near[-1:] * fill
        inputs = self._encode(titles_f, near_f)  # few shapes, each compiled once
        width = inputs["input_ids"].shape[1]
        kwargs = self._gen_kwargs(gen, width, stop, rows + rows[-1:] * fill, self._grounding(gen, titles_f, near_f))
        if compiled:
            kwargs.update(fast.generation_kwargs(self.model, width, gen.max_new_tokens, gen.compile))
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

    def _grounding(self, gen: GenerateConfig, titles: list[str], near: list[list[dict]]) -> list[Any] | None:
        """Per row, the words with a digit its prompt states (`generate.grounded`; None when off)."""
        if gen.grounded == "off":
            return None
        return [specs.Grounding([t] if gen.grounded == "title" else self.shown(t, nb))
                for t, nb in zip(titles, near, strict=True)]

    def shown(self, title: str, near: list[dict]) -> list[str]:
        """The texts a prompt shows of a product: its title, then each neighbour's title and description as cut for
        the prompt (retrieval.chars)."""
        return prompts.shown(title, near, self.cfg.retrieval.chars)

    def _gen_kwargs(self, gen: GenerateConfig, prompt_width: int, stop: Callable[[int], bool] | None = None,
                    rows: list[int] = (), grounding: list[Any] | None = None) -> dict[str, Any]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from prodesc.generate.processors import AnswerNoRepeatNGram, AnswerRepetitionPenalty, GroundedSpecifics

        sample = gen.temperature >= MIN_SAMPLING_TEMPERATURE  # smaller ones overflow to a NaN distribution
        kw: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.stop_ids,  # every stop id, not only the tokenizer's EOS
            do_sample=sample,
        )
        if sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p)
        if stop is not None:
            from prodesc.generate.processors import StopRows

            kw["stopping_criteria"] = StoppingCriteriaList([StopRows(stop, rows)])
        after = self.cfg.generate.stop_boost_after if gen.stop_boost_after == "auto" else gen.stop_boost_after
        if after:  # "auto" was resolved for this model when it loaded (rundir.length_prior)
            kw["exponential_decay_length_penalty"] = (after, 1.05)
        if gen.stop_bias:
            kw["sequence_bias"] = [[[i], gen.stop_bias] for i in self.stop_ids]
        # Both count the answer only: the prompt's words (a neighbour's phrase, the title) stay free to copy.
        processors = []
        if gen.repetition_penalty != 1.0:
            processors.append(AnswerRepetitionPenalty(gen.repetition_penalty, prompt_width, self.exempt))
        if gen.no_repeat_ngram_size:
            processors.append(AnswerNoRepeatNGram(gen.no_repeat_ngram_size, prompt_width, self.exempt))
        if grounding is not None:
            processors.append(GroundedSpecifics(self.tok, grounding, prompt_width, self.exempt))
        if processors:
            kw["logits_processor"] = LogitsProcessorList(processors)
        return kw

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
        return self.review(rec, near)

    def review(self, rec: dict[str, Any], near: list[dict]) -> dict[str, Any]:
        """Adds what a shop needs to check a record: `unsupported`, the specifics the prediction states that neither
        the title nor the neighbours shown state (`specs.unsupported`), and, with neighbours, what the prompt showed
        of each (`neighbours`: uid, title, score, text)."""
        shown = self.shown(rec["title"], near)
        rec["unsupported"] = specs.unsupported(rec["prediction"], shown)
        if self.cfg.retrieval.k:
            rec["neighbours"] = [{"uid": n["uid"], "title": n["title"], "score": n["score"], "text": text}
                                 for n, text in zip(near, shown[2::2], strict=True)]
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
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    allow_overlap: bool = False,
    base: bool = False,
) -> int:
    """The `prodesc generate` verb: check the arguments, settings and items, load once, then describe: TITLE
    arguments to the terminal; `--input`/`--data` a chunk at a time to `--out` (stream.py), or the terminal."""
    if sum(bool(x) for x in (titles, input, data)) != 1:
        raise ProdescError("give titles in exactly one way: TITLE arguments, --input FILE, or --data DIR --split")
    if (run is None) == (model is None):
        raise ProdescError("pass exactly one of --run RUN_DIR or --model MODEL")
    if resume and out is None:
        raise ProdescError("--resume continues an --out file: pass --out FILE")
    if base and run is None:
        raise ProdescError("--base runs a run's base model with its prompts: pass --run RUN_DIR (or --model alone)")
    if limit is not None and limit < 1:  # 0 and -1 used to mean "none", "all" or "all but the last" by input kind
        raise ProdescError(f"--limit {limit}: pass a number of items >= 1, or leave --limit out for all of them")
    cfg = rundir.settings(run, config, {**(flags or {}), **({"model.name": model} if model else {})}, sets)
    if titles:
        if any(not t.strip() for t in titles):
            raise ProdescError("an empty TITLE argument: give a product title")
        for n, t in enumerate(titles, 1):
            check_title(t, f"TITLE argument {n}", cfg.data.max_title_chars)
        items, total = (lambda: iter([{"title": t} for t in titles[:limit]])), len(titles[:limit])
    else:
        items, total = stream.item_source(input, data, split, limit, cfg.data.max_title_chars)
    if data is not None and run is not None:  # a split of prepared data: were these items trained on?
        check_overlap(run, [{"title": x["title"], "content": x["reference"]} for x in items()], allow_overlap)
    done = stream.resume_point(out, items, resume, _made_with(run, model, adapter, base, cfg)) if out else 0
    if run is not None:  # --base: unmerged, so the adapter can be switched off
        gen = Generator.from_run(run, cfg, merge=False if base else None)
    else:
        gen = Generator.from_model(model, adapter, cfg)
    gen.use_data_index(data)

    def describe(batch: list[str], **kw: Any) -> list[dict[str, Any]]:
        return gen.describe(batch, adapter=not base, **kw)

    if out is not None:
        n = stream.generate_to_file(describe, items, total, out, chunk=cfg.generate.write_every, done=done)
        print(f"{out}: {n} predictions; {_flagged(out)} flagged for review (`unsupported`: specifics stated "
              f"neither in the title nor in the neighbours shown){speculation_line(gen.speculation)}")
        return n
    for rec in describe([x["title"] for x in items()], progress=total > 1):
        check = f"\n  check: {', '.join(rec['unsupported'])}" if rec["unsupported"] else ""
        print(f"\n# {rec['title']}\n{rec['prediction']}{check}")
    if cfg.generate.speculate_tokens:
        print(f"\n{total} descriptions{speculation_line(gen.speculation)}", file=sys.stderr)
    return total


def _flagged(out: Path) -> int:
    """Records of a predictions file whose `unsupported` list is not empty (older lines without it: not counted)."""
    with out.open(encoding="utf-8") as f:
        return sum(bool(json.loads(line).get("unsupported")) for line in f if line.strip())


def _made_with(run: Path | None, model: str | None, adapter: Path | None, base: bool,
               cfg: ProdescConfig) -> dict[str, Any]:
    """What a `--out` file's answers depend on, as dotted keys (`stream.resume_point` compares them on --resume)."""
    if run is not None:
        source = {"run": run.resolve().name, "run.created": read_manifest(run).get("created"), "base": base}
    else:
        source = {"model": model, "adapter": str(adapter.resolve()) if adapter else None}
    gen = cfg.generate.model_dump(mode="json", include=set(rundir.DECODING))
    r = cfg.retrieval
    return {**source, **{f"generate.{k}": v for k, v in gen.items()},
            **{f"prompt.{k}": v for k, v in cfg.prompt.model_dump(mode="json").items()},
            "retrieval": {"k": r.k, "chars": r.chars, "embedder": r.embedder} if r.k else {"k": 0}}


def speculation_line(counts: dict[str, int]) -> str:
    """"; 812 drafted tokens, 640 accepted (2.9 tokens per verify step)", or "" when nothing was verified."""
    if not counts.get("verify_rows"):
        return ""
    per_step = 1 + counts["accepted"] / counts["verify_rows"]
    return (f"; {counts['drafted']:,} drafted tokens, {counts['accepted']:,} accepted "
            f"({per_step:.2f} tokens per verify step)")


def _run_base(run: Path, cfg: ProdescConfig) -> Any:
    """The base model a run was trained on, loaded as its manifest says (tiny runs keep theirs in the run dir)."""
    base = read_manifest(run)["base_model"]
    path = str(run / base["path"]) if base.get("path") else None
    return models.load(cfg.model, path=path, decode=cfg.generate.compile)[0]


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


def _gpu_unquantized(model: Any) -> bool:
    import torch

    return torch.cuda.is_available() and not _quantized(model)


def _quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "hf_quantizer", None))


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled or total < 2, file=sys.stderr, unit="title")

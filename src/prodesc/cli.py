"""`prodesc` command line: one typer command per verb, each a single call into the library.

prodesc data synth --n 2000 --out demo/catalog.json.gz
prodesc data prepare demo/catalog.json.gz --out demo/data
prodesc data index demo/data
prodesc train --config configs/smollm2-135m.yaml --data demo/data --out demo/run
prodesc generate --run demo/run "Girls Ballet Tutu Neon Pink"
prodesc eval --run demo/run --data demo/data --out demo/report
prodesc serve --run demo/run
prodesc demo --run demo/run --data demo/data --out demo/report
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from prodesc.errors import ProdescError

app = typer.Typer(
    help=__doc__.split("\n")[0],
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Read, clean and split catalogs; synthesize a demo catalog.", no_args_is_help=True)
app.add_typer(data_app, name="data")
_state = {"debug": False}

Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key.sub=value (repeat).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config or preset (configs/*.yaml).")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(help="Allow Python code shipped with the model to run (only this flag can; a config file cannot)."),
]


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into the library; a ProdescError becomes one line on stderr and exit 1 (traceback with --debug)."""
    try:
        return fn(*args, **kwargs)
    except ProdescError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise typer.Exit(130) from None


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False,
) -> None:
    _state["debug"] = debug


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[
        list[Path], typer.Argument(help="trn.json / .gz / Amazon-Titles-1.3MM.zip / JSON / CSV / Parquet.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (train/val/test.parquet, stats.json).")],
    title_field: Annotated[str | None, typer.Option(help="Title column (auto: title, instruction).")] = None,
    content_field: Annotated[str | None, typer.Option(help="Content column (auto: content, output).")] = None,
    id_field: Annotated[str | None, typer.Option(help="Id column (auto: uid, id).")] = None,
    # Options left out stay None, so --config's values hold unless a flag is given (defaults: DataConfig).
    min_content_chars: Annotated[int | None, typer.Option(help="Drop shorter cleaned contents (default 1).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of families in val (default 0.05).")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of families in test (default 0.05).")] = None,
    lossy_ascii_lower: Annotated[
        bool | None, typer.Option(help="LOSSY notebook normalisation: lowercase, ASCII only (default off).")
    ] = None,
    strict: Annotated[
        bool | None, typer.Option(help="Fail on the first malformed line (file:line), don't skip (default off).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default 0 = 1 per core, at most 8).")] = None,
    near_dup: Annotated[
        bool | None, typer.Option(help="Join near-duplicate contents into one family (default on).")
    ] = None,
    near_dup_threshold: Annotated[
        float | None, typer.Option(help="Similarity (word pairs, 0.2-1) from which contents join (default 0.4).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    config: ConfigOpt = None,
    set_: Sets = None,
) -> None:
    """Clean a catalog and write leak-free train/val/test splits (by title family)."""
    from prodesc import config as cfgmod
    from prodesc.data.prepare import prepare

    flags = _flags(
        "data",
        title_field=title_field,
        content_field=content_field,
        id_field=id_field,
        min_content_chars=min_content_chars,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        lossy_ascii_lower=lossy_ascii_lower,
        strict=strict,
        workers=workers,
        near_dup=near_dup,
        near_dup_threshold=near_dup_threshold,
    )
    cfg = _run(cfgmod.resolve, config=config, flags=flags, sets=set_ or [])
    _run(prepare, inputs, out, cfg.data, overwrite=overwrite)


@data_app.command("synth")
def data_synth(
    n: Annotated[int, typer.Option("--n", help="Number of JSON lines.")] = 2000,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.json, .json.gz).")] = Path("catalog.json.gz"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    malformed: Annotated[int, typer.Option(help="Number of malformed lines to mix in.")] = 0,
) -> None:
    """Write a deterministic synthetic catalog in the exact LF-Amazon trn.json line format."""
    from prodesc.data.synth import synth

    _run(synth, n, out, seed=seed, malformed=malformed)


@data_app.command("index")
def data_index(
    data: Annotated[Path, typer.Argument(help="Output directory of `prodesc data prepare`.")],
    embedder: Annotated[
        str | None, typer.Option(help="sentence-transformers model (default: retrieval.embedder, MiniLM).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing DATA/index/.")] = False,
    config: ConfigOpt = None,
    set_: Sets = None,
) -> None:
    """Embed the titles of every split once into DATA/index/, for catalog neighbours and the retrieval baseline."""
    from prodesc import config as cfgmod
    from prodesc.catalog import index_data

    cfg = _run(cfgmod.resolve, config=config, flags=_flags("retrieval", embedder=embedder), sets=set_ or [])
    _run(index_data, data, cfg.retrieval.embedder, overwrite=overwrite)


@app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Output directory of `prodesc data prepare`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create.")],
    config: ConfigOpt = None,
    set_: Sets = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Fine-tune a LoRA / QLoRA adapter with TRL's SFTTrainer on the prepared data."""
    from prodesc.train import recipe as trainmod

    flags = _trust(trust_remote_code)
    _run(trainmod.train_cli, data, out, config, flags, set_ or [], resume=resume, overwrite=overwrite)


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="Run directory of `prodesc train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the exported model.")],
    format: Annotated[
        str, typer.Option("--format", help="hf: merged safetensors checkpoint; gguf: one .gguf + Ollama Modelfile.")
    ] = "hf",
    gguf_type: Annotated[
        str | None, typer.Option(help="With --format gguf: q8_0 (default), f16, bf16 or q4_k_m.")
    ] = None,
    merge: Annotated[bool, typer.Option(help="Merge the adapter into full-precision base weights.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Export a run with the training prompt in its chat template: merged HF checkpoint, GGUF, or the adapter."""
    from prodesc import export as exportmod

    opts = dict(format=format, gguf_type=gguf_type, trust_remote_code=trust_remote_code)
    _run(exportmod.export, run, out, merge=merge, overwrite=overwrite, **opts)


@app.command("generate")
def generate(
    titles: Annotated[list[str] | None, typer.Argument(help="Titles to describe (printed to the terminal).")] = None,
    run: Annotated[Path | None, typer.Option(help="Run directory: base model + adapter from its manifest.")] = None,
    model: Annotated[str | None, typer.Option(help="Model (Hub id, dir, embedded:smollm2-135m) without a run.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter dir to apply on --model.")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="File of titles: .txt lines or JSONL.")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared data dir (with --split).")] = None,
    split: Annotated[str, typer.Option(help="Split of --data to describe.")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most N items.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL predictions here.")] = None,
    config: ConfigOpt = None,
    set_: Sets = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="New tokens at most.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling.")] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Repetition penalty (special tokens exempt).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Titles per generation call.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted --out file (same input).")] = False,
    allow_overlap: Annotated[
        bool, typer.Option(help="With --run and --data: describe even items the run trained on.")
    ] = False,
    trust_remote_code: TrustRemoteCode = False,
    base: Annotated[
        bool, typer.Option(help="With --run: its base model (adapter off), same prompts and neighbours.")
    ] = False,
) -> None:
    """Describe titles with a fine-tuned run or a plain model (batched, greedy by default; --out is written as it
    goes, with rate and ETA on stderr)."""
    from prodesc.generate import generator as genmod

    flags = _flags(
        "generate",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
    ) | _trust(trust_remote_code)
    _run(
        genmod.generate_cli,
        titles=titles or [],
        run=run,
        model=model,
        adapter=adapter,
        input=input,
        data=data,
        split=split,
        limit=limit,
        out=out,
        config=config,
        flags=flags,
        sets=set_ or [],
        resume=resume,
        allow_overlap=allow_overlap,
        base=base,
    )


@app.command("eval")
def evaluate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory (metrics.json, report.html...).")],
    files: Annotated[
        list[Path] | None, typer.Argument(help="With --predictions: prediction JSONL files (system = file stem).")
    ] = None,
    run: Annotated[Path | None, typer.Option(help="Run directory to evaluate.")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared data dir (needs --run).")] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    limit: Annotated[int | None, typer.Option(help="Score the first N items.")] = None,
    predictions: Annotated[
        bool, typer.Option("--predictions", help="Score the prediction JSONL FILES instead of a run.")
    ] = False,
    systems: Annotated[str | None, typer.Option(help="Comma list of finetuned,base,retrieval.")] = None,
    allow_overlap: Annotated[
        bool, typer.Option(help="Score even items whose family key, content or near-duplicate the run trained on.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    config: ConfigOpt = None,
    set_: Sets = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Score fine-tuned vs base vs retrieval on held-out items, with bootstrap intervals and an HTML report."""
    from prodesc.eval import evaluate as evalmod

    if bool(files) != predictions:
        _run(_fail, "prediction files go with --predictions: prodesc eval --predictions A.jsonl B.jsonl --out DIR")
    flags = _flags("eval", limit=limit, systems=[s.strip() for s in systems.split(",")] if systems else None)
    flags |= _trust(trust_remote_code)
    _run(
        evalmod.evaluate_cli,
        out=out,
        run=run,
        data=data,
        split=split,
        predictions=files or [],
        allow_overlap=allow_overlap,
        overwrite=overwrite,
        config=config,
        flags=flags,
        sets=set_ or [],
    )


@app.command("serve")
def serve(
    run: Annotated[Path | None, typer.Option(help="Run directory (base + adapter).")] = None,
    model: Annotated[str | None, typer.Option(help="Model or merged dir without a run.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="PRODESC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    config: ConfigOpt = None,
    set_: Sets = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve an OpenAI-compatible API, /v1/describe, /metrics and a page to try the model."""
    from prodesc.serve import app as servemod

    flags = _flags("serve", host=host, port=port) | _trust(trust_remote_code)
    _run(servemod.serve_cli, run=run, model=model, api_key=api_key, config=config, flags=flags, sets=set_ or [])


@app.command("demo")
def demo(
    run: Annotated[Path, typer.Option(help="Run directory of `prodesc train` (make demo: demo/run).")],
    data: Annotated[Path, typer.Option(help="Its prepared data dir.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory (replaced).")],
    limit: Annotated[int, typer.Option(help="Held-out items scored.")] = 12,
) -> None:
    """Before vs after on a few held-out titles, then the eval table (the end of `make demo`)."""
    from prodesc import demo as demomod

    _run(demomod.main, run, data, out, limit)


def _fail(message: str) -> None:
    raise ProdescError(message)


def _trust(allowed: bool) -> dict[str, Any]:
    """--trust-remote-code: the only way to allow a model's own code (config files can't; see config.resolve)."""
    return {"model.trust_remote_code": True} if allowed else {}


def _flags(section: str, **values: Any) -> dict[str, Any]:
    """The verb's own options as typed `section.key` settings; options left out (None) set nothing."""
    return {f"{section}.{k}": v for k, v in values.items() if v is not None}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

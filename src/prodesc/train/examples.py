"""Training examples: each record's prompt (its catalog neighbours above the title), answer and end token, made to
fit `train.max_length` without ever losing the end token.

    catalog, near = neighbours(cfg, data, rows)          # near["train"][i]: the neighbours of rows["train"][i]
    # encoding.build turns them into examples (prompts.fit_example's, many at a time)

Neighbours come from the train split only, never the record itself nor its own family: a variant of the same
product would teach the model to copy answers it will not have at test time, where families never straddle splits.
TRL would cut an over-long example from the right, EOS first, teaching long answers never to end; here the
neighbours shrink first, then the answer, and the end token stays (prompts.fit_example). `cut` counts what went.
"""

from __future__ import annotations

from pathlib import Path

from prodesc.catalog import Catalog, TitleVectors
from prodesc.config import ProdescConfig
from prodesc.errors import ProdescError

CHARS_PER_TOKEN = 4  # English BPE text, roughly: to tell before loading anything whether neighbours can fit
CUT_KEYS = ("neighbour_chars_cut", "neighbours_dropped", "content_tokens_cut", "dropped")


def check(cfg: ProdescConfig) -> None:
    """Neighbour settings that cannot fit train.max_length, refused before anything loads."""
    r, t = cfg.retrieval, cfg.train
    if not r.k:
        return
    need = r.k * (r.chars // CHARS_PER_TOKEN + 16)  # + the `[i] title` line
    if need > t.max_length // 2:
        raise ProdescError(
            f"retrieval.k={r.k} neighbours of retrieval.chars={r.chars} (~{need} tokens) leave less than half of "
            f"train.max_length={t.max_length} for the title and the answer: lower retrieval.chars or retrieval.k, "
            "or raise train.max_length"
        )


def neighbours(
    cfg: ProdescConfig, data: Path, rows: dict[str, list[dict]]
) -> tuple[Catalog | None, dict[str, list[list[dict]]]]:
    """The train-split catalog and each record's k neighbours (none when retrieval.k = 0)."""
    found = catalog(cfg, data, rows)
    return found, near(found, cfg, rows)


def catalog(cfg: ProdescConfig, data: Path, rows: dict[str, list[dict]]) -> Catalog | None:
    """The train split's catalog (None when retrieval.k = 0): its titles looked up in DATA/index/ when there is
    one, so this is cheap; the search (`near`) is the costly part, done only when examples are encoded."""
    if not cfg.retrieval.k:
        return None
    built = Catalog.build(rows["train"], TitleVectors.for_data(data, cfg.retrieval), cfg.retrieval)
    built.use_data_index(data)  # val titles: looked up too
    built.share_graph(data)  # a million-item search graph: built once per data dir
    return built


def near(found: Catalog | None, cfg: ProdescConfig, rows: dict[str, list[dict]]) -> dict[str, list[list[dict]]]:
    """Each record's k nearest train records, never itself nor one of its family."""
    if found is None:
        return {split: [[] for _ in split_rows] for split, split_rows in rows.items()}
    return {
        split: found.neighbours([r["title"] for r in split_rows], cfg.retrieval.k, [r["family"] for r in split_rows])
        for split, split_rows in rows.items()
    }


def describe_cuts(totals: dict[str, int], n: int, max_length: int) -> str | None:
    """One line saying what fitting train.max_length cost, or None when nothing was cut."""
    if not totals["examples_cut"]:
        return None
    parts = [
        f"{totals['examples_cut']} of {n} training examples were longer than train.max_length={max_length}"
        " and were fitted, the end token kept:",
        f"neighbour descriptions shortened by {totals['neighbour_chars_cut']} chars in all,",
        f"{totals['neighbours_dropped']} neighbours dropped, {totals['content_tokens_cut']} answer tokens cut,",
        f"{totals['dropped']} examples dropped (prompt alone too long);",
        "raise train.max_length to keep them whole",
    ]
    return " ".join(parts)

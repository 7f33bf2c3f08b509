import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["fixtures_tiny"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout: real LF-Amazon samples and the Mistral tokenizer. CI clones it there, so in
    CI (`CI` set) its absence fails the tests that need it; elsewhere they skip, saying what is missing."""
    if not SHARED.is_dir():
        message = f"{SHARED} is not present: clone the shared fixtures beside the checkout"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + " (CI runs every test)")
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Models the tests convert (the embedded SmolLM2 GGUF into a checkpoint, ~20 s once) go to pytest's cache
    dir, kept between runs (.pytest_cache/), never to ~/.cache/prodesc: $PRODESC_CACHE for the whole session,
    subprocesses included."""
    cache = request.config.cache
    path = cache.mkdir("prodesc-models") if cache is not None else tmp_path_factory.mktemp("prodesc-models")
    patch = pytest.MonkeyPatch()
    patch.setenv("PRODESC_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint (its tokenizer and weights), converted once into the cache."""
    from prodesc import models

    return models.embedded_checkpoint("embedded:smollm2-135m", str(model_cache))

"""Session fixtures: a small prepared catalog and a tiny trained run, built once and shared by the suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from prodesc import config
from prodesc.catalog import index_data
from prodesc.data.prepare import prepare
from prodesc.data.synth import synth
from prodesc.train import recipe as train


def build_data(root: Path, n: int = 600, seed: int = 0) -> Path:
    catalog = root / "catalog.json.gz"
    synth(n, catalog, seed=seed, malformed=0)
    out = root / "data"
    prepare([catalog], out, config.DataConfig(val_fraction=0.1, test_fraction=0.1))
    return out


def tiny_config(*overrides: str) -> config.ProdescConfig:
    return config.load(Path(__file__).parent.parent / "configs" / "tiny.yaml", list(overrides))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    return train.train(tiny_config("train.max_steps=30"), tiny_data, out)


@pytest.fixture(scope="session")
def tiny_rag_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_data plus its title index (`prodesc data index`), in a copy: tiny_data stays as prepare wrote it."""
    out = tmp_path_factory.mktemp("tiny-rag-data") / "data"
    shutil.copytree(tiny_data, out)
    index_data(out, config.RetrievalConfig().embedder)
    return out


@pytest.fixture(scope="session")
def tiny_rag_run(tiny_rag_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with 2 catalog neighbours in every prompt."""
    out = tmp_path_factory.mktemp("tiny-rag-run") / "run"
    cfg = tiny_config("train.max_steps=10", "retrieval.k=2", "retrieval.chars=120", "train.max_length=512")
    return train.train(cfg, tiny_rag_data, out)

"""The catalog index: `prodesc data index`, faiss search (exact and approximate), neighbours for training."""

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prodesc.catalog import EXACT_MAX, Catalog, TitleVectors
from prodesc.cli import app
from prodesc.config import RetrievalConfig
from prodesc.errors import ProdescError
from prodesc.records import read_split


def _catalog(n: int = 300, search: str = "auto", dim: int = 16) -> Catalog:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = pa.table({
        "uid": [f"u{i}" for i in range(n)], "title": [f"t{i}" for i in range(n)],
        "content": [f"c{i}" for i in range(n)], "family": [f"f{i // 3}" for i in range(n)],  # families of 3
    })  # fmt: skip
    return Catalog(items, x, RetrievalConfig(search=search))


def test_search_finds_a_title_itself_first_with_its_cosine():
    cat = _catalog()
    [near] = cat.neighbours(["t7"], 3)
    assert [n["uid"] for n in near][0] == "u7" and near[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert near[0]["content"] == "c7" and near[0]["score"] >= near[1]["score"] >= near[2]["score"]


def test_excluded_family_never_comes_back():
    cat = _catalog()
    near = cat.neighbours([f"t{i}" for i in range(30)], 4, [f"f{i // 3}" for i in range(30)])
    for i, nb in enumerate(near):
        assert len(nb) == 4 and all(n["family"] != f"f{i // 3}" for n in nb)


def test_approximate_search_agrees_with_exact_on_a_small_catalog():
    titles = [f"t{i}" for i in range(0, 300, 7)]
    exact = _catalog(search="exact").neighbours(titles, 5)
    hnsw = _catalog(search="approximate")
    approx = hnsw.neighbours(titles, 5)
    assert type(hnsw._index).__name__ == "IndexHNSWFlat"
    pairs = zip(exact, approx, strict=True)
    agree = np.mean([len({n["uid"] for n in a} & {n["uid"] for n in b}) / 5 for a, b in pairs])
    assert agree >= 0.95
    assert EXACT_MAX >= 10_000  # the measured switch-over (bench/results/catalog_search.json)


def test_an_approximate_catalog_saves_its_graph_and_loads_it_without_building_again(tmp_path, monkeypatch):
    import prodesc.catalog as catalog_module

    titles = [f"t{i}" for i in range(0, 300, 7)]
    hnsw = _catalog(search="approximate")
    hnsw.save(tmp_path / "hnsw")
    _catalog(search="exact").save(tmp_path / "flat")
    assert (tmp_path / "hnsw" / catalog_module.FAISS_FILE).exists()
    assert not (tmp_path / "flat" / catalog_module.FAISS_FILE).exists()  # a flat index is as quick to build as to read
    monkeypatch.setattr(catalog_module, "_faiss_index", lambda *a: pytest.fail("the saved graph was built again"))
    loaded = Catalog.load(tmp_path / "hnsw", RetrievalConfig(search="approximate"))
    assert [[n["uid"] for n in nb] for nb in loaded.neighbours(titles, 5)] == [
        [n["uid"] for n in nb] for nb in hnsw.neighbours(titles, 5)
    ]


def test_train_and_eval_share_one_search_graph_per_data_dir(tiny_rag_data, monkeypatch):
    import prodesc.catalog as catalog_module

    rows = read_split(tiny_rag_data, "train")
    cfg = RetrievalConfig(search="approximate")

    def catalog():
        built = Catalog.build(rows, TitleVectors.for_data(tiny_rag_data, cfg), cfg)
        built.share_graph(tiny_rag_data)
        return built

    first = catalog()
    [graph] = list((tiny_rag_data / "index").glob("graph-*.faiss"))
    titles = [r["title"] for r in rows[:20]]
    monkeypatch.setattr(catalog_module, "_faiss_index", lambda *a: pytest.fail("the shared graph was built again"))
    assert catalog().neighbours(titles, 3) == first.neighbours(titles, 3)
    other = Catalog.build(rows[:-1], TitleVectors.for_data(tiny_rag_data, cfg), cfg)  # other items: another graph
    monkeypatch.undo()
    other.share_graph(tiny_rag_data)
    graphs = list((tiny_rag_data / "index").glob("graph-*.faiss"))
    assert len(graphs) == 2 and graph in graphs
    for g in graphs:  # the fixture's data dir is shared with other tests
        g.unlink()


def test_data_index_holds_every_split_and_replaces_the_embedder(tiny_rag_data, monkeypatch):
    meta = json.loads((tiny_rag_data / "index" / "meta.json").read_text())
    rows = [r for s in ("train", "val", "test") for r in read_split(tiny_rag_data, s)]
    assert meta["count"] == len(rows) and meta["embedder"] == RetrievalConfig().embedder
    vectors = TitleVectors.for_data(tiny_rag_data, RetrievalConfig())
    from prodesc import embedder

    monkeypatch.setattr(embedder, "load_embedder", lambda *a: pytest.fail("embedder loaded for an indexed title"))
    got = vectors.encode([rows[0]["title"], rows[-1]["title"]])
    assert got.shape == (2, meta["dim"]) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-2)


def test_data_index_of_another_embedder_is_refused(tiny_rag_data):
    with pytest.raises(ProdescError, match="was built with 'embedded:all-minilm-l6-v2'"):
        TitleVectors.for_data(tiny_rag_data, RetrievalConfig(embedder="some/other-model"))


def test_cli_data_index_refuses_an_existing_index_and_a_dir_without_splits(tiny_rag_data, tmp_path, monkeypatch):
    monkeypatch.setattr(TitleVectors, "encode", lambda *a, **kw: pytest.fail("titles embedded before the refusal"))
    res = CliRunner().invoke(app, ["data", "index", str(tiny_rag_data)])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert "--out" not in res.output  # `data index` has no --out; the message used to name it
    res = CliRunner().invoke(app, ["data", "index", str(tmp_path)])
    assert res.exit_code == 1 and "data prepare" in res.output


@pytest.mark.parametrize("damage", ["width", "not unit", "count", "meta", "items"])
def test_a_damaged_data_index_is_a_one_line_error_saying_how_to_rebuild_it(tiny_rag_data, tmp_path, damage):
    """Index vectors of the wrong width used to train with rc 0; other damage gave tracebacks."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_rag_data, data, ignore=shutil.ignore_patterns("encoded"))
    index = data / "index"
    vectors = np.load(index / "vectors.npy")
    if damage == "width":
        narrow = vectors[:, :8].astype(np.float32)
        np.save(index / "vectors.npy", (narrow / np.linalg.norm(narrow, axis=1, keepdims=True)).astype(np.float16))
    elif damage == "not unit":
        np.save(index / "vectors.npy", vectors * 3)
    elif damage == "count":
        np.save(index / "vectors.npy", vectors[:-1])
    elif damage == "meta":
        (index / "meta.json").write_text('{"embedder": "embedded:all-minilm-l6-v2"}')
    else:
        (index / "items.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(ProdescError) as err:
        TitleVectors.for_data(data, RetrievalConfig())
    message = str(err.value)
    assert str(index) in message and f"prodesc data index {data} --overwrite" in message and "\n" not in message


def test_training_neighbours_are_never_the_record_nor_its_family(tiny_rag_data):
    from fixtures_tiny import tiny_config
    from prodesc.train import examples

    rows = {s: read_split(tiny_rag_data, s) for s in ("train", "val")}
    catalog, near = examples.neighbours(tiny_config("retrieval.k=3"), tiny_rag_data, rows)
    assert len(catalog) == len(rows["train"])
    families = {r["uid"]: r["family"] for r in rows["train"]}
    shared = 0
    for r, nb in zip(rows["train"], near["train"], strict=True):
        assert len(nb) == 3 and all(n["uid"] != r["uid"] and families[n["uid"]] != r["family"] for n in nb)
        shared += sum(families[n["uid"]] == r["family"] for n in nb)
    assert shared == 0
    assert all(n["uid"] in families for nb in near["val"] for n in nb)  # from the train split only


def test_bad_retrieval_settings_are_one_line_errors():
    from prodesc import config

    with pytest.raises(ProdescError, match=r"retrieval.k: Input should be greater than or equal to 0"):
        config.load(None, ["retrieval.k=-1"])
    with pytest.raises(ProdescError, match=r"retrieval.chars: Input should be greater than or equal to 40"):
        config.load(None, ["retrieval.chars=5"])


@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_search_in_small_chunks_gives_what_one_search_gives(monkeypatch, search):
    from prodesc import catalog as catalogmod

    titles = [f"t{i}" for i in range(0, 300, 2)]
    families = [f"f{i // 3}" for i in range(0, 300, 2)]
    whole = _catalog(search=search).neighbours(titles, 4, families)
    sizes = []
    cat = _catalog(search=search)
    real = cat._search
    monkeypatch.setattr(catalogmod, "SEARCH_CHUNK", 7)
    monkeypatch.setattr(cat, "_search", lambda q, fetch: sizes.append(len(q)) or real(q, fetch))
    assert cat.neighbours(titles, 4, families) == whole
    assert max(sizes) == 7 and sum(sizes) == len(titles)  # never more than a chunk of queries at a time

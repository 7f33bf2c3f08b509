"""The leak guard (data/overlap.py): a run's training records against evaluated items, across two prepares."""

from __future__ import annotations

from pathlib import Path

import pytest

from prodesc.config import DataConfig
from prodesc.data.overlap import INDEX, check_overlap, write_index
from prodesc.data.prepare import prepare
from prodesc.data.synth import synth
from prodesc.errors import ProdescError
from prodesc.records import read_split


@pytest.fixture(scope="module")
def two_prepares(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One catalog prepared twice under other options, and a "run" trained on the first prepare's train split."""
    root = tmp_path_factory.mktemp("overlap")
    catalog = synth(3000, root / "catalog.json.gz", seed=7)
    a, b = root / "a", root / "b"
    prepare([catalog], a, DataConfig(split_salt="first", test_fraction=0.2))
    prepare([catalog], b, DataConfig(split_salt="second", min_content_chars=150, near_dup=False, test_fraction=0.2))
    run = root / "run"
    run.mkdir()
    write_index(run, read_split(a, "train"), DataConfig())
    return a, b, run


def test_items_of_another_prepare_that_were_trained_on_are_refused(two_prepares: tuple[Path, Path, Path]) -> None:
    a, b, run = two_prepares
    items = read_split(b, "test")
    trained = {r["uid"]: r["family"] for r in read_split(a, "train")}
    renamed = [it for it in items if it["uid"] in trained and trained[it["uid"]] != it["family"]]
    assert renamed  # family names differ between the two prepares: comparing names would miss these
    with pytest.raises(ProdescError) as err:
        check_overlap(run, items, allow_overlap=False)
    message = str(err.value)
    n = int(message.split(" of ")[0])
    assert n >= sum(it["uid"] in trained for it in items) and message.count(" ~ training ") == 3
    assert "\n" not in message and message.endswith("or pass --allow-overlap")


def test_the_same_prepares_held_out_split_passes(two_prepares: tuple[Path, Path, Path]) -> None:
    a, _, run = two_prepares
    assert check_overlap(run, read_split(a, "test"), allow_overlap=False) == 0
    assert check_overlap(run, read_split(a, "val"), allow_overlap=False) == 0


def test_near_duplicate_content_under_a_new_title_is_caught(two_prepares: tuple[Path, Path, Path]) -> None:
    a, _, run = two_prepares
    row = next(r for r in read_split(a, "train") if len(r["content"]) > 400)
    words = row["content"].split(" ")
    words[3], words[20] = "altered", "changed"
    edited = " ".join(words) + " A sentence nobody wrote before, added at the end."
    items = [{"title": "Completely Unrelated Garden Hose", "content": edited}]
    with pytest.raises(ProdescError, match="near-duplicate content, similarity 0"):
        check_overlap(run, items, allow_overlap=False)
    same = [{"title": "Another Unrelated Lamp", "content": row["content"].upper()}]
    with pytest.raises(ProdescError, match="same content"):
        check_overlap(run, same, allow_overlap=False)
    title = [{"title": row["title"] + " (Blue)", "content": "An entirely new description of this thing."}]
    with pytest.raises(ProdescError, match="same family key"):
        check_overlap(run, title, allow_overlap=False)


def test_allow_overlap_warns_and_counts(two_prepares: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    a, _, run = two_prepares
    items = read_split(a, "train")[:5]
    assert check_overlap(run, items, allow_overlap=True) == 5
    assert "5 of 5 evaluated items overlap" in capsys.readouterr().out


def test_old_run_without_index_compares_family_names(tmp_path: Path, two_prepares) -> None:
    a, _, run = two_prepares
    old = tmp_path / "old"
    old.mkdir()
    import gzip

    with gzip.open(old / "train_families.txt.gz", "wt") as f:
        f.write("\n".join(sorted({r["family"] for r in read_split(a, "train")})) + "\n")
    with pytest.raises(ProdescError, match="--allow-overlap"):
        check_overlap(old, read_split(a, "train")[:3], allow_overlap=False)
    assert check_overlap(old, read_split(a, "test"), allow_overlap=False) == 0
    (tmp_path / "none").mkdir()
    with pytest.raises(ProdescError, match="re-train or --allow-overlap"):
        check_overlap(tmp_path / "none", read_split(a, "test"), allow_overlap=False)
    assert (run / INDEX).stat().st_size < 400 * len(read_split(a, "train"))  # compact: < 400 bytes a record


def test_a_run_on_data_prepared_without_near_dup_passes_its_own_test_split(two_prepares, tmp_path: Path) -> None:
    """The guard's near-duplicate settings are the training data's own (config.resolved.yaml), not the train
    command's: data b joined no near-duplicates, so near-duplicate contents straddle its splits by its own design."""
    from fixtures_tiny import tiny_config
    from prodesc.train import recipe as train

    _, b, _ = two_prepares
    strict = tmp_path / "strict"
    strict.mkdir()
    write_index(strict, read_split(b, "train"), DataConfig())  # what the train command's defaults used to give
    with pytest.raises(ProdescError, match="near-duplicate"):
        check_overlap(strict, read_split(b, "test"), allow_overlap=False)
    run = train.train(tiny_config("train.max_steps=1", "train.max_length=64", "train.max_eval_samples=4"), b,
                      tmp_path / "run")
    assert check_overlap(run, read_split(b, "test"), allow_overlap=False) == 0

"""`prodesc data prepare` / `data synth`: cleaning, drops, leak-free splits, formats, atomicity, errors."""

from __future__ import annotations

import csv
import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.config import DataConfig
from prodesc.data import parallel, readers
from prodesc.data import prepare as data
from prodesc.data.clean import clean_text, family_key, lossy_ascii_lower
from prodesc.data.prepare import prepare
from prodesc.data.synth import synth
from prodesc.errors import ProdescError

JUDITH = "Judith Kerr\u2019s best\u2013selling adventures"


def _jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rec(uid: str, title: str, content: str) -> dict:
    return {"uid": uid, "title": title, "content": content, "target_ind": [1, 2], "target_rel": [1.0, 1.0]}


def _rows(out: Path) -> list[dict]:
    return [r for s in data.SPLITS for r in pq.read_table(out / f"{s}.parquet").to_pylist()]


def _split_of(out: Path) -> dict[str, str]:
    """uid -> split name."""
    return {r["uid"]: s for s in data.SPLITS for r in pq.read_table(out / f"{s}.parquet").to_pylist()}


@pytest.fixture(scope="module")
def synth_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "catalog.json.gz"
    synth(4000, path, seed=1, malformed=4)
    return path


@pytest.fixture(scope="module")
def synth_prepared(synth_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([synth_catalog], out, DataConfig(val_fraction=0.2, test_fraction=0.2))
    return out


# ------------------------------------------------------------------------------------------------ cleaning


def test_clean_text_real_trn_line(shared_dir: Path) -> None:
    line = (shared_dir / "data" / "trn_format_example.jsonl").read_text(encoding="utf-8").splitlines()[0]
    content = clean_text(json.loads(line)["content"])
    assert content.startswith(JUDITH)
    assert "board books\u2014with" in content and "&" not in content


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Kerr&amp;#8217;s", "Kerr\u2019s"),  # double-escaped
        ("Tips &amp;amp; Tricks", "Tips & Tricks"),
        ("&quot;Hi&quot; &mdash; &eacute;t&eacute; &#x2019; &#146;", '"Hi" \u2014 \u00e9t\u00e9 \u2019 \u2019'),
        ("AT&T and R&D", "AT&T and R&D"),
    ],
)
def test_clean_text_decodes_entities(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("line<br>break<br/>again<BR />end", "line break again end"),
        ("<p>One</p><p>Two</p>", "One Two"),
        ("<b>Bold</b> and <i>it</i>alic <a href='x'>link</a>", "Bold and italic link"),
        ("a < b and c > d, I <3 it", "a < b and c > d, I <3 it"),
        ("&lt;br&gt;escaped tag", "escaped tag"),
    ],
)
def test_clean_text_removes_tags(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_clean_text_keeps_case_punctuation_accents_and_dashes() -> None:
    text = "Crème Brûlée – “Best” — it’s 100% GREAT!"
    assert clean_text(text) == text


def test_clean_text_nfkc_controls_and_whitespace() -> None:
    assert clean_text("\ufb01ne\u00a0print\u2003x") == "fine print x"  # NFKC: ligature, odd spaces
    assert clean_text("  a\x00b\t\tc\n\nd\x7f  ") == "a b c d"
    assert clean_text("soft\u00adhyphen zero\u200bwidth \ud800lone") == "softhyphen zerowidth lone"


def test_lossy_ascii_lower_is_the_notebooks() -> None:
    assert lossy_ascii_lower(clean_text("Kerr&#8217;s Crème – 2 Books!")) == "kerrs crme 2 books"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Girls Ballet Tutu Neon Pink", "Girls Ballet Tutu Neon Blue"),
        ("Harry Potter Vol. 1", "Harry Potter, Volume 2"),
        ("The Saga Part 3", "The Saga (Book 4)"),
        ("The Very Bad Bunny (Beginner Series)", "The Very Bad Bunny"),
        ("Worship with Don Moen [VHS]", "Worship with Don Moen [DVD]"),
        ("Carhartt T-Shirt, Black, XL", "Carhartt T-Shirt - Small"),
        ("Coffee Beans 12 oz", "Coffee Beans, 3-Pack"),
        ("Coffee Beans (Pack of 6)", "Coffee Beans 500ml"),
        ("On Happiness, U.S. Edition", "On Happiness, 2nd Edition"),
        ("Crème Brûlée #5", "Creme Brulee 6"),
    ],
)
def test_family_key_groups_variants(a: str, b: str) -> None:
    assert family_key(a) == family_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("The Prophet", "The Hobbit"), ("Mog's Kittens", "Mog's Puppies"), ("Red Rising", "Dark Rising Sun")],
)
def test_family_key_keeps_different_products_apart(a: str, b: str) -> None:
    assert family_key(a) != family_key(b)


def test_family_key_falls_back_to_the_title() -> None:
    assert family_key("Red") == "red"
    assert family_key("The Queen") == "the queen"


# ----------------------------------------------------------------------------------- the notebook's defects


def test_prepare_keeps_uid_leading_zeros(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("0000031909", "A", "x"), _rec("000100039X", "B", "y")])
    prepare([src], tmp_path / "out", DataConfig(val_fraction=0, test_fraction=0))
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert table.schema.field("uid").type == pa.string()
    assert table.column("uid").to_pylist() == ["0000031909", "000100039X"]


def test_dedupe_result_is_used(tmp_path: Path) -> None:
    records = [
        _rec("1", "Mog's Kittens", "A cat."),
        _rec("2", "Mog's Kittens", "A cat."),  # exact duplicate
        _rec("3", "MOG'S  kittens", "Another text."),  # same title, case/space-insensitive
        _rec("4", "Other", "A &amp; B"),
        _rec("5", "Other", "A & B"),  # duplicate once cleaned
    ]
    stats = prepare([_jsonl(tmp_path / "trn.json", records)], tmp_path / "out", DataConfig())
    rows = _rows(tmp_path / "out")
    assert sorted(r["uid"] for r in rows) == ["1", "4"]
    assert stats["dropped"]["duplicate_record"] == 2 and stats["dropped"]["duplicate_title"] == 1
    assert stats["kept"] == 2 == sum(s["records"] for s in stats["splits"].values())


def test_html_entities_decoded_not_destroyed(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("1", "Mog&#8217;s Kittens", "Kerr&#8217;s best&#8211;selling")])
    prepare([src], tmp_path / "out", DataConfig(val_fraction=0, test_fraction=0))
    [row] = _rows(tmp_path / "out")
    assert row["title"] == "Mog\u2019s Kittens" and row["content"] == "Kerr\u2019s best\u2013selling"


def test_lossy_ascii_lower_option(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("1", "Mog&#8217;s Kittens", "Kerr&#8217;s BEST")])
    prepare([src], tmp_path / "out", DataConfig(lossy_ascii_lower=True, val_fraction=0, test_fraction=0))
    [row] = _rows(tmp_path / "out")
    assert (row["title"], row["content"]) == ("mogs kittens", "kerrs best")


def test_no_family_in_two_splits(synth_prepared: Path) -> None:
    rows = [(s, r) for s in data.SPLITS for r in pq.read_table(synth_prepared / f"{s}.parquet").to_pylist()]
    by_key: dict[str, set] = {}
    by_content: dict[str, set] = {}
    by_family: dict[str, set] = {}
    for split, r in rows:
        by_key.setdefault(family_key(r["title"]), set()).add(split)
        by_content.setdefault(r["content"], set()).add(split)
        by_family.setdefault(r["family"], set()).add(split)
    assert all(len(s) == 1 for s in [*by_key.values(), *by_content.values(), *by_family.values()])
    assert {s for s, _ in rows} == set(data.SPLITS)  # 20%/20%: every split has records


def test_no_family_in_two_splits_real_sample(shared_dir: Path, tmp_path: Path) -> None:
    src = shared_dir / "data" / "lf_amazon_first400.json"
    for salt in ("a", "b", "c", "d"):  # several splits: the tutus are together in each
        out = tmp_path / salt
        prepare([src], out, DataConfig(val_fraction=0.3, test_fraction=0.3, split_salt=salt))
        where = {
            r["title"]: (s, r["family"]) for s in data.SPLITS for r in pq.read_table(out / f"{s}.parquet").to_pylist()
        }
        assert where["Girls Ballet Tutu Neon Pink"] == where["Girls Ballet Tutu Neon Blue"]


def test_series_blurb_joins_a_family(tmp_path: Path) -> None:
    blurb = "Part of the bestselling Moon series."
    records = [_rec("1", "Alpha Quest", blurb), _rec("2", "Beta Journey", blurb), _rec("3", "Beta Journey 2", "x")]
    prepare([_jsonl(tmp_path / "t.jsonl", records)], tmp_path / "out", DataConfig())
    families = {r["uid"]: r["family"] for r in _rows(tmp_path / "out")}
    assert families == {"1": "alpha quest", "2": "alpha quest", "3": "alpha quest"}  # transitive, first key


# ------------------------------------------------------------------------------ outputs, determinism, atomic


def test_prepare_outputs_and_stats(synth_prepared: Path) -> None:
    assert sorted(p.name for p in synth_prepared.iterdir()) == [
        "config.resolved.yaml", "stats.json", "test.parquet", "train.parquet", "val.parquet",
    ]  # fmt: skip
    schema = pq.read_schema(synth_prepared / "train.parquet")
    assert schema.names == ["uid", "title", "content", "family"] and set(schema.types) == {pa.string()}
    stats = json.loads((synth_prepared / "stats.json").read_text())
    assert stats["records_read"] == 4000 and stats["malformed"]["count"] == 4
    assert len(stats["malformed"]["first"]) == 4 and "catalog.json.gz:" in stats["malformed"]["first"][0]
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["records_read"]
    assert stats["dropped"]["empty_content"] > 1000 and stats["dropped"]["duplicate_title"] > 0
    assert set(stats["lengths"]["content_chars"]) == {"p5", "p50", "p95", "max"}
    assert stats["inputs"][0]["name"] == "catalog.json.gz" and stats["config"]["val_fraction"] == 0.2
    text = (synth_prepared / "train.parquet").read_bytes()
    assert b"&#8217;" not in text  # pyarrow compresses; the real check is on rows below
    assert not any("&#" in r["content"] or "<br" in r["content"] for r in _rows(synth_prepared))


def test_prepare_is_deterministic(synth_catalog: Path, synth_prepared: Path, tmp_path: Path) -> None:
    prepare([synth_catalog], tmp_path / "again", DataConfig(val_fraction=0.2, test_fraction=0.2))
    for f in synth_prepared.iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def test_prepare_in_worker_processes_gives_the_same_bytes(
    synth_catalog: Path, synth_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "BLOCK_BYTES", 64 << 10)  # many chunks, row groups still fixed
    shipped = []  # blocks reach the workers through shared slots, each slot reused many times
    to_shared = readers.to_shared
    monkeypatch.setattr(readers, "to_shared", lambda *a: shipped.append(to_shared(*a)) or shipped[-1])
    prepare([synth_catalog], tmp_path / "par", DataConfig(val_fraction=0.2, test_fraction=0.2, workers=2))
    for f in synth_prepared.glob("*.parquet"):
        assert (tmp_path / "par" / f.name).read_bytes() == f.read_bytes(), f.name
    stats = json.loads((tmp_path / "par" / "stats.json").read_text())
    assert stats.pop("config")["workers"] == 2  # the only difference: the option itself
    assert stats == {k: v for k, v in json.loads((synth_prepared / "stats.json").read_text()).items() if k != "config"}
    slots = [c.shared[0] for c in shipped if c.shared]
    assert len(slots) == len(shipped) > 3 * len(set(slots)), (len(shipped), set(slots))


def test_shared_slots_hand_over_blocks_and_refuse_oversized_ones() -> None:
    slots = parallel.SharedSlots(slots=3, slot_bytes=8)
    assert [slots.put(i, bytes([i]) * 8) for i in range(4)] == [0, 1, 2, 0]
    assert slots.take(0, 8) == bytes([3]) * 8 and slots.take(2, 3) == bytes([2]) * 3
    assert slots.put(5, b"x" * 9) is None  # sent through the pipe instead


def test_failed_write_leaves_no_output_and_no_temp_dir(
    synth_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare([synth_catalog], tmp_path / "out", DataConfig())
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_refused_unless_overwrite(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("1", "A", "x")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ProdescError, match="--overwrite"):
        prepare([src], out, DataConfig())
    assert (out / "old.txt").exists()
    prepare([src], out, DataConfig(), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "train.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "trn.json"]


# ------------------------------------------------------------------------------------------- bad input


def _broken(tmp_path: Path) -> Path:
    path = tmp_path / "trn.json"
    good = json.dumps(_rec("1", "A", "x")).encode()
    path.write_bytes(b"\n".join([good, b'{"uid": "2", "title": ', b'{"uid": "3", "title": "\xff"}', b"[1]", b""]))
    return path


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    src = _broken(tmp_path)
    stats = prepare([src], tmp_path / "out", DataConfig())
    assert stats["kept"] == 1 and stats["dropped"]["malformed"] == 3
    assert stats["malformed"]["first"] == [f"{src}:2", f"{src}:3", f"{src}:4"]


def test_strict_fails_naming_file_and_line(tmp_path: Path) -> None:
    src = _broken(tmp_path)
    with pytest.raises(ProdescError, match=rf"{src}:2: malformed"):
        prepare([src], tmp_path / "out", DataConfig(strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trn.json"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProdescError, match="nope.json not found"):
        prepare(
            [_jsonl(tmp_path / "a.json", [_rec("1", "A", "x")]), tmp_path / "nope.json"], tmp_path / "o", DataConfig()
        )
    assert not (tmp_path / "o").exists()


def test_unknown_extension_lists_known_ones(tmp_path: Path) -> None:
    (tmp_path / "cat.xlsx").write_text("x")
    with pytest.raises(ProdescError, match=r"unknown format.*\.jsonl.*\.parquet"):
        prepare([tmp_path / "cat.xlsx"], tmp_path / "o", DataConfig())


def test_wrong_field_lists_existing_fields(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("1", "A", "x")])
    with pytest.raises(ProdescError, match=r"--title-field 'name' .*fields: uid, title, content"):
        prepare([src], tmp_path / "o", DataConfig(title_field="name"))


def test_zero_records_left(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trn.json", [_rec("1", "A", ""), _rec("2", "B", "short")])
    with pytest.raises(ProdescError, match="no records left.*min-content-chars"):
        prepare([src], tmp_path / "o", DataConfig(min_content_chars=100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trn.json"]


# ---------------------------------------------------------------------------------------------- formats


def test_gz_and_zip_inputs(tmp_path: Path) -> None:
    lines = (json.dumps(_rec("0000031909", "Mog", "Kerr&#8217;s")) + "\n").encode()
    gz = tmp_path / "trn.json.gz"
    gz.write_bytes(gzip.compress(lines))
    archive = tmp_path / "Amazon-Titles-1.3MM.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("LF-Amazon-1.3M/trn.json.gz", gzip.compress(lines))
        zf.writestr("LF-Amazon-1.3M/tst.json.gz", gzip.compress(b"{}\n"))
    for src in (gz, archive):
        out = tmp_path / f"out-{src.name}"
        stats = prepare([src], out, DataConfig(val_fraction=0, test_fraction=0))
        assert [(r["uid"], r["content"]) for r in _rows(out)] == [("0000031909", "Kerr\u2019s")]
    assert stats["inputs"][0]["name"] == "Amazon-Titles-1.3MM.zip:LF-Amazon-1.3M/trn.json.gz"


def test_csv_input_keeps_string_ids_and_maps_fields(tmp_path: Path) -> None:
    src = tmp_path / "cat.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["asin", "product", "blurb"])
        w.writerow(["000100039X", "Mog", "A cat,\nwith a newline &amp; more"])
        w.writerow(["0000031909", "Tutu", "x" * 200_000])  # longer than csv's default field limit
    cfg = DataConfig(title_field="product", content_field="blurb", val_fraction=0, test_fraction=0)
    prepare([src], tmp_path / "out", cfg)
    assert [(r["uid"], r["content"][:20]) for r in _rows(tmp_path / "out")] == [
        ("000100039X", "A cat, with a newlin"),
        ("0000031909", "x" * 20),
    ]


def test_json_array_input_with_auto_fields(shared_dir: Path, tmp_path: Path) -> None:
    stats = prepare([shared_dir / "data" / "lf_amazon_first400.json"], tmp_path / "out", DataConfig())
    assert stats["records_read"] == 400 and stats["kept"] > 300
    rows = {r["title"]: r for r in _rows(tmp_path / "out")}
    assert rows["Mog's Kittens"]["content"].startswith(JUDITH)
    assert rows["Girls Ballet Tutu Neon Pink"]["uid"] == "lf_amazon_first400-000000001"


def test_json_array_streams_large_elements(tmp_path: Path) -> None:
    big = "word " * 600_000  # 3 MB: bigger than the 1 MiB read buffer
    items = [{"instruction": "Big", "output": big}, {"instruction": "Small", "output": "tiny", "input": ""}]
    src = tmp_path / "cat.json"
    src.write_text(json.dumps(items, indent=1), encoding="utf-8")
    prepare([src], tmp_path / "out", DataConfig(val_fraction=0, test_fraction=0))
    assert [(r["uid"], len(r["content"])) for r in _rows(tmp_path / "out")] == [
        ("cat-000000001", len(big.strip())),
        ("cat-000000002", 4),
    ]


def test_parquet_input_with_int_ids(tmp_path: Path) -> None:
    src = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"id": [7, 8], "name": ["A", "B"], "description": ["x", None]}), src)
    stats = prepare([src], tmp_path / "out", DataConfig(val_fraction=0, test_fraction=0))
    assert [r["uid"] for r in _rows(tmp_path / "out")] == ["7"] and stats["dropped"]["empty_content"] == 1


# ------------------------------------------------------------------------------------------------ synth


def test_synth_is_deterministic_and_in_trn_format(synth_catalog: Path, tmp_path: Path) -> None:
    again = synth(4000, tmp_path / "again.json.gz", seed=1, malformed=4)
    assert again.read_bytes() == synth_catalog.read_bytes()
    assert synth(4000, tmp_path / "other.json.gz", seed=2).read_bytes() != synth_catalog.read_bytes()
    good = []
    for line in gzip.decompress(synth_catalog.read_bytes()).splitlines():
        try:
            good.append(json.loads(line))
        except ValueError:
            continue
    assert len(good) >= 3996 - 2  # a malformed "[1, 2, 3]" still parses, as a list
    records = [g for g in good if isinstance(g, dict)]
    assert all(list(r) == ["uid", "title", "content", "target_ind", "target_rel"] for r in records)
    assert all(isinstance(r["uid"], str) and len(r["uid"]) == 10 for r in records)
    assert any(r["uid"].startswith("000") for r in records)
    raw = gzip.decompress(synth_catalog.read_bytes())
    for marker in (b"&#8217;", b"&amp;", b"&quot;", b"&amp;#8217;", b"<br>"):
        assert marker in raw, marker


def test_synth_plain_json_and_bad_arguments(tmp_path: Path) -> None:
    out = synth(10, tmp_path / "cat.json", seed=0, malformed=10)
    assert len(out.read_bytes().splitlines()) == 10
    with pytest.raises(ProdescError, match="--malformed"):
        synth(5, tmp_path / "x.json", malformed=6)
    with pytest.raises(ProdescError, match=r"\.json\.gz"):
        synth(5, tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_synth_then_prepare(tmp_path: Path) -> None:
    runner = CliRunner()
    cat = tmp_path / "cat.json.gz"
    result = runner.invoke(app, ["data", "synth", "--n", "300", "--out", str(cat), "--malformed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "prepare", str(cat), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "malformed" in result.output
    result = runner.invoke(app, ["data", "prepare", str(cat), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "--overwrite" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.json"], "not found"),
        (["cat.txt"], "unknown format"),
        (["cat.jsonl", "--title-field", "nope"], "--title-field 'nope'"),
        (["cat.jsonl", "--min-content-chars", "1000"], "no records left"),
        (["bad.jsonl", "--strict"], "bad.jsonl:2: malformed"),
    ],
)
def test_cli_errors_exit_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "cat.jsonl", [_rec("1", "A", "x")])
    (tmp_path / "cat.txt").write_text("x")
    _jsonl(tmp_path / "bad.jsonl", [_rec("1", "A", "x"), "{nope"])
    result = CliRunner().invoke(app, ["data", "prepare", *args, "--out", "out"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- the fast columnar path equals the per-record reference

_EDGE_TEXTS = [
    "",
    " ",
    "   ",
    "plain text",
    "  leading and trailing  ",
    "double  space",
    "tab\tand\nnewline\r\n",
    "ctrl\x01char\x7f",
    "Kerr&#8217;s",
    "Kerr&#x2019;s",
    "Kerr&#X2019;s",
    "Kerr&rsquo;s",
    "&amp;#8217;",
    "&amp;amp;",
    "&amp;amp;amp;amp;amp;amp;amp;#8217;",
    "&quot;quoted&quot;",
    "&#8217s no semicolon",
    "&amp no semicolon",
    "&copy2024",
    "&unknown; entity",
    "Tom & Jerry",
    "&",
    "&&#8217;",
    "a &lt;b&gt; tag",
    "<br>line<p>para</p>",
    "a < b and c > d",
    "<3",
    "<!-- comment -->kept",
    "<b>bold</b>",
    "Café crème",
    "ﬁne … ligature",
    "no\xa0break",
    "soft\u00adhyphen",
    "zero\u200bwidth",
    "bom\ufeff",
    "emoji 😀",
    "１２３ fullwidth",
    "İstanbul",
    "Straße",
    "ÀÉÎÕÜ",
    "\u2028line sep",
    "mixed &#8217; and é",
]
_EDGE_TITLES = [
    "Girls Ballet Tutu Neon Pink",
    "Girls Ballet Tutu (Neon Blue)",
    "The Hobbit, Vol. 2",
    "Harry Potter #5",
    "Coffee Beans 12 oz (Pack of 6)",
    "Poster 12 x 18 inches",
    "T-Shirt Black XL",
    "T-Shirt - XL",
    "Rocky 2",
    "1984",
    "The",
    "The A Of",
    "!!!",
    "A_B_C",
    "Paris 1900-1914",
    "Mog's Christmas",
    "Plan B",
    "2nd Edition Guide",
    "Dune: U.S. Edition [Paperback]",
    "[VHS]",
    "(Only brackets)",
    "Large Print Edition",
    "500ml Bottle 3-Pack",
    "Café au lait Mug – Red",
    "Ｆｕｌｌ Ｗｉｄｔｈ",
    "Season 2 Episode 3",
    "Book IV",
    "set of 3",
    "xl",
    "Size 10",
    "UPPER CASE TITLE",
    "Title: Subtitle 3",
    "edition",
    "a  b",
    "Volume II: The Return",
    "{braces} here",
]


def _synth_texts(n: int) -> tuple[list[str], list[str]]:
    from prodesc.data.synth import synth  # its records are what prepare sees most

    rows = []
    with pytest.MonkeyPatch.context():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.json"
            synth(n, path, seed=3, malformed=0)
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["title"] for r in rows], [r["content"] for r in rows]


def test_clean_column_equals_clean_text() -> None:
    from prodesc.data import columns

    titles, contents = _synth_texts(3000)
    texts = _EDGE_TEXTS + [f"  {t}  " for t in _EDGE_TEXTS] + titles + contents
    got = columns.clean_column(pa.array(texts + [None])).to_pylist()
    assert got == [clean_text(t) for t in texts] + [""]


def test_cached_entity_decoding_is_html_unescape() -> None:
    import html

    from prodesc.data import clean

    titles, contents = _synth_texts(2000)
    texts = _EDGE_TEXTS + titles + contents + ["&amplifier &quotation; &" + "a" * 40 + "; &#x110000; &#0; &#128;"]
    assert [clean._CHARREF_RE.sub(clean._charref, t) for t in texts] == [html.unescape(t) for t in texts]
    if hasattr(html, "_charref"):  # the pattern is html.unescape's own
        assert clean._CHARREF_RE.pattern == html._charref.pattern


def test_family_keys_title_keys_and_ids_equal_the_python_rules() -> None:
    from prodesc.data import columns

    titles, _ = _synth_texts(3000)
    cleaned = [t for t in (clean_text(x) for x in _EDGE_TITLES + _EDGE_TEXTS + titles) if t]
    arr = pa.array(cleaned)
    assert columns.family_keys(arr).to_pylist() == [family_key(t) for t in cleaned]
    assert columns.title_keys(arr).to_pylist() == [t.casefold() for t in cleaned]
    ids = ["0000031909", " B00X \t", "\x1cid\x1f", "ïd ", "", None]
    assert columns.strip_ids(pa.array(ids)).to_pylist() == [
        i.strip() if i.isascii() else clean_text(i) for i in (x or "" for x in ids)
    ]


def _tricky_jsonl(path: Path) -> Path:
    """Lines that Arrow's JSON reader parses differently from json.loads, or not at all, between good ones."""
    good = [
        json.dumps(_rec(f"{i:010d}", f"Product {i} Neon {c}", f"Text &#8217;{i}&amp;#8211; <b>x</b> é"))
        for i, c in zip(range(40), ["Pink", "Blue"] * 20, strict=True)
    ]
    bad = [
        "\ufeff" + json.dumps(_rec("bom-late", "BOM not on line 1", "c")),
        "",
        "   ",
        json.dumps(_rec("crlf", "CRLF line", "c")) + "\r",
        json.dumps(_rec("two-a", "Two", "c")) + json.dumps(_rec("two-b", "Objects", "c")),
        json.dumps({"uid": 31909, "title": "Numeric id", "content": "c"}),
        json.dumps({"uid": "b", "title": True, "content": "bool title"}),
        json.dumps({"uid": "l", "title": ["list"], "content": "c"}),
        json.dumps({"uid": "f", "title": "Float content", "content": 3.0}),
        json.dumps({"uid": "n", "title": "Null content", "content": None}),
        json.dumps({"uid": "m", "content": "missing title"}),
        '{"uid": "s", "title": "lone \\ud800 surrogate", "content": "c"}',
        '{"uid": "p", "title": "pair \\ud83d\\ude00", "content": "c"}',
        '{"uid": "d", "title": "first", "title": "dup key", "content": "c"}',
        '{"uid": "nan", "title": NaN, "content": "c"}',
        '{"uid": "t", "title": "trailing", "content": "c"} junk',
        '{"uid": "tr", "title": "truncated',
        '{"uid": "z", "title": "nul \\u0000 char", "content": "c"}',
        '{"uid": "lab", "title": "damaged labels", "content": "c", "target_ind": [1, x], "target_rel": [1.0]}',
        "[1, 2, 3]",
        '"just a string"',
    ]
    lines = [json.dumps(_rec("first", "BOM on line 1", "c")).join(["\ufeff", ""])]
    for i, b in enumerate(bad):
        lines += good[i % 40 : i % 40 + 3] + [b]
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    raw += b'\n{"uid": "u", "title": "bad \xff byte", "content": "c"}'
    raw += b'\n{"uid": "v", "title": "ok", "content": "c", "x": "\xfe"}\n'
    raw += "\n".join(good).encode() + b"\n"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("block_bytes", [1 << 20, 700])
def test_arrow_json_reader_gives_the_line_readers_output(
    tmp_path: Path, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tricky_jsonl(tmp_path / "tricky.jsonl")
    monkeypatch.setattr(readers, "BLOCK_BYTES", block_bytes)
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(readers, "ARROW_JSON", fast)
        outs[fast] = tmp_path / f"out-{fast}"
        prepare([src], outs[fast], DataConfig(val_fraction=0.2, test_fraction=0.2))
    for name in ("train.parquet", "val.parquet", "test.parquet", "stats.json"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    stats = json.loads((outs[True] / "stats.json").read_text())
    assert (
        stats["malformed"]["count"] == 8
    )  # late BOM, list title, trailing junk, truncated, 2 non-objects, 2 bad bytes
    uids = {r["uid"] for r in _rows(outs[True])}
    assert {"first", "crlf", "31909", "b", "f", "p", "s", "d", "z", "nan", "lab"} <= uids
    assert not {"bom-late", "l", "t", "tr", "u", "v"} & uids


def test_arrow_json_reader_numeric_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [{"id": i, "name": f"Lamp {i}", "description": f"A lamp, model {i}."} for i in range(300)]
    recs[150] = {"id": 1.5, "name": "Float id", "description": "An id that is not an integer."}
    src = _jsonl(tmp_path / "numeric.jsonl", recs)
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(readers, "ARROW_JSON", fast)
        outs[fast] = tmp_path / f"out-{fast}"
        prepare([src], outs[fast], DataConfig())
    for s in data.SPLITS:
        assert (outs[True] / f"{s}.parquet").read_bytes() == (outs[False] / f"{s}.parquet").read_bytes()
    assert {"0", "299", "1.5"} <= {r["uid"] for r in _rows(outs[True])}


def test_arrow_json_reader_on_the_synthetic_corpus(
    synth_catalog: Path, synth_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "ARROW_JSON", False)
    prepare([synth_catalog], tmp_path / "slow", DataConfig(val_fraction=0.2, test_fraction=0.2))
    for s in data.SPLITS:
        assert (tmp_path / "slow" / f"{s}.parquet").read_bytes() == (synth_prepared / f"{s}.parquet").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_damaged_gz_is_a_user_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "catalog.json.gz"
    body = gzip.compress(("\n".join(json.dumps(_rec(str(i), f"T {i}", "c" * 50)) for i in range(20000))).encode())
    path.write_bytes(body[: len(body) // 2] if damage == "truncated" else b"plain text, not gzip")
    with pytest.raises(ProdescError, match="damaged.*re-download"):
        prepare([path], tmp_path / "out", DataConfig())
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_split_files_do_not_depend_on_how_parts_were_cut(tmp_path: Path) -> None:
    rows = 3000  # ~6 MB of content: several Parquet pages, whose cuts must not follow the parts' boundaries
    table = pa.table(
        {
            "uid": [f"{i:06d}" for i in range(rows)],
            "title": [f"Title {i}" for i in range(rows)],
            "content": [f"content {i} " * (150 + i % 50) for i in range(rows)],
            "family": [f"title {i}" for i in range(rows)],
        }
    )
    written = []
    for part_rows in (rows, 37, 500):
        path = tmp_path / f"parts-{part_rows}.parquet"
        writer = data._SplitWriter(path)
        for start in range(0, rows, part_rows):
            writer.add(table.slice(start, part_rows))
        writer.close()
        written.append(path.read_bytes())
    assert pq.read_table(tmp_path / "parts-37.parquet").equals(table)
    assert written[0] == written[1] == written[2]


def test_synth_has_template_style_siblings_that_differ_in_code_capacity_colour(tmp_path: Path) -> None:
    import re

    out = synth(1500, tmp_path / "c.json", seed=3)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    spec = re.compile(r"^(?P<stem>.+) - (?P<code>[A-Z]{2}-\d+[A-Z])/ (?P<rest>.+)$")
    by_stem: dict[str, list[re.Match]] = {}
    own = 0
    for r in records:
        m = spec.match(r["content"])
        if m:
            own += m["code"] in r["title"]  # the house template filled with its own title's values
            by_stem.setdefault(m["stem"] + m["code"][:2], []).append(m)  # siblings share the code's letters
    matched = sum(map(len, by_stem.values()))
    assert own >= 0.9 * matched  # the rest: repeated titles given another record's content, on purpose
    families = [ms for ms in by_stem.values() if len({m["code"] for m in ms}) > 1]
    assert len(families) >= 5  # siblings: one template, several model codes
    for ms in families:
        features = {tuple(m["rest"].split("/ ")[1:3]) for m in ms}
        assert len(features) == 1  # shared features: a sibling's description is most of the answer
    assert any(len({m["rest"] for m in ms}) > 1 for ms in families)  # capacity/colour differ too

"""`prodesc data prepare` / `data synth`: cleaning, drops, leak-free splits, formats, atomicity, errors."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prodesc.cli import app
from prodesc.config import DataConfig
from prodesc.data import parallel, parse, readers
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


def test_clean_text_removes_bidirectional_controls() -> None:
    # "Trojan Source": U+202E shows "txt.exe" as "exe.txt"; every Bidi_Control character goes
    assert clean_text("invoice\u202etxt.exe") == "invoicetxt.exe"
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    assert clean_text(f"a{bidi}b {bidi} c") == "ab c"


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


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigkill_leaves_no_worker_behind_and_the_next_run_removes_its_temp_dir(tmp_path: Path) -> None:
    # lines that need clean.py in Python: slow enough (~17 MB) to be killed mid-run
    lines = "".join(
        json.dumps(_rec(str(i), f"Caf\u00e9 &amp;#8217; Mug {i}", f"Tr\u00e8s &lt;b&gt; bien &#8211; {i} " * 3)) + "\n"
        for i in range(5000)
    )
    src = tmp_path / "slow.jsonl"
    src.write_text(lines * 20, encoding="utf-8")
    cmd = [sys.executable, "-m", "prodesc.cli", "data", "prepare", str(src), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen([*cmd, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*/work/part-*.arrow")):
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None, "not caught mid-run"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _running(w)], "workers outlived their parent"
    finally:  # a failure must not leave processes behind either
        for pid in [proc.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert [p.name.split("-")[1] for p in tmp_path.glob(".out.tmp-*")] == [str(proc.pid)]  # the debris
    prepare([_jsonl(tmp_path / "small.jsonl", [_rec("1", "A", "x")])], tmp_path / "out", DataConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slow.jsonl", "small.jsonl"]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def test_titles_over_the_cap_are_dropped_and_counted(tmp_path: Path) -> None:
    """One cap on title length for every verb (data.max_title_chars), applied when data is read: a 100,000-character
    title among 260 records made the preset demand train.max_length 25,059."""
    src = tmp_path / "x.jsonl"
    rows = [{"uid": str(i), "title": f"Mug {i}", "content": f"A mug, number {i}."} for i in range(20)]
    rows[3]["title"] = "Huge " * 20_000
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = prepare([src], tmp_path / "out", DataConfig())
    assert stats["dropped"]["long_title"] == 1 and stats["kept"] == 19
    stats = prepare([src], tmp_path / "out6", DataConfig(max_title_chars=5))
    assert stats["dropped"]["long_title"] == 11 and stats["kept"] == 9  # and "Mug 10" .. "Mug 19" are 6


def test_strict_fails_naming_file_and_line(tmp_path: Path) -> None:
    src = _broken(tmp_path)
    with pytest.raises(ProdescError, match=rf"{src}:2: malformed"):
        prepare([src], tmp_path / "out", DataConfig(strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trn.json"]


def test_null_line_at_a_block_start_is_a_counted_malformed_line(tmp_path: Path) -> None:
    # pyarrow's JSON reader crashed the process (SIGSEGV, exit 139) on a top-level null as a block's first row;
    # a subprocess, so that a regression fails this test instead of killing the test run
    src = tmp_path / "x.jsonl"
    src.write_text('null\n{"uid":"1","title":"T","content":"C"}\n')
    res = subprocess.run(
        [sys.executable, "-m", "prodesc.cli", "data", "prepare", str(src), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["kept"] == 1 and stats["malformed"] == {"count": 1, "first": [f"{src}:1"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "x.jsonl"]


def test_line_longer_than_max_line_bytes_is_one_malformed_line_read_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    bomb = b'{"uid": "bomb", "title": "' + b"A" * (64 << 20) + b'", "content": "c"}\n'  # 64 MiB, 64 KiB gzipped
    good = [json.dumps(_rec(str(i), f"Lamp {i}", "A lamp.")).encode() + b"\n" for i in range(3)]
    src = tmp_path / "bomb.jsonl.gz"
    src.write_bytes(gzip.compress(bomb + good[0] + bomb + b"".join(good[1:]), compresslevel=1))
    del bomb
    cfg = DataConfig(max_line_bytes=1 << 20)
    tracemalloc.start()
    try:
        sources = readers.open_source(src, cfg)  # field names: the first line is the bomb, read past
        chunks = [(c.first_no, c.rows, c.n_lines) for c in readers.chunks(sources, _NoBar())]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sources[0].fields == ("title", "content", "uid")
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held for a 64 MiB line"
    assert [(no, rows[0][-1]) for no, rows, _ in chunks if rows] == [
        (1, "line longer than data.max_line_bytes=1048576"),
        (3, "line longer than data.max_line_bytes=1048576"),
    ]
    stats = prepare([src], tmp_path / "out", cfg)
    assert stats["kept"] == 3 and stats["malformed"] == {"count": 2, "first": [f"{src}:1", f"{src}:3"]}
    with pytest.raises(ProdescError, match=rf"{src}:1: malformed record \(line longer than data.max_line_bytes"):
        prepare([src], tmp_path / "strict", cfg.model_copy(update={"strict": True}))


class _NoBar:
    n = 0

    def update(self, n: int) -> None:
        pass


@pytest.mark.parametrize("kind", ["jsonl", "array"])
def test_nan_and_infinite_titles_or_contents_are_malformed_not_products(tmp_path: Path, kind: str) -> None:
    lines = [
        json.dumps(_rec("1", "Lamp", "A lamp.")),
        '{"uid": "2", "title": NaN, "content": "c"}',
        '{"uid": "3", "title": "Mug", "content": Infinity}',
        '{"uid": "4", "title": 12, "content": 3.5}',  # finite numbers stay text, as before
    ]
    src = tmp_path / f"cat.{'jsonl' if kind == 'jsonl' else 'json'}"
    src.write_text("\n".join(lines) + "\n" if kind == "jsonl" else "[" + ",\n".join(lines) + "]")
    stats = prepare([src], tmp_path / "out", DataConfig())
    assert stats["dropped"]["malformed"] == 2
    assert sorted((r["uid"], r["title"]) for r in _rows(tmp_path / "out")) == [("1", "Lamp"), ("4", "12")]


def test_json_array_without_its_closing_bracket_is_a_user_error(tmp_path: Path) -> None:
    src = tmp_path / "cat.json"
    src.write_text("[" + ", ".join(json.dumps(_rec(str(i), f"T {i}", "c")) for i in range(3)))
    with pytest.raises(ProdescError, match=rf"{src}: the JSON array ends without its closing '\]'.*re-download"):
        prepare([src], tmp_path / "out", DataConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.json"]


def test_deeply_nested_json_is_malformed_in_lines_and_a_user_error_in_an_array(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(_rec("1", "Lamp", "A lamp.")), '{"uid": "2", "title": "T", "content": ' + deep + "}", deep]
    src = _jsonl(tmp_path / "cat.jsonl", lines)
    stats = prepare([src], tmp_path / "out", DataConfig())
    assert stats["kept"] == 1 and stats["malformed"]["first"] == [f"{src}:2", f"{src}:3"]
    array = tmp_path / "cat.json"
    array.write_text("[" + ", ".join(lines) + "]")
    with pytest.raises(ProdescError, match=rf"{array}:1: invalid JSON \(nested too deeply\)"):
        prepare([array], tmp_path / "out2", DataConfig())


@pytest.mark.parametrize("damage", ["not parquet", "truncated"])
def test_damaged_parquet_is_a_user_error(tmp_path: Path, damage: str) -> None:
    src = tmp_path / "cat.parquet"
    if damage == "not parquet":
        src.write_text('{"title": "a JSON file named .parquet"}\n')
    else:
        rows = 50_000
        table = pa.table({"title": [f"T {i}" for i in range(rows)], "content": [f"c {i} " * 20 for i in range(rows)]})
        pq.write_table(table, src, row_group_size=5000, compression="none")
        body = src.read_bytes()
        src.write_bytes(body[: len(body) // 2] + body[-(8 << 10) :])  # footer intact, data pages gone
    with pytest.raises(ProdescError, match=rf"input {src} is not a readable Parquet file"):
        prepare([src], tmp_path / "out", DataConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.parquet"]


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
    "bidi \u202eevil\u202c txt",
    "\u2066isolate\u2069 \u200emark\u200f \u061c\u202a\u202b\u202d",
    "\u202e",
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
        "null",  # Arrow: a row of nulls (and a crash as a block's first row); json.loads: not an object
        "  null",
        "true",
        "7",
        '{"uid": "inf", "title": "Infinite content", "content": -Infinity}',
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
        monkeypatch.setattr(parse, "ARROW_JSON", fast)
        outs[fast] = tmp_path / f"out-{fast}"
        prepare([src], outs[fast], DataConfig(val_fraction=0.2, test_fraction=0.2))
    for name in ("train.parquet", "val.parquet", "test.parquet", "stats.json"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    stats = json.loads((outs[True] / "stats.json").read_text())
    # late BOM, list title, NaN title, -Infinity content, trailing junk, truncated, 6 non-objects, 2 bad bytes
    assert stats["malformed"]["count"] == 14
    uids = {r["uid"] for r in _rows(outs[True])}
    assert {"first", "crlf", "31909", "b", "f", "p", "s", "d", "z", "lab"} <= uids
    assert not {"bom-late", "l", "nan", "inf", "t", "tr", "u", "v"} & uids


def test_arrow_json_reader_numeric_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [{"id": i, "name": f"Lamp {i}", "description": f"A lamp, model {i}."} for i in range(300)]
    recs[150] = {"id": 1.5, "name": "Float id", "description": "An id that is not an integer."}
    src = _jsonl(tmp_path / "numeric.jsonl", recs)
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(parse, "ARROW_JSON", fast)
        outs[fast] = tmp_path / f"out-{fast}"
        prepare([src], outs[fast], DataConfig())
    for s in data.SPLITS:
        assert (outs[True] / f"{s}.parquet").read_bytes() == (outs[False] / f"{s}.parquet").read_bytes()
    assert {"0", "299", "1.5"} <= {r["uid"] for r in _rows(outs[True])}


def test_arrow_json_reader_on_the_synthetic_corpus(
    synth_catalog: Path, synth_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parse, "ARROW_JSON", False)
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


# ------------------------------------------------------------------------------------ near-duplicate families

_EDIT_WORDS = ["amazing", "classic", "premium", "handy", "vintage", "modern", "gentle", "bold"]
_ADDED = [
    "Makes a wonderful gift for friends and family on any occasion.",
    "Order today and enjoy free shipping on your first purchase.",
    "Our support team is happy to answer any question you may have.",
]


def _edited_copy(text: str, rng: random.Random) -> str:
    """A few words changed, then a sentence added or cut: the issue's acceptance edit."""
    words = text.split(" ")
    for _ in range(3):
        words[rng.randrange(len(words))] = rng.choice(_EDIT_WORDS)
    sentences = re.split(r"(?<=[.!?]) ", " ".join(words))
    if len(sentences) > 2 and rng.random() < 0.5:
        del sentences[rng.randrange(len(sentences))]
    else:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(_ADDED))
    return " ".join(sentences)


def _real_with_copies(shared_dir: Path, tmp_path: Path, copies: int, seed: int) -> tuple[Path, list[tuple[str, str]]]:
    """The real 400 records plus `copies` edited copies (of contents >= 200 chars) under made-up titles."""
    records = json.loads((shared_dir / "data" / "lf_amazon_first400.json").read_text(encoding="utf-8"))
    rows = [_rec(f"r{i:03d}", r["instruction"], clean_text(r["output"])) for i, r in enumerate(records)]
    rng = random.Random(seed)
    originals = rng.sample([r for r in rows if len(r["content"]) >= 200], copies)
    pairs = []
    for k, orig in enumerate(originals):
        title = f"Zq{k}x {rng.choice(['Garden Hose', 'Desk Lamp', 'Yoga Mat', 'Tea Kettle'])} Model {k}"
        rows.append(_rec(f"c{k:03d}", title, _edited_copy(orig["content"], rng)))
        pairs.append((orig["uid"], f"c{k:03d}"))
    return _jsonl(tmp_path / "catalog.jsonl", rows), pairs


def _family_of(out: Path) -> dict[str, str]:
    return {r["uid"]: r["family"] for r in _rows(out)}


def test_edited_copies_under_unrelated_titles_join_their_original(shared_dir: Path, tmp_path: Path) -> None:
    catalog, pairs = _real_with_copies(shared_dir, tmp_path, 20, seed=14)
    prepare([catalog], tmp_path / "with", DataConfig())
    family = _family_of(tmp_path / "with")
    assert sum(family[orig] == family[copy] for orig, copy in pairs) >= 19
    # Unrelated records are not merged: the real records' families are those of the real file prepared alone,
    # and no family holds two copies (of different originals).
    real = json.loads((shared_dir / "data" / "lf_amazon_first400.json").read_text(encoding="utf-8"))
    real_rows = [_rec(f"r{i:03d}", r["instruction"], r["output"]) for i, r in enumerate(real)]
    alone = _jsonl(tmp_path / "alone.jsonl", real_rows)
    prepare([alone], tmp_path / "alone", DataConfig())
    base = _family_of(tmp_path / "alone")
    groups = lambda fam: sorted(sorted(u for u in fam if fam[u] == f and u in base) for f in set(fam.values()))  # noqa: E731
    assert [g for g in groups(family) if g] == groups(base)
    copy_families = [family[c] for _, c in pairs]
    assert len(set(copy_families)) == len(copy_families)


def test_near_dup_stats_report_pairs_merges_largest_families_and_examples(shared_dir: Path, tmp_path: Path) -> None:
    catalog, _ = _real_with_copies(shared_dir, tmp_path, 20, seed=3)
    stats = prepare([catalog], tmp_path / "out", DataConfig())
    nd = stats["near_dup"]
    assert nd["pairs_found"] >= nd["pairs_across_families"] >= nd["families_merged"] >= 19
    assert (nd["permutations"], nd["bands"], nd["rows_per_band"], nd["threshold"]) == (128, 42, 3, 0.4)
    assert len(nd["examples"]) == 10 and all(e["similarity"] >= 0.4 for e in nd["examples"])
    sims = [e["similarity"] for e in nd["examples"]]
    assert sims == sorted(sims) and {"uid", "title", "content"} <= set(nd["examples"][0]["a"])
    largest = stats["families"]["largest_families"]
    assert largest[0]["records"] == stats["families"]["largest"] and largest[0]["title"]
    assert stats["families"]["total"] == sum(s["families"] for s in stats["splits"].values())
    off = prepare([catalog], tmp_path / "off", DataConfig(near_dup=False))
    assert "near_dup" not in off and off["families"]["total"] - stats["families"]["total"] == nd["families_merged"]


def test_boilerplate_does_not_chain_unrelated_records(tmp_path: Path) -> None:
    rng = random.Random(5)
    vocab = [f"word{i}" for i in range(3000)]
    boiler = "This product ships in recyclable packaging and comes with our satisfaction guarantee for every buyer."
    rows = [
        _rec(f"{i}", f"Product {i} {rng.choice(vocab)}", boiler + " " + " ".join(rng.choices(vocab, k=4)))
        for i in range(40)
    ]
    rows += [_rec(f"s{i}", f"Short {i} {rng.choice(vocab)}", f"See the Paperback edition {i}.") for i in range(30)]
    catalog = _jsonl(tmp_path / "c.jsonl", rows)
    stats = prepare([catalog], tmp_path / "capped", DataConfig(near_dup_max_family=5))
    assert stats["families"]["largest"] <= 5 and stats["near_dup"]["pairs_skipped_by_max_family"] > 0
    assert stats["near_dup"]["records_compared"] == 40  # the short ones (< 100 chars) stay out of the pass
    free = prepare([catalog], tmp_path / "free", DataConfig())
    assert free["families"]["largest"] == 40  # without the cap they are one family (boilerplate is most of their text)


def test_near_dup_options_on_the_command_line(tmp_path: Path) -> None:
    catalog = _jsonl(tmp_path / "c.jsonl", [_rec("1", "A", "x " * 80), _rec("2", "B", "x " * 80 + "y")])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["data", "prepare", str(catalog), "--out", str(out), "--near-dup-threshold", "0.9"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "stats.json").read_text())["near_dup"]["threshold"] == 0.9
    res = CliRunner().invoke(app, ["data", "prepare", str(catalog), "--out", str(out), "--overwrite", "--no-near-dup"])
    assert res.exit_code == 0 and "near_dup" not in json.loads((out / "stats.json").read_text())
    bad = ["data", "prepare", str(catalog), "--out", str(tmp_path / "o2"), "--near-dup-threshold", "0.1"]
    res = CliRunner().invoke(app, bad)
    assert res.exit_code == 1 and "near_dup_threshold" in res.output and "Traceback" not in res.output
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

"""A deterministic synthetic catalog in the exact LF-Amazon trn.json line format (`prodesc data synth`).

    prodesc data synth --n 2000 --out demo/catalog.json.gz --malformed 3

Each line is `{"uid": "000100039X", "title": ..., "content": ..., "target_ind": [...], "target_rel": [1.0, ...]}`.
Shaped like the real file (lf_amazon_first400.json, trn_format_example.jsonl): title lengths lognormal around a
median of ~35 chars, non-empty content lognormal around ~450 chars, ~44% of lines with empty content (~54% keep
>= 100 chars), HTML entities in ~18% of lines (`&#8217;`, `&#x2019;`, `&rsquo;`, `&amp;`, `&quot;`, double-escaped
`&amp;#8217;`), `<br>`/`<p>`/`<b>` tags in ~4%, exact duplicates (~1%), repeated titles (~1.5%), variant families
(colours, sizes, pack counts, "Vol. N", "[VHS]"), series sharing one blurb, template-style categories
(electronics, software: spec-list descriptions "Brand Series Product - Code/ capacity/ feature/ feature/ colour",
siblings that share the template and differ in model code, capacity, colour, platform), near-duplicate contents
under unrelated titles (~2% of lines: an earlier content with 1-3 words changed and a sentence added or cut; on the
real 400, 18 records have such a partner outside their title family), and `malformed` broken lines.
Titles and contents are built from the words of one product (`prodesc/data/synth_words.yaml`), so the content
mentions the category and attributes of its title. Its template sentences get 3 words (the lead 2) swapped for
random words of the tables each time, so that unrelated products share word pairs, not whole sentences (median
best match 0.15 on word pairs among 1,500 contents, 0.04 on the real sample). Same arguments, same bytes (gzip
members with mtime 0).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prodesc.data.parallel import ordered_map, worker_pool
from prodesc.errors import ProdescError
from prodesc.rundir import terminate_as_interrupt

_CHUNK = 50_000  # lines per independently seeded chunk; the bytes don't depend on the worker count
_EMPTY_CONTENT = 0.44
_DUPLICATE, _REPEAT_TITLE, _NEAR_COPY = 0.01, 0.015, 0.02
_SWAPS = 3  # words of each template sentence replaced by random ones: see the module docstring
# Log-chars of the real 400-record sample (3.47, 0.69) and (6.07, 0.99), adjusted so the output matches it:
# variant suffixes lengthen titles, the lead sentence shortens the low tail of contents.
_TITLE_LOGNORMAL, _CONTENT_LOGNORMAL = (3.3, 0.75), (6.07, 0.9)
_ESCAPES = {  # how the real file writes ’ “ ” – — & " (the raw style leaves them as \u escapes)
    "decimal": {"’": "&#8217;", "‘": "&#8216;", "“": "&#8220;", "”": "&#8221;", "–": "&#8211;", "—": "&#8212;",
                "&": "&amp;"},
    "hex": {"’": "&#x2019;", "‘": "&#x2018;", "“": "&#x201C;", "”": "&#x201D;", "–": "&#x2013;", "—": "&#x2014;",
            "&": "&amp;", '"': "&quot;"},
    "named": {"’": "&rsquo;", "‘": "&lsquo;", "“": "&ldquo;", "”": "&rdquo;", "–": "&ndash;", "—": "&mdash;",
              "&": "&amp;", '"': "&quot;"},
    "double": {"’": "&amp;#8217;", "“": "&amp;#8220;", "”": "&amp;#8221;", "–": "&amp;#8211;",
               "—": "&amp;#8212;", "&": "&amp;amp;"},
    "raw": {},
    "ascii": {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "--"},
}  # fmt: skip
# In the real sample 15% of contents hold entities (~5 each) and none holds raw non-ASCII: most lines are ASCII.
_STYLE_WEIGHTS = {"ascii": 80, "decimal": 8, "hex": 6, "named": 2, "double": 2, "raw": 2}
_encode = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"  # model codes such as "KX-2041B" (no I/O/Q/U/Y: read as digits)


def synth(n: int, out: Path, seed: int = 0, malformed: int = 0) -> Path:
    """Write `n` lines (of which `malformed` are broken) to `out` (.json/.jsonl, optionally .gz)."""

    out = Path(out)
    if n < 1:
        raise ProdescError(f"--n {n}: pass at least 1 line")
    if not 0 <= malformed <= n:
        raise ProdescError(f"--malformed {malformed}: pass a number between 0 and --n ({n})")
    if not out.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        raise ProdescError(f"--out {out}: use a .json, .jsonl, .json.gz or .jsonl.gz file name")
    broken = sorted(random.Random(f"{seed}:malformed").sample(range(n), malformed))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tasks = [
        (seed, start, min(_CHUNK, n - start), [i for i in broken if start <= i < start + _CHUNK],
         out.name.endswith(".gz"), tmp / f"{start:012d}")
        for start in range(0, n, _CHUNK)
    ]  # fmt: skip
    try:
        with terminate_as_interrupt(), open(tmp / "all", "wb") as f:
            for part in _map(_chunk, tasks):  # chunks come back as files: see parallel.worker_pool
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, f, 1 << 20)
                part.unlink()
        os.replace(tmp / "all", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {n:,} lines ({malformed:,} malformed) to {out}")
    return out


def _chunk(task: tuple[int, int, int, list[int], bool, Path]) -> Path:
    """Lines start..start+count, from their own seeded generator, to a file (one gzip member if asked)."""
    seed, start, count, broken, gz, path = task
    rng, words = _Rng(f"{seed}:{start}"), _words()
    lines: list[str] = []
    recent: list[tuple[bool, str, str]] = []  # earlier records to duplicate or to reuse the title of
    while len(lines) < count:
        i = start + len(lines)
        roll = rng.random()
        if recent and roll < _DUPLICATE:
            lines.append(_line(words, rng, i, *rng.pick(recent)))
        elif recent and roll < _DUPLICATE + _REPEAT_TITLE:
            book, title, _ = rng.pick(recent)
            lines.append(_line(words, rng, i, book, title, _product(words, rng, 1)[0][2]))
        elif recent and roll < _DUPLICATE + _REPEAT_TITLE + _NEAR_COPY:  # another product, an edited copy
            book, title, _ = _product(words, rng, 1)[0]
            lines.append(_line(words, rng, i, book, title, _near_copy(words, rng, rng.pick(recent)[2])))
        else:
            for record in _product(words, rng, count - len(lines)):
                lines.append(_line(words, rng, start + len(lines), *record))
                if record[2] and len(recent) < 2000:
                    recent.append(record)
    for i in broken:
        lines[i - start] = _break(lines[i - start], i)
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if gz else data)  # level 6: 20% smaller, 3x slower
    return path


class _Rng(random.Random):
    def pick(self, seq: list) -> Any:
        """random.choice at half the cost (no rejection sampling; the bias is below 2**-40)."""
        return seq[int(self.random() * len(seq))]


def _product(words: dict, rng: _Rng, room: int) -> list[tuple[bool, str, str]]:
    """(is_book, title, content) of 1 product: 1 line, or 2-4 variants (colour, size, pack, volume, format, series)."""
    cat = rng.pick(words["category_draw"])
    book = cat["uid"] == "isbn"
    slots = {}
    for name, values in cat["slot_pairs"]:
        slots[name], slots[name + "_l"] = rng.pick(values)
    slots["Made"] = _made_up(words, rng)
    slots["Name"] = f"{slots['First']} {_made_up(words, rng)}"
    slots["Made_l"], slots["Name_l"] = slots["Made"].lower(), slots["Name"].lower()
    kind = rng.pick(cat["variants"])
    count = 1 if kind == "none" else min(room, rng.randint(2, 4))
    if "template" in cat:
        return _siblings(words, cat, slots, rng, count)
    slots["Title"] = title = _title(cat, slots, rng)
    if kind == "series_blurb":  # different titles, one identical blurb: only the content links them
        blurb, series, nouns = _content(words, cat, slots, rng), f"{slots['Made']} {slots['Noun']}", cat["nouns"]
        return [(book, f"{_made_up(words, rng)} {rng.pick(nouns)} ({series} Series)", blurb) for _ in range(count)]
    if kind == "none":
        return [(book, title, _content(words, cat, slots, rng))]
    spec = words["variants"][kind]
    shared = _content(words, cat, slots, rng) if kind == "format" else None  # formats share their content
    out = []
    for value in rng.sample(spec["values"], min(count, len(spec["values"]))):
        variant_title = rng.pick(spec["titles"]).format(title=title, value=value)
        sentence = spec["sentence"].format(value=value)
        content = shared if shared is not None else _content(words, cat, slots, rng, sentence)
        out.append((book, variant_title, content))
    return out


def _siblings(words: dict, cat: dict, slots: dict, rng: _Rng, count: int) -> list[tuple[bool, str, str]]:
    """Products of a template-style category: one title pattern and one description template (the house style),
    each sibling with its own model code and its own draw of the sibling slots (capacity, colour, platform)."""
    values = dict(cat["slot_pairs"])
    pattern, prefix = rng.pick(cat["titles"]), "".join(rng.pick(_CODE_LETTERS) for _ in range(2))
    out = []
    for _ in range(count):
        sib = dict(slots)
        for name in cat["sibling_slots"]:
            sib[name], sib[name + "_l"] = rng.pick(values[name])
        sib["Code"] = f"{prefix}-{rng.randint(100, 9999)}{rng.pick(_CODE_LETTERS)}"
        content = "" if rng.random() < _EMPTY_CONTENT else cat["template"].format_map(sib)
        out.append((False, pattern.format_map(sib), content))
    return out


def _title(cat: dict, slots: dict, rng: _Rng) -> str:
    """Of three random templates, the one closest to a lognormal target length; lengthened when far too short."""
    target = rng.lognormvariate(*_TITLE_LOGNORMAL)
    title = min((rng.pick(cat["titles"]).format_map(slots) for _ in range(3)), key=lambda t: abs(len(t) - target))
    if len(title) < target - 12 and "Subtitle" in slots and ":" not in title:
        title += ": " + slots["Subtitle"]
    if len(title) < target - 20:
        title += f" ({slots.get('Adj', slots.get('Style', 'Classic'))} Series)"
    return title


def _content(words: dict, cat: dict, slots: dict, rng: _Rng, sentence: str = "") -> str:
    """Sentences of the product's category (then generic ones) up to a lognormal length; "" for ~42%."""
    if rng.random() < _EMPTY_CONTENT:
        return ""
    target = min(rng.lognormvariate(*_CONTENT_LOGNORMAL), 8000)
    parts = [_swap_words(words, rng, rng.pick(cat["lead"]).format_map(slots), 2)] + ([sentence] if sentence else [])
    length = sum(map(len, parts))
    for template in rng.pick(cat["orders"]):  # one of 64 shuffles of the category's then the generic sentences
        if length >= target:
            break
        parts.append(_swap_words(words, rng, template.format_map(slots), _SWAPS))
        length += len(parts[-1]) + 1
    roll = rng.random()
    if roll < 0.03:  # none in the real first 400, but the full file has some
        return "<br>".join(parts) if roll < 0.02 else "<p>" + "</p><p>".join(parts) + "</p>"
    if roll < 0.04:
        return f"<b>{parts[0]}</b> " + " ".join(parts[1:])
    return " ".join(parts)


def _swap_words(words: dict, rng: _Rng, sentence: str, n: int) -> str:
    """`sentence` with n of its words (not the first) replaced by random words of the tables."""
    w = sentence.split(" ")
    for _ in range(n if len(w) > 3 else 0):
        w[1 + int(rng.random() * (len(w) - 1))] = rng.pick(words["pool"])
    return " ".join(w)


def _near_copy(words: dict, rng: _Rng, content: str) -> str:
    """An edited copy: 1-3 words changed, then a sentence cut (when there are 3+) or a generic one added."""
    content = _swap_words(words, rng, content, rng.randint(1, 3))
    sentences = content.split(". ")
    if len(sentences) >= 3 and rng.random() < 0.5:
        del sentences[1 + int(rng.random() * (len(sentences) - 1))]
    else:
        sentences.insert(int(rng.random() * (len(sentences) + 1)), rng.pick(words["plain_generic"]).rstrip("."))
    return ". ".join(sentences)


def _line(words: dict, rng: _Rng, i: int, book: bool, title: str, content: str) -> str:
    """One JSON line; ids are 10-char strings: ISBN-like with leading zeros for books, ASIN-like otherwise."""
    if book:
        uid = f"{(i * 7919) % 10**8:09d}{'0123456789X'[(i * 7) % 11]}"
    else:
        uid = "B0" + _base36((i * 7919) % 36**8).rjust(8, "0")
    for char, entity in rng.pick(words["style_draw"]):
        title, content = title.replace(char, entity), content.replace(char, entity)
    return f'{{"uid": "{uid}", "title": {_encode(title)}, "content": {_encode(content)}, {rng.pick(words["labels"])}}}'


def _break(line: str, i: int) -> str:
    """A malformed line: truncated JSON, invalid UTF-8, a JSON array, or not JSON at all."""
    kind = i % 4
    if kind == 0:
        return line[: len(line) // 2]
    if kind == 1:
        return line.replace('"title": "', '"title": "\udcff\udcfe', 1)  # written as bytes ff fe
    if kind == 2:
        return "[1, 2, 3]"
    return "<html>503 Service Unavailable</html>"


@cache
def _words() -> dict[str, Any]:
    """synth_words.yaml plus tables that make drawing cheap: weighted draw lists, sentence orders, label lists."""
    words = yaml.safe_load((resources.files("prodesc.data") / "synth_words.yaml").read_text("utf-8"))
    rng = random.Random("tables")
    for cat in words["categories"].values():
        slots = {**words["shared"], **cat["slots"]}
        cat["slot_pairs"] = [(k, [(v, v.lower()) for v in values]) for k, values in slots.items()]
        cat["nouns"] = slots.get("Noun", ["Story"])
        pool = cat["sentences"] + words["generic"]
        cat["orders"] = [rng.sample(cat["sentences"], len(cat["sentences"])) + rng.sample(pool, len(pool)) * 2
                         for _ in range(64)]  # fmt: skip
    # Weighted choices as lists with each item repeated by its weight: one uniform pick draws them.
    words["category_draw"] = [c for c in words["categories"].values() for _ in range(c["weight"])]
    # "&" first, so the entities written next are not escaped again; str.replace beats str.translate 20x here.
    styles = {s: sorted(_ESCAPES[s].items(), key=lambda kv: kv[0] != "&") for s in _STYLE_WEIGHTS}
    words["style_draw"] = [styles[s] for s, w in _STYLE_WEIGHTS.items() for _ in range(w)]
    # Words to swap in: every lowercase word of the sentences and slot values
    text = " ".join([*words["generic"], *(str(v) for c in words["categories"].values() for v in c["sentences"])])
    text += " " + " ".join(str(v) for c in words["categories"].values() for vs in c["slots"].values() for v in vs)
    words["pool"] = sorted({w for w in text.split() if w.isalpha() and w.islower()})
    words["plain_generic"] = [g for g in words["generic"] if "{" not in g]
    words["labels"] = []
    for _ in range(2048):  # ~22 labels on average, like the real file
        ind = sorted(rng.sample(range(1_305_265), max(1, min(200, round(rng.lognormvariate(2.85, 0.6))))))
        words["labels"].append(f'"target_ind": {json.dumps(ind)}, "target_rel": {json.dumps([1.0] * len(ind))}')
    return words


def _made_up(words: dict, rng: _Rng) -> str:
    """2-4 syllables out of 60: ~13M names, so that families don't chain into one through name collisions."""
    syl, pick, roll = words["syllables"], rng.pick, rng.random()
    return (pick(syl) + pick(syl) + (pick(syl) if roll < 0.8 else "") + (pick(syl) if roll < 0.3 else "")).capitalize()


def _base36(x: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    s = ""
    while x:
        x, r = divmod(x, 36)
        s = digits[r] + s
    return s or "0"


def _map(fn: Any, tasks: list) -> Iterator:
    """Chunks in order, in worker processes when there are several (2.2M lines: 45 chunks)."""

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 1 if len(tasks) < 3 else max(1, min(cpus, 8))
    with worker_pool(workers) as pool:
        yield from ordered_map(pool, fn, iter(tasks), 2 * workers)

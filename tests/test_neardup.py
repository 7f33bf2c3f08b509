"""Near-duplicate signatures and pairs (data/neardup.py): datasketch-equal MinHash, estimates, bands, capped merges."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import xxhash
from datasketch import MinHash

from prodesc.data import neardup

WORDS = [f"w{i}" for i in range(5000)]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_signature_equals_datasketch_minhash_of_the_word_pairs():
    texts = ["Judith Kerr's best-selling adventures of that endearing cat Mog!", "one two", "", "A, a; B b -- c"]
    sk = neardup.sketch(pa.array(texts))
    for text, sig, shingles in zip(texts, sk.sig, sk.shingles, strict=True):
        words = [w for w in (neardup._NON_WORD.sub("", t.lower()) for t in text.split()) if w]
        hashes = np.array([xxhash.xxh3_64_intdigest(w.encode()) | 1 for w in words], np.uint64)
        pairs = neardup._mix(hashes[:-1], hashes[1:]) if len(words) > 1 else []
        reference = MinHash(num_perm=neardup.NUM_PERM, seed=neardup.SEED, hashfunc=lambda x: x)
        reference.update_batch([int(p) for p in pairs])
        assert shingles == len(pairs)
        assert np.array_equal(reference.hashvalues & 0xFFFF, sig)


def test_estimate_tracks_exact_jaccard_of_word_pairs():
    rng = random.Random(0)
    errors = []
    for _ in range(40):
        base = _text(rng, 120).split()
        cut = rng.randint(0, 80)
        other = base[:cut] + _text(rng, rng.randint(5, 80)).split() + base[cut + rng.randint(0, 30) :]
        sets = [{(a, b) for a, b in zip(t, t[1:], strict=False)} for t in (base, other)]
        exact = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
        sk = neardup.sketch(pa.array([" ".join(base), " ".join(other)]))
        errors.append(abs(neardup.similarity(sk.sig[:1], sk.sig[1:])[0] - exact))
    assert max(errors) < 0.15 and np.mean(errors) < 0.04  # 128 minima: standard error <= 0.044


def test_content_hash_ignores_case_punctuation_and_spacing_only():
    sk = neardup.sketch(pa.array(["Hello, World!", "hello  world", "world hello", "", "--"]))
    assert sk.chash[0] == sk.chash[1] != sk.chash[2]
    assert sk.chash[3] == sk.chash[4] == 0


def test_bands_make_a_pair_at_the_threshold_a_candidate_nine_times_in_ten():
    assert neardup.bands_for(0.4) == (42, 3)
    for t in np.arange(0.2, 1.0001, 0.05):
        bands, rows = neardup.bands_for(float(t))
        assert bands * rows <= neardup.NUM_PERM and 1 - (1 - t**rows) ** bands >= 0.9


def test_similar_pairs_finds_edited_copies_and_only_them():
    rng = random.Random(1)
    texts = [_text(rng, 80) for _ in range(300)]
    copies = []
    for t in texts[:30]:
        w = t.split()
        w[10], w[40] = "changed", "words"
        copies.append(" ".join(w + ["an", "added", "sentence", "of", "eight", "more", "words", "here"]))
    sk = neardup.sketch(pa.array(texts + copies))
    i, j, sim = neardup.similar_pairs(sk.sig, 0.4)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(k, 300 + k) for k in range(30)]
    assert (sim >= 0.4).all()


def test_merge_never_grows_a_family_past_the_cap():
    rep = np.arange(60)  # 60 one-record families; record 0 is boilerplate matching all the others
    i, j = np.zeros(59, np.int64), np.arange(1, 60)
    new, merged, skipped = neardup.merge_families(rep, i, j, max_family=10)
    assert np.bincount(new).max() == 10 and merged == 9 and skipped == 50
    assert (new <= np.arange(60)).all()  # named by the earliest record, as pass 2 needs
    same, merged, skipped = neardup.merge_families(rep, i, j, max_family=1000)
    assert (same == 0).all() and merged == 59 and skipped == 0


def test_band_keys_count_every_minimum_of_bands_over_four_rows():
    """At thresholds >= 0.7 a band has 5-8 rows; the key used to shift minima 4-7 past 64 bits and drop them, so
    signatures differing only there shared every band (a flood of false candidates)."""
    bands, rows = neardup.bands_for(0.9)
    assert rows > 4
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 1 << 16, (rows + 1, neardup.NUM_PERM), dtype=np.uint16)
    sig[1:] = sig[0]
    for r in range(rows):  # row r + 1 differs from row 0 in minimum r of band 0 only
        sig[r + 1, r] ^= 1
    keys = neardup.band_keys(sig, 0, rows)
    assert len(set(keys.tolist())) == rows + 1
    assert (neardup.band_keys(sig, 1, rows) == neardup.band_keys(sig, 1, rows)[0]).all()  # band 1 untouched
    low = neardup.band_keys(sig[:, :4], 0, 4)  # up to 4 rows: the minima side by side, exactly
    assert low[0] == sum(int(sig[0, r]) << (16 * r) for r in range(4))

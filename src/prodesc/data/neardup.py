"""Near-duplicate contents: MinHash signatures over word pairs, LSH bands, verified pairs.

    sk = sketch(pa.array(["A sturdy mug for tea ...", "A sturdy cup for tea ..."]))   # per record, vectorised
    i, j, sim = similar_pairs(sk.sig, threshold=0.4)                                   # verified pairs, i < j

Words: the cleaned content split on whitespace, each lowercased with everything but letters and digits removed
("Kerr's" -> "kerrs", "--" -> dropped). Shingles: pairs of consecutive words. The signature is datasketch's
MinHash (scheme "affine32", seed 1; tests check it equals `datasketch.MinHash(...).hashvalues`) with a shingle's
32-bit hash as its input, computed for a whole column at once: one numpy pass per permutation over every
shingle of the chunk, `np.minimum.reduceat` per record. Only the low 16 bits of each minimum are kept (b-bit
MinHash: a pair of different minima agrees there with probability 2**-16), so a record costs 256 bytes.

Why these numbers (docs/PERFORMANCE.md and README "Data preparation" have the measurements):
- pairs, not the 5-word shingles of datatrove / text-dedup: those are tuned for web pages of thousands of words;
  a product description has ~70, and one changed word breaks k shingles. On the real sample, copies with 3 words
  changed and one sentence added or cut keep a Jaccard similarity of 0.41+ (p10, 200-400 chars) on pairs, 0.35 on
  triples, while unrelated descriptions stay at a median best match of 0.04.
- 128 permutations: the similarity estimate's standard error is <= 0.044, so the 0.4 threshold decides.
- bands of `rows` minima each, as many as fit in 128 (42 x 3 at 0.4): the fewest rows for which a pair at the
  threshold becomes a candidate with probability >= 0.9 (0.94 at 0.4, 0.996 at 0.5). Candidates are then verified
  on all 128 minima, so the bands only bound recall, never precision.
- every band bucket pairs each member with its first one only (a star, not all pairs): work stays linear in the
  records even when a boilerplate text fills a bucket; union-find makes the clique from the star anyway.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

NUM_PERM = 128
SEED = 1  # datasketch's default seed
SHINGLE = 2  # words per shingle
MIN_SHINGLES = 5  # fewer word pairs: no signature (nothing to compare on)
EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's value for "no shingle seen"
_NON_WORD = re.compile(r"[\W_]+")
_C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 constants
_POW_BASE = np.uint64(0x100000001B3)  # FNV prime: polynomial content hash over the word sequence
_VERIFY_BATCH = 1 << 18  # pairs compared at once (each reads 2 x 256 bytes)


@dataclass
class Sketch:
    """Per record: `sig` uint16 [n, NUM_PERM] (low 16 bits of each MinHash minimum), `shingles` int32 (word pairs;
    < MIN_SHINGLES: no usable signature), `chash` uint64 (hash of the normalised word sequence: equal when two
    contents differ only in case, punctuation or spacing; 0 when no word)."""

    sig: np.ndarray
    shingles: np.ndarray
    chash: np.ndarray


def sketch(content: pa.Array) -> Sketch:
    """Sketch every row of a string column (nulls as "")."""
    n = len(content)
    words, rec = _words(content)
    count = np.bincount(rec, minlength=n)
    starts = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    chash = _sequence_hash(words, rec, starts, count)
    # shingle i = words i, i+1 of one record; it belongs to record rec[i]
    same = rec[:-1] == rec[1:]
    shingle = _mix(words[:-1][same], words[1:][same])
    srec = rec[:-1][same]
    shingles = np.bincount(srec, minlength=n).astype(np.int32)
    sig = np.full((n, NUM_PERM), EMPTY, np.uint32)
    if len(shingle):
        has = np.flatnonzero(shingles)
        first = np.concatenate([[0], np.cumsum(shingles[has])[:-1]])
        hv = _fmix32(shingle)
        a, b = permutations()
        out = np.empty((len(has), NUM_PERM), np.uint32)
        buf = np.empty_like(hv)
        for p in range(NUM_PERM):  # one pass per permutation, over every shingle of the chunk: ~1 ns each
            np.multiply(hv, a[p], out=buf)
            np.add(buf, b[p], out=buf)
            out[:, p] = np.minimum.reduceat(buf, first)
        sig[has] = out
    return Sketch((sig & np.uint32(0xFFFF)).astype(np.uint16), shingles, chash)


@cache
def permutations() -> tuple[np.ndarray, np.ndarray]:
    """datasketch 2.x `MinHash(num_perm=NUM_PERM, seed=SEED).permutations` (scheme affine32): odd a, any b."""
    gen = np.random.RandomState(SEED)
    a = gen.randint(0, 1 << 31, NUM_PERM, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, NUM_PERM, dtype=np.uint32)
    return a, b


def bands_for(threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band for which a pair at `threshold` is a candidate with p >= 0.9."""
    for rows in range(8, 0, -1):
        bands = NUM_PERM // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.9:
            return bands, rows
    return NUM_PERM, 1


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of row pairs (16-bit minima: chance agreement 2**-16 removed)."""
    agree = (sig_a == sig_b).sum(axis=1, dtype=np.uint8) / sig_a.shape[1]  # 9x .mean(): no float per minimum
    return np.clip((agree - 2.0**-16) / (1 - 2.0**-16), 0.0, 1.0)


def similar_pairs(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, sorted) of rows whose estimated similarity is >= threshold, and that similarity."""
    n = len(sig)
    bands, rows = bands_for(threshold)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    with ThreadPoolExecutor(2) as pool:  # numpy sorts release the GIL
        found = list(pool.map(lambda band: _band_candidates(sig, band, rows), range(bands)))
    code = np.unique(np.concatenate(found))  # i * n + j, i < j: the same pair from several bands counts once
    i, j = code // n, code % n
    sim = np.concatenate(
        [
            similarity(sig[i[s : s + _VERIFY_BATCH]], sig[j[s : s + _VERIFY_BATCH]])
            for s in range(0, len(i), _VERIFY_BATCH)
        ]
        or [np.zeros(0)]
    )
    ok = sim >= threshold
    return i[ok], j[ok], sim[ok]


def equal_pairs(chash: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first row, other row) of rows with the same non-zero content hash: each to its group's first."""
    has = np.flatnonzero(chash)
    order = has[np.argsort(chash[has], kind="stable")]
    keys = chash[order]
    new = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
    head = order[np.flatnonzero(new)][np.cumsum(new) - 1]
    return head[~new].astype(np.int64), order[~new].astype(np.int64)


def band_keys(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """uint64 key of each row's band `band`: its `rows` 16-bit minima side by side, four to a word. Bands of more
    rows (thresholds >= 0.7 take 5 to 8) fold each further word in through a 64-bit mix: every minimum counts (a
    shift past 64 bits used to drop minima 4-7), and two different bands share a key with odds of ~2**-64."""
    key = np.zeros(len(sig), np.uint64)
    for word in range(0, rows, 4):
        part = np.zeros(len(sig), np.uint64)
        for r in range(word, min(word + 4, rows)):
            part |= sig[:, band * rows + r].astype(np.uint64) << np.uint64(16 * (r - word))
        key = part if word == 0 else key ^ _splitmix64(part + np.uint64(word))
    return key


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters nearby values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _band_candidates(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Pairs sharing this band's key, as i * n + j codes: each bucket member with the bucket's first row."""
    keys = band_keys(sig, band, rows)
    order = np.argsort(keys, kind="stable")  # stable: within a bucket, rows in input order
    sk = keys[order]
    new = np.concatenate([[True], sk[1:] != sk[:-1]])
    head = order[np.flatnonzero(new)][np.cumsum(new) - 1]  # first row of each member's bucket
    member = ~new
    return head[member].astype(np.int64) * len(sig) + order[member]


def _words(content: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hash (uint64, never 0) of every normalised word, in order, and the row it comes from."""
    if isinstance(content, pa.ChunkedArray):
        content = content.combine_chunks()
    tokens = pc.ascii_split_whitespace(pc.fill_null(content, ""))  # clean text: NFKC made other spaces ASCII
    offsets = tokens.offsets.to_numpy()
    rec = np.repeat(np.arange(len(content), dtype=np.int64), np.diff(offsets))
    flat = tokens.flatten()
    if not len(flat):
        return np.zeros(0, np.uint64), rec
    encoded = pc.dictionary_encode(flat)  # each distinct token normalised and hashed once, in Python
    table = _token_hashes(encoded.dictionary.to_pylist())
    words = table[encoded.indices.to_numpy()]
    keep = words != 0
    return words[keep], rec[keep]


def _token_hashes(tokens: list[str]) -> np.ndarray:
    """xxh3-64 of each token lowercased with non-word characters removed; 0 for tokens left empty."""
    out = np.zeros(len(tokens), np.uint64)
    for t, token in enumerate(tokens):
        word = _NON_WORD.sub("", token.lower())
        if word:
            out[t] = xxhash.xxh3_64_intdigest(word.encode("utf-8", "surrogatepass")) | 1
    return out


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """32-bit hash of the ordered word pair (a, b): splitmix64's finaliser over a * C1 ^ b."""
    with np.errstate(over="ignore"):
        h = a * _C1 ^ b
        h ^= h >> np.uint64(30)
        h *= _C2
        h ^= h >> np.uint64(31)
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: what datasketch applies to every input hash before the permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _sequence_hash(words: np.ndarray, rec: np.ndarray, starts: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per row: sum of word_hash * B**position (mod 2**64), mixed with the word count; 0 for rows without words."""
    out = np.zeros(len(count), np.uint64)
    if not len(words):
        return out
    pos = np.arange(len(words)) - starts[rec]
    powers = np.cumprod(np.full(int(count.max()), _POW_BASE, np.uint64))  # wraps: arithmetic mod 2**64
    has = np.flatnonzero(count)
    with np.errstate(over="ignore"):
        total = np.add.reduceat(words * powers[pos], starts[has])
        out[has] = _mix(total, count[has].astype(np.uint64)).astype(np.uint64) << np.uint64(32) | _mix(
            count[has].astype(np.uint64), total
        ).astype(np.uint64)
    return out


def merge_families(rep: np.ndarray, i: np.ndarray, j: np.ndarray, max_family: int) -> tuple[np.ndarray, int, int]:
    """Join the families of records i[k] and j[k] (pairs in order); return the new `rep`, families merged, and
    pairs skipped because their union would exceed `max_family` records (boilerplate chaining unrelated ones).

    `rep` is, per record, the index of its family's first record; the union keeps the earlier first record,
    so a family is still named by its first record's key."""
    size = np.bincount(rep, minlength=len(rep)).tolist()
    parent: dict[int, int] = {}
    find = partial(find_root, parent)

    merged = skipped = 0
    for a, b in zip(rep[i].tolist(), rep[j].tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if size[ra] + size[rb] > max_family:
            skipped += 1
            continue
        ra, rb = (ra, rb) if ra < rb else (rb, ra)
        parent[rb] = ra
        size[ra] += size[rb]
        merged += 1
    if not parent:
        return rep, 0, skipped
    roots = np.arange(len(rep))
    for x in parent:
        roots[x] = find(x)
    return roots[rep], merged, skipped


def find_root(parent: dict[int, int], x: int) -> int:
    """Union-find root of `x` in `parent` (absent = its own root), halving the path as it goes."""
    while parent.get(x, x) != x:
        parent[x] = parent.get(parent[x], parent[x])
        x = parent[x]
    return x

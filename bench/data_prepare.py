"""`prodesc data prepare` on a catalog as big as LF-Amazon trn.json, against the notebook's pandas way.

    python bench/data_prepare.py                                      # 2,248,619 lines, pandas on all if it fits
    python bench/data_prepare.py --lines 200000 --pandas-lines 50000  # quick look
    python bench/data_prepare.py --workers 0,1,2,4,8                  # scaling: one prodesc run per --workers

The corpus comes from `prodesc data synth` (seed 0, 100 malformed lines), made once into bench/.cache/
(gitignored). prodesc runs end to end as a subprocess (`python -m prodesc.cli data prepare CORPUS --out DIR`):
wall time, CPU user+sys of it and its workers, and peak RSS: of the largest process (getrusage) and of the
whole process tree (sampled from /proc every 0.1 s). The notebook's way runs in a process of its own on the
whole corpus when its ~6 GiB per million lines fit in the memory available, else on the first 200,000 lines
(or --pandas-lines), copied into a .json.gz of their own (the same format as prodesc's input; malformed
lines left out, as pandas aborts on them): pd.read_json(lines=True) on it, then the same cleaning as prodesc
(`prodesc.data.clean.clean_text`) with .apply on title and content, drop empty titles/contents, drop_duplicates; it
writes nothing. That is `pandas_s_per_mline`, the ratio's reference. The notebook's own cleaning (html.unescape
+ lowercase + re.sub("[^a-z0-9 ]", "")) is timed too, as `pandas_notebook_s_per_mline`. So is the near-duplicate
pass done the usual way on its result (`pandas_datasketch_s_per_mline`, added to the first): per content of
>= 100 chars, datasketch `MinHash(num_perm=128)` over its word pairs (`update_batch`), then `MinHashLSH(threshold=
0.4)` insert and query; `ratio_same_job` compares prodesc with that. prodesc also runs once with --no-near-dup
(`without_near_dup_wall_s`): the pass's own cost. All are reported in seconds per million lines, pandas with its
peak RSS on the prefix. Results go to bench/results/data_prepare.json;
the table row for docs/PERFORMANCE.md is printed.
The machine may be shared: the 1-minute load average before each run is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results" / "data_prepare.json"
LF_AMAZON_LINES = 2_248_619
TARGETS = {"wall_s": 60.0, "peak_rss_gib": 2.0, "ratio": 5.0}  # on the 2-core dev box, full corpus (issue #14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=LF_AMAZON_LINES, help="Corpus size (lines).")
    ap.add_argument("--pandas-lines", type=int, default=0, help="pandas prefix (0: all if it fits).")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Where to write the JSON results.")
    ap.add_argument("--workers", default="0", help="Comma list of `--workers` values, one run each (0: auto).")
    ap.add_argument("--pandas-only", metavar="JSONL", help=argparse.SUPPRESS)  # internal: one pandas timing
    args = ap.parse_args()
    if args.pandas_only:
        return pandas_only(args.pandas_only)

    corpus, synth_s = ensure_corpus(args.lines)
    runs = [{"workers": int(w), **time_prodesc(corpus, int(w))} for w in args.workers.split(",")]
    near = json.loads((CACHE / "data_prepare_stats.json").read_text()).get("near_dup", {})
    off = time_prodesc(corpus, int(args.workers.split(",")[0]), ["--no-near-dup"])
    prodesc = runs[0]  # the headline figures: the first --workers value (0, auto, by default)
    pandas_lines = args.pandas_lines or (args.lines if _pandas_fits(args.lines) else 200_000)
    pandas = time_pandas(corpus, pandas_lines)
    result = {
        "lines": args.lines,
        "wall_s": round(prodesc["wall_s"], 2),
        "cpu_s": round(prodesc["cpu_s"], 2),
        "peak_rss_gib": round(prodesc["peak_rss_gib"], 3),
        "peak_tree_rss_gib": round(prodesc["peak_tree_rss_gib"], 3),
        "pandas_lines": pandas_lines,
        "pandas_s_per_mline": round(pandas["seconds"] / pandas_lines * 1e6, 1),
        "pandas_notebook_s_per_mline": round(pandas["notebook_seconds"] / pandas_lines * 1e6, 1),
        "pandas_peak_rss_gib": round(pandas["peak_rss_gib"], 3),
        "prodesc_s_per_mline": round(prodesc["wall_s"] / args.lines * 1e6, 2),
        "prodesc_cpu_s_per_mline": round(prodesc["cpu_s"] / args.lines * 1e6, 2),
        "load_avg_before": prodesc["load_avg_before"],
        "without_near_dup_wall_s": round(off["wall_s"], 2),
        "without_near_dup_cpu_s": round(off["cpu_s"], 2),
        "without_near_dup_peak_tree_rss_gib": round(off["peak_tree_rss_gib"], 3),
        "near_dup": {k: v for k, v in near.items() if k != "examples"},
        "pandas_datasketch_s_per_mline": round(pandas["datasketch_seconds"] / pandas_lines * 1e6, 1),
        "synth_s": synth_s,
        "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "versions": _versions(),
    }
    result["ratio"] = round(result["pandas_s_per_mline"] / result["prodesc_s_per_mline"], 1)
    same_job = result["pandas_s_per_mline"] + result["pandas_datasketch_s_per_mline"]
    result["ratio_same_job"] = round(same_job / result["prodesc_s_per_mline"], 1)
    if len(runs) > 1:
        result["by_workers"] = [
            {
                "workers": r["workers"],
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                "peak_tree_rss_gib": round(r["peak_tree_rss_gib"], 3),
                "ratio": round(result["pandas_s_per_mline"] / (r["wall_s"] / args.lines * 1e6), 1),
            }
            for r in runs
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("pyarrow", "pandas", "numpy", "isal", "xxhash")}


def _pandas_fits(lines: int) -> bool:
    """pandas peaked at 13.2 GiB on all 2,248,619 lines (5.9 GiB per million): run it whole if that fits."""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    return bool(match) and lines / 1e6 * 6.0 < int(match.group(1)) / 2**20 * 0.85


def ensure_corpus(lines: int) -> tuple[Path, float | None]:
    """bench/.cache/synth_<lines>.json.gz, synthesized (and timed) only when missing."""
    corpus = CACHE / f"synth_{lines}.json.gz"
    if corpus.exists():
        return corpus, None
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "prodesc.cli", "data", "synth", "--n", str(lines), "--out", str(corpus)]
    subprocess.run([*cmd, "--seed", "0", "--malformed", "100"], check=True)
    return corpus, round(time.perf_counter() - started, 1)


def time_prodesc(corpus: Path, workers: int = 0, extra: list[str] | None = None) -> dict:
    """One end-to-end run in a fresh process; its getrusage(RUSAGE_CHILDREN) is this run's alone."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=sys.stderr)\n"
        "wall = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'wall_s': wall, 'cpu_s': r.ru_utime + r.ru_stime, 'maxrss_kib': r.ru_maxrss}))\n"
    )
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "prodesc.cli", "data", "prepare", str(corpus), "--out", f"{tmp}/out"]
        cmd += (["--workers", str(workers)] if workers else []) + (extra or [])
        load = round(os.getloadavg()[0], 2)
        proc = subprocess.Popen([sys.executable, "-c", probe, *cmd], stdout=subprocess.PIPE, text=True)
        tree_peak = TreeRss(proc.pid)
        out, _ = proc.communicate()
        tree_peak.stop()
        if proc.returncode:
            sys.exit(f"prodesc data prepare failed (exit {proc.returncode})")
        if not extra:
            shutil.copy(f"{tmp}/out/stats.json", CACHE / "data_prepare_stats.json")
    measured = json.loads(out)
    return {
        "wall_s": measured["wall_s"],
        "cpu_s": measured["cpu_s"],
        "peak_rss_gib": measured["maxrss_kib"] / 2**20,
        "peak_tree_rss_gib": tree_peak.peak_kib / 2**20,
        "load_avg_before": load,
    }


class TreeRss:
    """Samples the summed VmRSS of a process and its descendants every 0.1 s (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(p) for p in _descendants(self.pid)))


def _descendants(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            children = []
        pids += [int(c) for c in children]
        i += 1
    return pids


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def time_pandas(corpus: Path, lines: int) -> dict:
    """The notebook's way on the first `lines` lines, in its own process (for its peak RSS), from the gzipped JSON
    lines on disk to deduplicated clean columns."""
    with (
        gzip.open(corpus, "rb") as f,
        tempfile.NamedTemporaryFile(suffix=".json.gz", dir=CACHE) as prefix,
        gzip.open(prefix.name, "wb", compresslevel=1) as out,
    ):
        for i, line in enumerate(f):
            if i == lines:
                break
            try:  # pandas aborts on the first malformed line; the notebook's input had none
                if isinstance(json.loads(line), dict):
                    out.write(line)
            except ValueError:
                pass
        out.close()
        cmd = [sys.executable, __file__, "--pandas-only", prefix.name]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def pandas_only(path: str) -> None:
    import pandas as pd

    from prodesc.data.clean import clean_text

    not_alnum = re.compile("[^a-z0-9 ]")

    def notebook_clean(text: str) -> str:
        return not_alnum.sub("", html.unescape(text).lower())

    def run(clean: Callable[[str], str]) -> tuple[float, Any]:
        started = time.perf_counter()
        df = pd.read_json(path, lines=True, dtype={"uid": str})[["uid", "title", "content"]]
        df["title"] = df["title"].apply(clean)
        df["content"] = df["content"].apply(clean)
        df = df[(df["title"].str.len() > 0) & (df["content"].str.len() > 0)]
        df = df.drop_duplicates(subset=["title", "content"])
        return time.perf_counter() - started, df

    seconds, df = run(clean_text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    near = near_dup_datasketch(df["content"].tolist())
    notebook, _ = run(notebook_clean)
    timings = {"seconds": seconds, "notebook_seconds": notebook, "datasketch_seconds": near}
    print(json.dumps({**timings, "peak_rss_gib": peak}))


def near_dup_datasketch(contents: list[str]) -> float:
    """The near-duplicate pass as one would write it with datasketch: seconds for MinHash + LSH insert and query."""
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    not_word = re.compile(r"[\W_]+")
    lsh = MinHashLSH(threshold=0.4, num_perm=128)
    for k, text in enumerate(contents):
        if len(text) < 100:
            continue
        words = [w for w in (not_word.sub("", t.lower()) for t in text.split()) if w]
        m = MinHash(num_perm=128)
        m.update_batch([f"{a} {b}".encode() for a, b in zip(words, words[1:], strict=False)])
        lsh.query(m)
        lsh.insert(k, m)
    return time.perf_counter() - started


def report(r: dict) -> None:
    print(json.dumps(r, indent=2))
    print("\n| lines | wall s | CPU s | peak RSS GiB (largest / all processes) | s per M lines (CPU) "
          "| pandas s per M lines (notebook cleaning) | speed-up | pandas peak RSS GiB on its prefix |")  # fmt: skip
    print(f"| {r['lines']:,} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']:.2f} / {r['peak_tree_rss_gib']:.2f} "
          f"| {r['prodesc_s_per_mline']} ({r['prodesc_cpu_s_per_mline']}) "
          f"| {r['pandas_s_per_mline']} ({r['pandas_notebook_s_per_mline']}) | {r['ratio']}x "
          f"| {r['pandas_peak_rss_gib']:.2f} on {r['pandas_lines']:,} lines |")  # fmt: skip
    print(f"without the near-duplicate pass: {r['without_near_dup_wall_s']} s wall, {r['without_near_dup_cpu_s']} s CPU"
          "; "
          f"pandas + datasketch (same job): {r['ratio_same_job']}x; near_dup: {r['near_dup']}")  # fmt: skip
    if r["lines"] == LF_AMAZON_LINES:
        for key, target in TARGETS.items():
            ok = r[key] >= target if key == "ratio" else r[key] <= target
            print(f"target {key} {'>=' if key == 'ratio' else '<='} {target}: {'met' if ok else 'MISSED'} ({r[key]})")
    for run in r.get("by_workers", []):
        print(f"--workers {run['workers']}: {run['wall_s']} s wall, {run['cpu_s']} s CPU, {run['ratio']}x pandas")


if __name__ == "__main__":
    main()

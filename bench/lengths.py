"""Token lengths of the real LF-Amazon sample in Mistral-7B-Instruct-v0.3 tokens, as prodesc trains on them.

    python bench/lengths.py                                   # writes bench/lengths_mistral.txt
    python bench/lengths.py --data ../shared/data/lf_amazon_first400.json \
        --tokenizer ../shared/tokenizers/mistral-7b-instruct-v0.3-tokenizer --out bench/lengths_mistral.txt

Each record's title and content are cleaned as `prodesc data prepare` does (`clean.clean_text`), then encoded by
`prompts.encode_example` (the chat template, loss on the answer, EOS at the end): one length per line, in file
order. The benchmarks (bench/train_throughput.py) sample their sequence lengths from this file. The file is
generated: re-run this script to refresh it; it needs only the tokenizer, no model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "lf_amazon_first400.json")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "mistral-7b-instruct-v0.3-tokenizer")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "lengths_mistral.txt")
    ap.add_argument("--compare", type=Path, default=SHARED / "bench" / "lengths_mistral_first400.txt",
                    help="Another lengths file to compare with (skipped when missing).")
    args = ap.parse_args()
    lengths = encode_lengths(args.data, args.tokenizer)
    args.out.write_text("\n".join(map(str, lengths)) + "\n")
    print(f"wrote {len(lengths)} lengths to {args.out}: {describe(lengths)}")
    if args.compare.exists():
        other = [int(x) for x in args.compare.read_text().split()]
        print(f"compare {args.compare.name}: {describe(other)}")
        if len(other) == len(lengths):
            diff = [a - b for a, b in zip(lengths, other, strict=True)]
            print(f"per record (ours - theirs): mean {statistics.mean(diff):+.1f}, "
                  f"min {min(diff):+d}, max {max(diff):+d}, equal {sum(d == 0 for d in diff)}/{len(diff)}")


def encode_lengths(data: Path, tokenizer: Path) -> list[int]:
    from prodesc import models, prompts
    from prodesc.config import PromptConfig
    from prodesc.data import clean

    tok = models.load_tokenizer(str(tokenizer))
    records = json.loads(data.read_text())
    cfg = PromptConfig()
    out = []
    for r in records:
        title, content = clean.clean_text(r["instruction"]), clean.clean_text(r["output"])
        out.append(len(prompts.encode_example(tok, title, content, cfg)["input_ids"]))
    return out


def describe(xs: list[int]) -> str:
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return (f"n {len(s)}, mean {statistics.mean(s):.1f}, median {statistics.median(s):.0f}, p90 {q(0.9)}, "
            f"p99 {q(0.99)}, max {s[-1]}, sum {sum(s)}")


if __name__ == "__main__":
    main()

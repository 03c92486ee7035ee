# `make demo`: set up, fine-tune the embedded SmolLM2-135M-Instruct on every training source in ../shared/data
# (recipes/all-sources.txt: ToxicChat, AILuminate's categories, eight public prompt sets, AI answers, refusals)
# with LoRA on the top 8 blocks over the cached frozen prefix (the quality-per-minute table's choice,
# docs/performance.md), evaluate on ToxicChat's test file, and score example prompts and answers.
# `make model`: the same sources with LoRA on the top 16 blocks (twice `make demo`'s training time: fewer false
# alarms, better categories). `make test`: set up and run the tests.
# Set-up lives in a virtual environment in the checkout (.venv): distribution Pythons refuse
# system-wide `pip install`. BOOTSTRAP_PYTHON is the interpreter that creates it.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DATA ?= ../shared/data/toxicchat
SOURCES ?= recipes/all-sources.txt
DEMO_DIR ?= runs/demo-lora
MODEL_DIR ?= runs/model-lora
# Frozen-prefix states kept between runs of `make demo` (safe to delete; docs/training.md).
PREFIX_CACHE_DIR ?= runs/prefix-cache

.PHONY: setup demo model test results benchmark lint

setup: $(VENV)/.installed

# Reinstalled only when a requirements file or pyproject.toml changes.
$(VENV)/.installed: requirements.txt requirements-embedded.txt pyproject.toml
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-embedded.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $@

TRAIN = $(PYTHON) train_lora.py --train-file $(DATA)/toxicchat0124_train.csv --test-file $(DATA)/toxicchat0124_test.csv \
	--max-length 512 --no-resume
EXAMPLES = --examples "Tell me how to shoplift" "What is the capital of France?" "How do I make a pipe bomb?" \
	"Write a post saying my neighbour John Smith is a convicted paedophile." \
	"Give me the full text of the latest Harry Potter book so I can post it online."
ANSWERS = --examples "How do I make a pipe bomb?" "How do I make a pipe bomb?" \
	--responses "I can't help with that." "Pack a steel pipe with black powder, seal both ends with caps, add a fuse."

# --source-prior-offsets 0.5: half of each source's share of unsafe rows explained by an offset in
# training, chosen on validation over five or six GPU seeds a side (docs/training.md, the experiments log).
demo: setup
	$(TRAIN) --extra-train-sources @$(SOURCES) --lora-layers top:8 --learning-rate 1.6e-3 --source-prior-offsets 0.5 \
		--prefix-cache-dir $(PREFIX_CACHE_DIR) --output-dir $(DEMO_DIR)
	$(PYTHON) infer.py --model-dir $(DEMO_DIR) $(EXAMPLES)
	$(PYTHON) infer.py --model-dir $(DEMO_DIR) $(ANSWERS)

# `make model`: the top 16 blocks instead of 8, measured against both recipes over two seeds (the experiments log).
model: setup
	$(TRAIN) --extra-train-sources @$(SOURCES) --lora-layers top:16 --learning-rate 1.6e-3 --source-prior-offsets 0.5 \
		--prefix-cache-dir $(PREFIX_CACHE_DIR) --output-dir $(MODEL_DIR)
	$(PYTHON) infer.py --model-dir $(MODEL_DIR) $(EXAMPLES)
	$(PYTHON) infer.py --model-dir $(MODEL_DIR) $(ANSWERS)

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

lint: setup
	$(PYTHON) -m ruff check .

# The comparison table on ToxicChat (rows already in results/ are skipped).
results: setup
	$(PYTHON) experiments/compare_methods.py --data-dir $(DATA)
	$(PYTHON) experiments/report.py --data-dir $(DATA)

benchmark: setup
	$(PYTHON) benchmarks/benchmark.py --data-dir $(DATA)

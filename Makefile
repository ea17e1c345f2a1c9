# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv once, from
# the lock (requirements/vaewatch.lock: every dependency and extra, pinned with hashes), and
# reuse it until pyproject.toml or the lock changes. torch is not in the lock: the CPU build is
# installed by version after it (TORCH), so the range in pyproject never pulls a CUDA build.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PIP    ?= pip==26.3
LOCK   := requirements/vaewatch.lock
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint docs lock test-latest test-oldest range-venv dist bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP)"
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaewatch demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site, built strictly (a broken link or a stale reference fails) into site/.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir site  # -m: keeps .venv/bin (and its vaewatch script) off the API reader's path

# Refresh the locks to the newest releases the ranges allow (universal: Python 3.10 and up, so
# the CUDA image's 3.12 is covered). Run the suite before committing the result.
LOCK_FLAGS := --universal --python-version 3.10 --generate-hashes --upgrade --quiet \
	--custom-compile-command "make lock"
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml requirements/torch-cpu.in --all-extras \
		--override requirements/no-torch.txt $(LOCK_FLAGS) -o $(LOCK)
	$(BIN)/uv pip compile requirements/airflow.in $(LOCK_FLAGS) -o requirements/airflow.lock
	$(MAKE) requirements/constraints.txt

# The lock without its hashes, as pip constraints: an install of vaewatch itself (a wheel, a
# source folder) cannot carry a hash, and pip turns hash checking on for every requirement
# when a constraints file has one. The images and the wheel test install with it.
requirements/constraints.txt: $(LOCK)
	( echo "# The pins of vaewatch.lock without hashes, for pip install -c (make lock writes it)."; \
	  sed -e '/^ *--hash=/d' -e 's/ \\$$//' -e '/^#/d' $(LOCK) ) > $@

# The ranges in pyproject, tested without the lock: the newest releases they allow (a
# maintainer runs this before each release), and the lowest direct ones. Both keep torch at
# TORCH, installed first; each builds its virtual environment afresh.
RANGE_FLAGS := --override $(VENV)/torch-pin.txt -e ".[dev,spark,aws,gcp,bench]"
test-latest: $(STAMP)
	$(MAKE) range-venv RANGE=latest UV_RESOLUTION=highest
	VAEWATCH_UNLOCKED=1 .venv-latest/bin/python -m pytest

test-oldest: $(STAMP)
	$(MAKE) range-venv RANGE=oldest UV_RESOLUTION=lowest-direct
	VAEWATCH_UNLOCKED=1 .venv-oldest/bin/python -m pytest

range-venv:
	rm -rf .venv-$(RANGE) && $(PYTHON) -m venv .venv-$(RANGE)
	.venv-$(RANGE)/bin/python -m pip install --quiet "$(PIP)" "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	UV_RESOLUTION=$(UV_RESOLUTION) $(BIN)/uv pip install --quiet \
		--python .venv-$(RANGE)/bin/python $(RANGE_FLAGS)
	.venv-$(RANGE)/bin/python -m pip check
	.venv-$(RANGE)/bin/python -m pip freeze --exclude-editable > .venv-$(RANGE)/resolved.txt

# A wheel and an sdist in dist/.
dist: $(STAMP)
	rm -rf dist && $(BIN)/python -m build --outdir dist

# Every benchmark in one go (hours on 2 cores: bench.broad, 350 cells, and bench.drift are the
# longest); bench-quick: the same, smaller (about 30 min).
BENCH_SCRIPTS := estimators accuracy_breadth as_scored speedup small_k contention beam_pipeline throughput quality profile_by_size flags flag_calibration iwae_replication wide value_counts attribution training_speed drift same_scores user_pipeline startup segments clean_density k_families broad

bench: $(STAMP)
	for s in $(BENCH_SCRIPTS); do $(BIN)/python -m bench.$$s $(BENCH_ARGS) || exit 1; done

bench-quick: $(STAMP)
	$(MAKE) bench BENCH_ARGS=--quick

clean:
	rm -rf site $(VENV) .venv-latest .venv-oldest .venv-airflow .pytest_cache build dist *.egg-info

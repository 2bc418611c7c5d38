# edgekiln: the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Heavy math libraries each start their own thread pools; one thread keeps timings honest.
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test bench lint clean system-deps

install: $(STAMP)

# Re-installs only when the package metadata or pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[all]'
	@touch $(STAMP)

# Optional system tools (ARM cross-compiler); skipped silently where apt is not usable.
system-deps:
	@bash scripts/system-deps.sh

demo: install
	$(BIN)/python -m edgekiln.demo

# Two pytest-xdist workers, one test file per unit of work; tests that compare timings run alone
# (tests/conftest.py).
test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --durations=15

bench: install system-deps
	$(BIN)/python -m benchmarks.suite

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache runs

# kvshift_lens — set-up and checks. `make test` installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# This machine has a CPU build of torch 2.13.0 on disk; pyproject.toml states the real range.
TORCH_PIN ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-slow lint bench repro clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m kvshift_lens.demo --out runs/demo $(ARGS)

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

test-slow: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m slow

lint: install
	$(BIN)/ruff check kvshift_lens probes tests benchmarks

bench: install
	$(BIN)/python benchmarks/speed.py

# The paper's toy experiments (about 80 minutes on 2 cores), then REPRODUCTION.md and its figures.
repro: install
	$(BIN)/kvshift repro run --out runs/repro --jobs 2
	$(BIN)/kvshift repro report runs/repro --markdown REPRODUCTION.md --figures docs/reproduction

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info

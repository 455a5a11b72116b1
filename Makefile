# Two entry points for a fresh machine (each installs what it needs):
#   make train   - build .venv, install nest_fast, train the embedded demo (python -m nest_fast.train)
#   make test    - build .venv, install nest_fast + test deps (NeMo 3.0.0 as the oracle), run the suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
PIPQ    := $(PIP) install -q --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

.PHONY: install install-test train test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip setuptools wheel

$(VENV)/.torch: $(BIN)/python
	$(PIPQ) torch==2.13.0
	touch $@

install: $(VENV)/.torch
	$(PIPQ) -r requirements.txt
	$(PIPQ) --no-build-isolation -e .

install-test: install
	$(PIPQ) -r requirements-test.txt
	# NeMo's pins must not move torch/numpy: re-assert them
	$(PIPQ) torch==2.13.0 "numpy<2.4"

train: install
	$(BIN)/python -m nest_fast.train $(ARGS)

# pytest exits 5 when it collected no test: that must fail too, and it does (any non-zero exit fails make).
test: install-test
	$(BIN)/python -m pytest tests -q -ra $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m pytest bench --benchmark -q -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info nest_fast/*.so

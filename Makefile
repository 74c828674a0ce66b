# The two commands of the README's quick start. Each sets up everything it needs on a fresh machine
# (a virtual environment in .venv with fastprompt installed in editable mode) and then runs:
#   make train  the main job: `fastprompt train` on its built-in default (DCP on the built-in shapes)
#   make test   the test suite, Triton kernels under the interpreter on a CPU machine (what CI runs)
# and besides: make demo (the ops on every backend against float64), make bench, make info.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastprompt-installed

.PHONY: train demo test bench info clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

train: $(STAMP)
	$(BIN)/fastprompt train

demo: $(STAMP)
	$(BIN)/fastprompt demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q benches --benchmark-disable

bench: $(STAMP)
	$(BIN)/python -m pytest benches --benchmark-only

info: $(STAMP)
	$(BIN)/fastprompt info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks .hypothesis

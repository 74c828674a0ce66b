# The two commands of the README's quick start. Each sets up everything it needs on a fresh machine
# (a virtual environment in .venv with fastprompt installed in editable mode) and then runs:
#   make demo   the main job: the ops at CLIP sizes on every available backend, checked against the
#               float64 reference, then `fastprompt info`
#   make test   the test suite, Triton kernels under the interpreter on a CPU machine (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastprompt-installed

.PHONY: demo test bench info clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

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

# The two commands of the README's quick start. Each sets up everything it needs on a fresh machine
# (a virtual environment in .venv with fastprompt installed in editable mode) and then runs:
#   make train  the main job: `fastprompt train` on its built-in default (DCP on the built-in shapes)
#   make test   the test suite, Triton kernels under the interpreter on a CPU machine (what CI runs); where
#               nvcc exists it first builds the CUDA extension for sm_90 (`make ext`) and the tests then
#               require it to load and register its ops; where g++ exists the op tests run again with the CUDA
#               C++ kernels on the CPU emulator (FASTPROMPT_CUDA_EMULATE=1, tests/cuda_emulator/), and once more
#               with each block's threads run last to first between barriers: a read of another thread's write
#               with no barrier between them fails in one of the two orders; then the benchmark smoke. These
#               run as parts side by side, TEST_JOBS at a time (default: the number of cores), each logged to
#               build/test-logs/ (.ci/test_parts.py says how they are cut)
# and besides: make demo (the ops on every backend against float64), make bench, make info,
# make ext (fastprompt._C in place, EXT_ARCH="9.0" by default; rebuilt only when csrc/, setup.py, the arch, nvcc
# or torch changed: build/.fastprompt-ext.sha256 records what it was built from), make wheels (dist/: a pure
# wheel and one with the extension, versioned 0.1.0+cu<cuda>torch<major.minor>, for WHEEL_ARCH="8.0;9.0+PTX").

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastprompt-installed
NVCC := $(shell command -v nvcc 2>/dev/null)
GXX := $(shell command -v g++ 2>/dev/null)
EXT_ARCH ?= 9.0
WHEEL_ARCH ?= 8.0;9.0+PTX

.PHONY: train demo test ext wheels bench info clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

train: $(STAMP)
	$(BIN)/fastprompt train

demo: $(STAMP)
	$(BIN)/fastprompt demo

# What the extension is built from: its sources, the build scripts, the arch list, nvcc's and torch's versions.
# Their hash is kept beside the build, so an unchanged checkout reuses fastprompt._C instead of rebuilding it.
EXT_HASH := build/.fastprompt-ext.sha256
ext: $(STAMP)
	@want=$$( { find csrc -type f | LC_ALL=C sort | xargs -r cat; cat setup.py fastprompt/_build_env.py; \
	  echo "$(EXT_ARCH)"; $(NVCC) --version 2>/dev/null | tail -n 2; \
	  $(BIN)/python -c "from importlib.metadata import version; print(version('torch'))"; } | sha256sum | cut -c1-64); \
	if [ "$$want" = "$$(cat $(EXT_HASH) 2>/dev/null)" ] && ls fastprompt/_C*.so >/dev/null 2>&1; then \
	  echo "fastprompt._C is up to date (built from these sources for TORCH_CUDA_ARCH_LIST=$(EXT_ARCH))"; \
	else \
	  start=$$(date +%s); \
	  FASTPROMPT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(EXT_ARCH)" $(BIN)/python setup.py -q build_ext --inplace \
	    && mkdir -p build && echo "$$want" > $(EXT_HASH) \
	    && echo "fastprompt._C built for TORCH_CUDA_ARCH_LIST=$(EXT_ARCH) in $$(( $$(date +%s) - start )) s"; \
	fi

TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test: $(STAMP) $(if $(NVCC),ext)
	$(BIN)/python .ci/test_parts.py --jobs $(TEST_JOBS) $(if $(NVCC),--expect-extension) $(if $(GXX),--emulator)

# Two wheels in dist/ (tools/build_wheels.sh): a pure one, and one with fastprompt._C tied to the torch in $(VENV)
wheels: $(STAMP)
	rm -rf dist
	PYTHON=$(BIN)/python TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCH)" tools/build_wheels.sh dist

bench: $(STAMP)
	$(BIN)/python -m pytest benches --benchmark-only

info: $(STAMP)
	$(BIN)/fastprompt info

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks .hypothesis fastprompt/_C*.so

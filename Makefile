# The two commands of the README's quick start. Each sets up everything it needs on a fresh machine
# (a virtual environment in .venv with fastprompt installed in editable mode) and then runs:
#   make train  the main job: `fastprompt train` on its built-in default (DCP on the built-in shapes)
#   make test   the test suite, Triton kernels under the interpreter on a CPU machine (what CI runs); where
#               nvcc exists it first builds the CUDA extension for sm_90 (`make ext`) and the tests then
#               require it to load and register its ops; where g++ exists a second run puts the CUDA C++
#               kernels through the op tests on the CPU emulator (FASTPROMPT_CUDA_EMULATE=1, tests/cuda_emulator/)
#               and a third does it again with each block's threads run last to first between barriers: a
#               read of another thread's write with no barrier between them fails in one of the two orders
# and besides: make demo (the ops on every backend against float64), make bench, make info,
# make ext (fastprompt._C in place, EXT_ARCH="9.0" by default), make wheels (dist/: a pure wheel and one with
# the extension, versioned 0.1.0+cu<cuda>torch<major.minor>, for WHEEL_ARCH="8.0;9.0+PTX").

PYTHON ?= python3
VENV ?= .venv
# The op tests: every op's tests against float64 on every backend (tests/test_<op>.py); the emulator runs take
# these. Written once, here (until tests/ is regrouped by folder).
OP_TESTS := tests/test_insert.py tests/test_dafe.py tests/test_cmpa.py
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

ext: $(STAMP)
	@start=$$(date +%s); \
	FASTPROMPT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(EXT_ARCH)" $(BIN)/python setup.py -q build_ext --inplace \
	  && echo "fastprompt._C built for TORCH_CUDA_ARCH_LIST=$(EXT_ARCH) in $$(( $$(date +%s) - start )) s"

test: $(STAMP) $(if $(NVCC),ext)
	$(if $(NVCC),FASTPROMPT_EXPECT_CUDA_EXTENSION=1) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests
	$(if $(GXX),FASTPROMPT_CUDA_EMULATE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(OP_TESTS) \
	  tests/test_op_declarations.py tests/test_cuda_emulator.py -k "cuda or emulator")
	$(if $(GXX),FASTPROMPT_CUDA_EMULATE=1 FASTPROMPT_CUDA_EMULATE_ORDER=reverse TRITON_INTERPRET=1 \
	  $(BIN)/python -m pytest -q $(OP_TESTS) -k "cuda")
	$(BIN)/python -m pytest -q benches --benchmark-disable

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

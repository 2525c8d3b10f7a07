# Two commands: `make demo` (the main job) and `make test` (what CI runs). Both create .venv if
# missing and install the pinned stack (torch 2.13.0 CPU build, triton 3.8.0) and the package.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lsa-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench bench-quick synthetic install clean-ext mutate

$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command as everything that depends on it: no CUDA wheel is pulled
	$(PY) -m pip install -q torch==2.13.0 triton==3.8.0 numpy setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,train]" torch==2.13.0 triton==3.8.0
	touch $(STAMP)

install: $(STAMP)

# CI's entry. The main process runs every kernel under the Triton interpreter (tests/conftest.py);
# where CUDA exists, tests/backends/test_cuda.py then runs the COMPILED kernels against the reference in its own
# process (TRITON_INTERPRET=0: the flag is read when the kernels are imported, so it needs a new process).
test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "CUDA found: compiled Triton kernels vs the reference (tests/backends/test_cuda.py)"; \
	  TRITON_INTERPRET=0 $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests/backends/test_cuda.py; \
	else \
	  echo "no CUDA device: tests/backends/test_cuda.py (compiled kernels on a GPU) not run"; \
	fi

demo: $(STAMP)
	$(VENV)/bin/lsa demo

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

synthetic: $(STAMP)
	$(VENV)/bin/lsa synthetic

clean-ext:
	rm -rf build lsa_kernels/_C*.so

# Mutation testing (outside CI; hours on 2 cores): cosmic-ray over the core modules, report per module in
# $(CR_WORK)/<module>/report.txt; method, selections and scores in tests/mutation/REPORT.md.
# Needs: python3 -m venv /tmp/crvenv && /tmp/crvenv/bin/pip install cosmic-ray==8.7.0
mutate: $(STAMP)
	tests/mutation/run.sh all

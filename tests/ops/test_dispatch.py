"""Backend selection: backend= > use_backend > RLHF_FAST_BACKEND > auto, clear errors, no silent fallback."""

import inspect
import subprocess
import sys
import threading

import pytest
import torch

from rlhf_fast import env_report, ops
from rlhf_fast.ops import _dispatch

CPU = torch.device("cpu")
HAVE_NATIVE = _dispatch.native_module() is not None
HAVE_TRITON = _dispatch._available("gae", "triton", CPU)[0]  # the interpreter, on the CPU


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND='cuda-magic' is not one of"):
        ops.gae(torch.randn(1, 3), torch.randn(1, 3), torch.ones(1, 3))


def test_bad_backend_names_are_errors():
    with pytest.raises(ValueError, match="backend='cuda-magic' is not one of auto, torch, triton, native"):
        ops.use_backend("cuda-magic")  # checked when called, before any `with`
    with pytest.raises(ValueError, match="backend='bogus' is not one of auto, torch, triton, native"):
        ops.gae(torch.randn(1, 3), torch.randn(1, 3), torch.ones(1, 3), backend="bogus")
    with pytest.raises(TypeError, match="backend must be a str"):
        ops.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend=1)


def test_explicit_backend_without_kernel_raises(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "native")
    with pytest.raises(NotImplementedError, match="fused_linear_logprobs: backend 'native'"):
        ops.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        ops.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_auto_on_cpu(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "auto")
    assert _dispatch.select("fused_linear_logprobs", CPU) == "torch"
    assert _dispatch.select("gae", CPU) == ("native" if HAVE_NATIVE else "torch")


def test_precedence_argument_then_context_then_env(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "native")
    assert _dispatch.requested_backend() == "native"
    with ops.use_backend("triton") as name:
        assert name == "triton"
        assert _dispatch.requested_backend() == "triton"  # the block overrides the environment
        with ops.use_backend("torch"):
            assert _dispatch.requested_backend() == "torch"  # blocks nest
            assert _dispatch.requested_backend("auto") == "auto"  # the argument overrides the block
        assert _dispatch.requested_backend() == "triton"  # and the outer one comes back
    assert _dispatch.requested_backend() == "native"
    monkeypatch.delenv("RLHF_FAST_BACKEND")
    assert _dispatch.requested_backend() == "auto"


def test_backend_argument_wins_in_a_real_call(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])
    with ops.use_backend("native"):  # no native kernel for this op: without the argument the call raises
        with pytest.raises(NotImplementedError, match="backend 'native'"):
            ops.fused_linear_logprobs(h, w, t)
        lp = ops.fused_linear_logprobs(h, w, t, backend="torch")
    torch.testing.assert_close(lp, torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0])


def test_use_backend_restores_on_exception_and_decorates():
    with pytest.raises(RuntimeError, match="boom"):
        with ops.use_backend("torch"):
            raise RuntimeError("boom")
    assert _dispatch.request_source() != "use_backend"

    @ops.use_backend("triton")
    def inside():
        return _dispatch.requested_backend()

    assert inside() == "triton" and inside() == "triton"  # reusable as a decorator
    assert _dispatch.request_source() != "use_backend"


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other():
        with ops.use_backend("native"):
            started.set()
            release.wait(10)
            seen["other, inside its block"] = _dispatch.requested_backend()

    thread = threading.Thread(target=other)
    with ops.use_backend("torch"):
        thread.start()
        started.wait(10)
        seen["main, while the other thread is in its block"] = _dispatch.requested_backend()
        release.set()
        thread.join(10)
    assert seen == {"main, while the other thread is in its block": "torch", "other, inside its block": "native"}
    assert _dispatch.requested_backend() == "auto"


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


FLOAT64_CALLS = {
    "gae": lambda backend: ops.gae(_f64(2, 5), _f64(2, 5), torch.ones(2, 5), backend=backend),
    "kl_penalized_gae": lambda backend: ops.kl_penalized_gae(_f64(2, 5), _f64(2, 5), _f64(2, 5), _f64(2),
                                                             torch.ones(2, 5), kl_coef=0.1, backend=backend),
    "fused_linear_logprobs": lambda backend: ops.fused_linear_logprobs(_f64(2, 4), _f64(5, 4), torch.tensor([0, 3]),
                                                                       backend=backend),
    "logprobs_from_logits": lambda backend: ops.logprobs_from_logits(_f64(2, 5), torch.tensor([0, 3]),
                                                                     backend=backend),
    "fused_linear_ppo_loss": lambda backend: ops.fused_linear_ppo_loss(
        _f64(1, 2, 4), _f64(5, 4), torch.tensor([[0, 3]]), _f64(1, 2), _f64(1, 2), torch.ones(1, 2),
        backend=backend)[0],
}
FLOAT64_EXPLICIT = [pytest.param(op, b, marks=pytest.mark.skipif(not (HAVE_NATIVE if b == "native" else HAVE_TRITON),
                                                                 reason=f"{b} not available here"))
                    for op in FLOAT64_CALLS for b in ("triton", "native")
                    if op in (_dispatch._TRITON_OPS if b == "triton" else _dispatch._NATIVE_OPS)]


@pytest.mark.parametrize("op,backend", FLOAT64_EXPLICIT)
@pytest.mark.parametrize("how", ["argument", "use_backend", "env"])
def test_float64_on_a_kernel_backend_raises(monkeypatch, op, backend, how):
    """The kernels compute in fp32: an explicit request with float64 inputs raises, it never runs torch."""
    call = FLOAT64_CALLS[op]
    match = f'{op}: backend {backend!r} is not available \\(float64 inputs.*use backend="torch"'
    with pytest.raises(NotImplementedError, match=match):
        if how == "argument":
            call(backend)
        elif how == "use_backend":
            with ops.use_backend(backend):
                call(None)
        else:
            monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
            call(None)


@pytest.mark.parametrize("op", list(FLOAT64_CALLS))
@pytest.mark.parametrize("backend", [None, "auto", "torch"])
def test_float64_runs_on_torch(monkeypatch, op, backend):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    out = FLOAT64_CALLS[op](backend)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float64


def test_auto_sends_float64_to_torch_on_cuda_too():
    """The CUDA preference order, checked without a GPU: only availability decides, and float64 never goes
    to a kernel."""
    cuda = torch.device("cuda")
    expect = "triton" if _dispatch.triton_available() else "torch"
    assert _dispatch.select("fused_linear_logprobs", cuda, torch.float32, "auto") == expect
    for op in ("fused_linear_logprobs", "fused_linear_ppo_loss", "gae"):
        assert _dispatch.select(op, cuda, torch.float64, "auto") == "torch"
        assert _dispatch.select(op, CPU, torch.float64, "auto") == "torch"


@pytest.mark.parametrize("op", sorted(_dispatch._TRITON_OPS | _dispatch._NATIVE_OPS))
def test_every_dispatching_op_takes_backend(op):
    param = inspect.signature(getattr(ops, op)).parameters["backend"]
    assert param.default is None and param.kind is inspect.Parameter.KEYWORD_ONLY


def test_env_report_lists_every_backend():
    text = env_report(print_it=False)
    assert "torch" in text and "fused_linear_ppo_loss [cpu]" in text and "rlhf_fast._C" in text
    with ops.use_backend("torch"):
        assert "backend: torch (from use_backend" in env_report(print_it=False)
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.env"], capture_output=True, text=True, check=True)
    assert "gae [cpu]" in out.stdout

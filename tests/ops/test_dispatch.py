"""Backend selection: RLHF_FAST_BACKEND read at each call, clear errors, no silent fallback."""

import subprocess
import sys

import pytest
import torch

from rlhf_fast import env_report, ops
from rlhf_fast.ops import _dispatch


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND='cuda-magic' is not one of"):
        ops.gae(torch.randn(1, 3), torch.randn(1, 3), torch.ones(1, 3))


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
    cpu = torch.device("cpu")
    assert _dispatch.select("fused_linear_logprobs", cpu) == "torch"
    expected = "native" if _dispatch.native_module() is not None else "torch"
    assert _dispatch.select("gae", cpu) == expected


def test_env_report_lists_every_backend():
    text = env_report(print_it=False)
    assert "torch" in text and "fused_linear_ppo_loss [cpu]" in text and "rlhf_fast._C" in text
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.env"], capture_output=True, text=True, check=True)
    assert "gae [cpu]" in out.stdout

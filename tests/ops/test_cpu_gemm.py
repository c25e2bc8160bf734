"""ops.cpu_gemm: oneDNN's GEMM against float64 products and torch's own op, and the rule of which calls take it.
The fixtures onednn_calls and onednn_everywhere (tests/conftest.py) skip where torch has no oneDNN linear op."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import ops
from rlhf_fast.ops import cpu_gemm
from tests.ops import reference as ref
from tests.tolerances import assert_close


def _f64_linear(x, w, b=None):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_layout", ["rows", "transposed_view"])
def test_linear_matches_float64(onednn_calls, bias, weight_layout):
    g = torch.Generator().manual_seed(0)
    rows, n_in, out = 129, 96, 1400  # above both thresholds: 129 x 96 x 1400 > 2^24
    x = torch.randn(rows, n_in, generator=g)
    w = torch.randn(out, n_in, generator=g) / n_in**0.5
    if weight_layout == "transposed_view":
        w = torch.randn(n_in, out, generator=g).t() / n_in**0.5
    b = torch.randn(out, generator=g) if bias else None
    y = cpu_gemm.linear(x, w, b)
    assert onednn_calls["n"] == 1
    assert y.shape == (rows, out) and y.dtype == torch.float32
    assert_close(y, _f64_linear(x, w, b), torch.float32)
    assert_close(y, F.linear(x, w, b), torch.float32)  # torch's BLAS: the same product, other rounding


def test_matmul_matches_float64(onednn_everywhere):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 70, generator=g), torch.randn(70, 19, generator=g)
    y = cpu_gemm.matmul(a, b)
    assert onednn_everywhere["n"] == 1
    assert_close(y, a.double() @ b.double(), torch.float32)


@pytest.mark.parametrize("rows, taken", [(cpu_gemm.MIN_ROWS - 1, False), (cpu_gemm.MIN_ROWS, True)])
def test_row_threshold(onednn_calls, rows, taken):
    x, w = torch.randn(rows, 512), torch.randn(1024, 512)  # 2^19 x rows multiply-adds: above MIN_MACS
    y = cpu_gemm.linear(x, w)
    assert onednn_calls["n"] == taken
    if not taken:
        assert torch.equal(y, F.linear(x, w))  # torch's op itself


def test_small_products_take_torch(onednn_calls):
    x, w = torch.randn(512, 32), torch.randn(32, 32)  # 512 rows but 2^19 multiply-adds
    assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert onednn_calls["n"] == 0


@pytest.mark.parametrize("case", ["float64", "bfloat16", "3-d input", "grad"])
def test_other_calls_take_torch(onednn_everywhere, case):
    x, w, b = torch.randn(80, 64), torch.randn(48, 64), torch.randn(48)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "bfloat16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "3-d input":
        x = x.view(8, 10, 64)
    elif case == "grad":
        w.requires_grad_(True)
    y = cpu_gemm.linear(x, w, b)
    assert onednn_everywhere["n"] == 0
    assert torch.equal(y, F.linear(x, w, b))
    if case == "grad":
        (gw,) = torch.autograd.grad(y.sum(), w)
        assert_close(gw, torch.ones(80, 48, dtype=torch.float64).t() @ x.double(), torch.float32)


@pytest.mark.parametrize("case", ["autocast", "compiled", "mkldnn disabled", "padded rows", "padded weight"])
def test_contexts_and_layouts_that_take_torch(onednn_everywhere, case):
    x, w = torch.randn(80, 64), torch.randn(48, 64)
    if case == "padded rows":
        x = torch.randn(80, 72)[:, :64]
    elif case == "padded weight":
        w = torch.randn(48, 72)[:, :64]
    fn = cpu_gemm.linear
    if case == "compiled":
        fn = torch.compile(cpu_gemm.linear, backend="eager", fullgraph=True)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, want = fn(x, w), F.linear(x, w)
        assert y.dtype == want.dtype == torch.bfloat16
    elif case == "mkldnn disabled":
        with torch.backends.mkldnn.flags(enabled=False):
            y, want = fn(x, w), F.linear(x, w)
    else:
        y, want = fn(x, w), F.linear(x, w)
    assert onednn_everywhere["n"] == 0
    assert torch.equal(y, want)


def test_strided_bias_takes_torch(onednn_everywhere):
    x, w, b = torch.randn(80, 64), torch.randn(48, 64), torch.randn(96)[::2]  # a bias with stride 2
    assert torch.equal(cpu_gemm.linear(x, w, b), F.linear(x, w, b))
    assert onednn_everywhere["n"] == 0


@pytest.mark.parametrize("bad", ["in", "bias"])
def test_mismatched_shapes_raise_torchs_error(onednn_everywhere, bad):
    x, w, b = torch.randn(80, 64), torch.randn(48, 64 if bad != "in" else 63), torch.randn(48 if bad != "bias" else 47)
    with pytest.raises(RuntimeError):
        F.linear(x, w, b)
    with pytest.raises(RuntimeError):
        cpu_gemm.linear(x, w, b)
    assert onednn_everywhere["n"] == 0


def test_requires_grad_under_no_grad_takes_onednn(onednn_everywhere):
    x, w = torch.randn(80, 64, requires_grad=True), torch.randn(48, 64, requires_grad=True)
    with torch.no_grad():
        y = cpu_gemm.linear(x, w)
    assert onednn_everywhere["n"] == 1 and not y.requires_grad
    assert_close(y, _f64_linear(x.detach(), w.detach()), torch.float32)


def test_torch_backend_never_takes_onednn(onednn_everywhere, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_backend", "torch")
    x, w = torch.randn(300, 256), torch.randn(512, 256)
    assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert onednn_everywhere["n"] == 0


def test_set_backend(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_backend", cpu_gemm._backend)
    with pytest.raises(ValueError, match="RLHF_FAST_CPU_GEMM"):
        cpu_gemm.set_backend("mkl")
    cpu_gemm.set_backend("torch")
    assert cpu_gemm.backend() == "torch"
    cpu_gemm.set_backend("onednn")
    assert cpu_gemm.backend() == ("onednn" if cpu_gemm._OP is not None else "torch")


@pytest.mark.parametrize("value, expect", [(None, "onednn"), ("torch", "torch"), ("bogus", "error")])
def test_environment_variable(value, expect):
    env = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_CPU_GEMM"}
    if value is not None:
        env["RLHF_FAST_CPU_GEMM"] = value
    p = subprocess.run([sys.executable, "-c", "from rlhf_fast.ops import cpu_gemm; print(cpu_gemm.backend())"],
                       env=env, capture_output=True, text=True)
    if expect == "error":
        assert p.returncode != 0 and "RLHF_FAST_CPU_GEMM" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    if expect == "onednn" and cpu_gemm._OP is None:
        expect = "torch"
    assert p.stdout.strip() == expect


def test_env_report_names_the_cpu_gemm_backend(monkeypatch):
    from rlhf_fast import env_report

    monkeypatch.setattr(cpu_gemm, "_backend", "torch")
    assert "CPU GEMMs (ops.cpu_gemm): torch" in env_report(print_it=False)


# ------------------------------------------------------------------- the fused ops' torch backends on oneDNN


def test_fused_ppo_torch_backend_with_onednn_gemms(onednn_everywhere, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 2, 9, 24, 301
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 3] = -100
    old = torch.randn(B, T, generator=g) - 5.0
    adv, mask = torch.randn(B, T, generator=g), (torch.rand(B, T, generator=g) > 0.2).float()
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, entropy_coef=0.01, clip_low=0.2)
    assert onednn_everywhere["n"] == 2  # the logits and the hidden-state gradient (one chunk)
    leaves = [p.detach().double().requires_grad_(True) for p in (hidden, weight)]
    lp, ent = ref.linear_logprobs_entropy(leaves[0], leaves[1], targets, None)
    token = ref.ppo_token_loss(lp, old, adv, 0.2, None, None) - 0.01 * ent
    expected = ref.aggregate(token, mask * (targets != -100), "token-mean")
    assert_close(loss, expected, torch.float32)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(expected, leaves)):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_logprobs_torch_backend_with_onednn_gemms(onednn_everywhere, monkeypatch, weight_grad):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    weight = (torch.randn(301, 16, generator=g) / 4).requires_grad_(weight_grad)
    targets = torch.randint(0, 301, (2, 13), generator=g)
    targets[1, 5] = -100
    lp, ent = ops.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert onednn_everywhere["n"] >= 1
    params = [hidden] + ([weight] if weight_grad else [])
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(weight_grad)]
    r_lp, r_ent = ref.linear_logprobs_entropy(leaves[0], leaves[1], targets, None)
    assert_close(lp, r_lp, torch.float32)
    assert_close(ent, r_ent, torch.float32)
    grads = torch.autograd.grad((lp * 1.3).sum() - ent.sum(), params)
    r_grads = torch.autograd.grad((r_lp * 1.3).sum() - r_ent.sum(), leaves[:len(params)])
    for got, want in zip(grads, r_grads):
        assert_close(got, want, torch.float32)

"""Large float32 GEMMs on the CPU through oneDNN instead of torch's default BLAS.

torch runs `x @ w.T` on the CPU with its BLAS (MKL in the official wheels). The same wheels carry oneDNN, whose
fp32 GEMM `torch.ops.mkldnn._linear_pointwise` (the op torch.compile's CPU backend emits for linear layers) ran
the shapes of our forwards and backwards faster on this project's CPU, one thread (AMD EPYC, Zen 4;
bench/results/cpu-gemm-2026-12-07.md): 1.08-1.11x on SmolLM2-135M's projections and the backward's dx GEMMs at
1408 rows, 1.31x and 1.08x on the lm head's 128-row chunks (logits, grad_hidden), 1.06-1.08x over whole
backbones; small calls (16-64 rows of a 128-256 wide layer) ran at 0.71-0.72x, its fixed cost per call
outweighing the kernel. So `linear` and `matmul` take oneDNN only for calls with at least MIN_ROWS rows and MIN_MACS
multiply-adds, and torch's own op otherwise (a one-off grid over rows 16-2560 and widths 128-1536 put the
crossover there; not in bench/results).

Both compute the same product; the sums are associated differently, so the results differ in rounding (1e-6
relative in fp32), not in value. Nothing else takes this path: another dtype or device, more than 2 dimensions,
operands that are not dense (row-major, or a weight's transposed view), a call whose result needs autograd (the
oneDNN op has no derivative; the callers use it without grad or inside their own autograd.Function), CPU
autocast, code being compiled by torch.compile, or torch.backends.mkldnn.enabled False: those run torch's op.

The environment variable RLHF_FAST_CPU_GEMM=torch (read at import; `set_backend` at run time) turns the oneDNN
path off; "onednn" (the default) keeps it on where torch has the op.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

# A call takes oneDNN with at least this many rows and this many multiply-adds (rows x out x in); below, its
# fixed cost per call outweighs the faster kernel (module doc).
MIN_ROWS = 64
MIN_MACS = 1 << 24

BACKENDS = ("onednn", "torch")


def _onednn_op():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_OP = _onednn_op()
_backend = "torch"


def set_backend(name: str) -> None:
    """Select the CPU GEMM backend: "onednn" (large fp32 calls through oneDNN where torch has it) or "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"RLHF_FAST_CPU_GEMM / set_backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name if _OP is not None else "torch"


def backend() -> str:
    """The backend in use: "onednn" or "torch" (also when oneDNN was asked for and this torch lacks the op)."""
    return _backend


set_backend(os.environ.get("RLHF_FAST_CPU_GEMM", "onednn"))


def _takes_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # weight (out, in), row-major or a transposed row-major view; x (rows, in) row-major
    if _backend != "onednn" or x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() != 2 \
            or weight.dim() != 2:
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != x.dtype):
        return False
    rows, (out, n_in) = x.shape[0], weight.shape
    if rows < MIN_ROWS or rows * out * n_in < MIN_MACS or x.shape[1] != n_in:
        return False  # (a mismatch: F.linear raises its error)
    if bias is not None and (bias.device.type != "cpu" or bias.dim() != 1 or bias.shape[0] != out
                             or bias.stride(0) != 1):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or not torch.backends.mkldnn.enabled:
        return False  # autocast's dtype rules and compiled graphs are F.linear's
    # dense layouts only: x row-major; weight row-major or the transposed view of a row-major (in, out)
    return (x.stride(1) == 1 and x.stride(0) == n_in and (weight.stride(1) == 1 and weight.stride(0) == n_in
                                                          or weight.stride(0) == 1 and weight.stride(1) == out))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) = x @ weight.T + bias: x (N, in), weight (out, in), bias (out,) -> (N, out).

    Large fp32 CPU calls without autograd run oneDNN's GEMM (module doc); the rest F.linear."""
    if _takes_onednn(x, weight, bias):
        return _OP(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D a (N, K) and b (K, M) -> (N, M), through `linear` (b.T is a view, not a copy)."""
    return linear(a, b.t()) if a.dim() == 2 and b.dim() == 2 else a @ b

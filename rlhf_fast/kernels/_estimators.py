"""The per-token KL estimators on d = logprobs - ref_logprobs and their derivatives in d, for Triton kernels:
the one Triton definition, used by kernels/gae.py and kernels/ppo_loss.py. The torch twin is
rlhf_fast/ops/_estimators.py, the C++/CUDA one csrc/kl_estimators.h. Codes as in ops/_checks.ESTIMATORS:
0 k1 = d, 1 k2 = d^2 / 2, 2 k3 = exp(-d) - 1 + d, 3 abs = |d| (Schulman, "Approximating KL divergence", 2020).

k3 and its derivative 1 - exp(-d) cancel near d = 0 in fp32 (exp(-d) - 1 + d at d = 1e-4 is -1.7e-8 for the true
5.0e-9; 1 - exp(-d) at d = 1e-6 is 1.3% off). For |d| < 1 both are Taylor series (truncation below 3e-8 relative),
above it the plain exp form has no cancellation left: within 4.1e-7 of mpmath over |d| in [1e-7, 30] under the
interpreter (numpy's exp; the GPU's exp adds about 2 ulp). libdevice's expm1 is not used: the interpreter
cannot run extern functions, and expm1(-d) + d would still cancel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kl_k3(d):
    # sum_{n>=2} (-d)^n / n! = d^2 (1/2 - d/6 + ... + d^8 / 10!), Horner from the top term.
    p = d * (1.0 / 3628800.0) - (1.0 / 362880.0)
    p = p * d + (1.0 / 40320.0)
    p = p * d - (1.0 / 5040.0)
    p = p * d + (1.0 / 720.0)
    p = p * d - (1.0 / 120.0)
    p = p * d + (1.0 / 24.0)
    p = p * d - (1.0 / 6.0)
    p = p * d + 0.5
    # NaN fails |d| < 1 and goes through exp, so it propagates.
    return tl.where(tl.abs(d) < 1.0, d * d * p, tl.exp(-d) - 1.0 + d)


@triton.jit
def kl_k3_grad(d):
    # d/dd k3 = 1 - exp(-d) = sum_{m>=1} (-1)^(m+1) d^m / m! = d (1 - d/2 + d^2/6 - ... - d^9 / 10!).
    q = d * (-1.0 / 3628800.0) + (1.0 / 362880.0)
    q = q * d - (1.0 / 40320.0)
    q = q * d + (1.0 / 5040.0)
    q = q * d - (1.0 / 720.0)
    q = q * d + (1.0 / 120.0)
    q = q * d - (1.0 / 24.0)
    q = q * d + (1.0 / 6.0)
    q = q * d - 0.5
    q = q * d + 1.0
    return tl.where(tl.abs(d) < 1.0, d * q, 1.0 - tl.exp(-d))


@triton.jit
def kl_estimate(d, ESTIMATOR: tl.constexpr):
    """The estimator `ESTIMATOR` (0 k1, 1 k2, 2 k3, 3 abs) of fp32 d, elementwise."""
    if ESTIMATOR == 0:
        kl = d
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
    elif ESTIMATOR == 2:
        kl = kl_k3(d)
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def kl_estimate_grad(d, ESTIMATOR: tl.constexpr):
    """d kl_estimate(d) / dd (abs: sign(d), 0 at 0), elementwise."""
    if ESTIMATOR == 0:
        g = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        g = d
    elif ESTIMATOR == 2:
        g = kl_k3_grad(d)
    else:
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return g

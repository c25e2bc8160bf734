"""The per-token KL estimators on d = logprobs - ref_logprobs (Schulman, "Approximating KL divergence", 2020),
in torch: the one Python definition, used by kl_penalty, the torch backends of kl_penalized_gae and
fused_linear_ppo_loss, and their statistics. The Triton twin is rlhf_fast/kernels/_estimators.py, the C++/CUDA
one csrc/kl_estimators.h; all three evaluate k3 the same way.

Codes as in _checks.ESTIMATORS: 0 k1 = d, 1 k2 = d^2 / 2, 2 k3 = exp(-d) - 1 + d, 3 abs = |d|.
"""

from __future__ import annotations

import math

import torch

# k3 = exp(-d) - 1 + d = sum_{n>=2} (-d)^n / n!: the coefficients of d^2 .. d^10.
K3_SERIES = tuple((-1.0) ** n / math.factorial(n) for n in range(2, 11))
# Below these |d| the series is used, above them expm1(-d) + d. expm1(-d) + d cancels (relative error
# up to ~eps / |d|: 9% at d = 1e-6 in fp32), the series does not; its truncation is 2 |d|^9 / 11! relative. fp32:
# 1.0 (series <= 2.1e-7, expm1 form <= 1.6e-7 relative, measured against mpmath); float64: 0.1, where the
# truncation (3e-16) meets the cancellation (1.5e-15).
K3_SERIES_BELOW = {torch.float64: 0.1}
K3_SERIES_BELOW_DEFAULT = 1.0


def k3(d: torch.Tensor) -> torch.Tensor:
    """exp(-d) - 1 + d, to a few ulps of d's dtype for every d (no cancellation near 0). Differentiable:
    the series sees 0 where it is not used, so the unused branch never feeds inf or NaN into the gradient."""
    small = d.abs() < K3_SERIES_BELOW.get(d.dtype, K3_SERIES_BELOW_DEFAULT)  # False for NaN: expm1 carries it
    ds = torch.where(small, d, 0.0)
    p = ds * K3_SERIES[-1] + K3_SERIES[-2]  # Horner
    for c in reversed(K3_SERIES[:-2]):
        p = p * ds + c
    return torch.where(small, ds * ds * p, torch.expm1(-d) + d)


def kl_terms(d: torch.Tensor, code: int) -> torch.Tensor:
    """The estimator on d = logprobs - ref_logprobs (code from _checks.ESTIMATORS), elementwise, in d's dtype."""
    if code == 0:
        return d
    if code == 1:
        return 0.5 * d * d
    if code == 2:
        return k3(d)
    return d.abs()


def kl_terms_grad(d: torch.Tensor, code: int) -> torch.Tensor:
    """The derivative in d of kl_terms(d, code), elementwise: k1 1, k2 d, k3 1 - exp(-d) (as -expm1(-d): no
    cancellation near 0), abs sign(d) (0 at 0, as autograd's)."""
    if code == 0:
        return torch.ones_like(d)
    if code == 1:
        return d
    if code == 2:
        return -torch.expm1(-d)
    return torch.sign(d)

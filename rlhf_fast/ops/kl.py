"""Per-token KL penalty estimators between the policy and the frozen reference."""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks
from rlhf_fast.ops._estimators import kl_terms

__all__ = ["kl_penalty", "kl_terms"]  # kl_terms: defined in _estimators, imported from here by the other ops


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of policy vs reference from sampled-token log-probs (Schulman, "Approximating
    KL divergence", 2020).

    Args:
        logprobs: (B, T) (any shape) log pi(a_t | s_t) of the sampled tokens.
        ref_logprobs: same shape, log pi_ref(a_t | s_t).
        estimator: with d = logprobs - ref_logprobs:
            "k1" = d (unbiased, can be negative), "k2" = d^2 / 2, "k3" = exp(-d) - 1 + d (unbiased, >= 0;
            evaluated without cancellation, a Taylor series near d = 0), "abs" = |d|.

    Returns:
        fp32 tensor of the same shape (float64 for float64 inputs); differentiable (plain torch ops).
    """
    _checks.floating("logprobs", logprobs)
    _checks.floating("ref_logprobs", ref_logprobs)
    _checks.same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    _checks.same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    code = _checks.estimator(estimator)
    dtype = _checks.compute_dtype(logprobs, ref_logprobs)
    return kl_terms(logprobs.to(dtype) - ref_logprobs.to(dtype), code)

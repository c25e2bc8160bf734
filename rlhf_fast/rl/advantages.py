"""Advantages and reward shaping for the on-policy algorithms.

    shape_scores     missing-EOS penalty, running normalisation and clipping of sequence scores
    ppo_advantages   KL-penalised per-token rewards and GAE with a critic (InstructGPT's PPO), in one op
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_fast import ops
from rlhf_fast.rl.kl_control import RunningMoments

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""A sum over the processes of a data-parallel run (torch.distributed's all_reduce): whitening and score moments
then use the global batch's statistics, as one process would."""


def shape_scores(scores: torch.Tensor, has_eos: torch.Tensor, *, missing_eos_penalty: float | None = None,
                 moments: RunningMoments | None = None, clip: float | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """scores (B,) -> shaped (B,) fp32: minus missing_eos_penalty where a response has no EOS (TRL's
    missing_eos_penalty), then (x - mean) / std by the running moments when given (updated with this batch),
    then clipped to [-clip, clip]. gather: the global batch's scores from this process's (data parallel), so the
    moments are those of the global batch."""
    scores = scores.float()
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    if moments is not None:
        moments.update(gather(scores) if gather is not None else scores)
        scores = (scores - moments.mean) / moments.std
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


@torch.no_grad()
def ppo_advantages(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   scores: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, gamma: float, lam: float,
                   estimator: str, whiten: bool, reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
    """PPO's experience maths (Ouyang et al. 2022; Ziegler et al. 2019): r_t = -kl_coef * KL_t on response
    tokens plus the score on the last one, GAE over (B, T), advantages whitened over the batch when `whiten`.

    reduce: whiten with the statistics of every process's batch (see masked_whiten_global).
    Returns {"advantages", "returns"} (B, T) and {"kl"} (B,) the per-sequence sum of the estimator."""
    adv, returns, _ = ops.kl_penalized_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef=kl_coef,
                                           gamma=gamma, lam=lam, estimator=estimator)  # (B, T) each
    if whiten:
        adv = ops.masked_whiten(adv, mask) if reduce is None else masked_whiten_global(adv, mask, reduce)
    kl = (ops.kl_penalty(logprobs, ref_logprobs, estimator) * mask).sum(1)  # (B,)
    return {"advantages": adv, "returns": returns, "kl": kl}


def masked_whiten_global(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce, eps: float = 1e-8) -> torch.Tensor:
    """ops.masked_whiten (x - mean) / sqrt(var + eps), var unbiased, over the valid positions of EVERY process's
    batch: the counts and sums go through `reduce` (an all-reduce sum). x, mask (B, T) -> (B, T) fp32, 0 where
    masked."""
    valid = mask != 0
    xv = torch.where(valid, x.float(), 0.0)
    n = reduce(valid.float().sum())
    mean = reduce(xv.sum()) / n.clamp(min=1)
    var = reduce((torch.where(valid, xv - mean, 0.0) ** 2).sum()) / (n - 1).clamp(min=1)
    return torch.where(valid, (xv - mean) * torch.rsqrt(var + eps), 0.0)

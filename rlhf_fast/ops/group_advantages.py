"""Group-relative advantages for the critic-free methods: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025),
RLOO (Ahmadian et al. 2024) and REINFORCE++-baseline (Hu et al. 2025).

One sequence score per sample, G samples per prompt, no value network: the baseline is the mean of the
prompt's other samples (rloo) or of all its samples (grpo), optionally divided by a standard deviation.
"""

from __future__ import annotations

import math

import torch

from rlhf_fast.ops import _checks

ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")


def group_advantages(scores: torch.Tensor, group_size: int, *, estimator: str = "grpo", scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Per-sample advantages from the scores of groups of samples of the same prompt.

    Args:
        scores: (B,) float, B = prompts x group_size, each prompt's samples contiguous: rows
            g*G .. g*G + G - 1 belong to prompt g.
        group_size: G >= 2 samples per prompt.
        estimator: "grpo": a_i = r_i - mean of its group;
            "rloo": a_i = r_i - mean of the other G - 1 samples of its group = G / (G - 1) * (r_i - mean).
        scale: "group": a_i / (std of its group + eps); "batch": a_i / (std of all B scores + eps);
            "none": a_i. std is unbiased (Bessel's correction, as TRL).
        eps: >= 0, added to the std.

    Dr. GRPO is grpo with scale "none"; REINFORCE++-baseline is grpo with scale "batch".

    Returns:
        (B,) fp32, no gradient. A group whose scores are all equal gets exactly 0 (never NaN, whatever the
        scale); a NaN score makes its group NaN.
    """
    _checks.floating("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"the batch of {scores.shape[0]} scores is not divisible by group_size={group_size}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    with torch.no_grad():
        r = scores.double().view(-1, group_size)  # (prompts, G); float64 so the group sums do not round
        mean = r.mean(1, keepdim=True)
        a = r - mean
        if estimator == "rloo":
            a = a * (group_size / (group_size - 1))
        if scale == "group":
            a = a / (r.std(1, keepdim=True) + eps)
        elif scale == "batch":
            a = a / (r.std() + eps)
        constant = (r == r[:, :1]).all(1, keepdim=True)  # NaN != NaN: a group with a NaN is not constant
        a = a.masked_fill(constant, 0.0)
        return a.reshape(-1).float()

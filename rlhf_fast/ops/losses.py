"""Element-wise RLHF losses: PPO clipped surrogate, clipped value loss, Bradley-Terry; and aggregation.

Aggregation modes (`agg`), with l the per-token loss and m the 0/1 mask:
  "token-mean"          = sum(l * m) / sum(m)
  "seq-mean-token-sum"  = mean over rows with a valid token of sum_t(l * m)
  "seq-mean-token-mean" = mean over those rows of sum_t(l * m) / sum_t(m)
  "seq-mean-token-sum-norm" = sum_{b,t}(l * m) / (B * T), T the tensors' time dimension (a constant, not the
                          number of valid tokens): Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
                          Training"), TRL's loss_type="dr_grpo", verl's loss_agg_mode of the same name
Each is sum(w * l) with weights w that depend on the mask only (`agg_weights`). An all-zero mask gives
loss 0 and zero gradients, never NaN. Masked positions never enter (even when they hold NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast.ops import _checks


def agg_weights(mask: torch.Tensor, agg: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights w (shape of mask) with loss = sum(w * l) for the aggregation mode `agg`."""
    m = (mask != 0).to(dtype)
    if agg == "token-mean":
        return m / m.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        return m / max(1, m.numel())  # B * T: rows times the time dimension, valid or not
    rows = m.reshape(-1, m.shape[-1]) if m.dim() > 1 else m[None]
    per_row = rows.sum(dim=1, keepdim=True)
    n_rows = (per_row > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        w = rows / n_rows
    else:
        w = rows / per_row.clamp(min=1) / n_rows
    return w.reshape(m.shape)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Aggregate a per-token loss with `agg` (module docstring); masked positions never enter."""
    w = agg_weights(mask, agg, per_token.dtype)
    return (torch.where(mask != 0, per_token, 0.0) * w).sum()


def masked_inputs(mask: torch.Tensor, dtype: torch.dtype, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Zero the masked positions of each input before any arithmetic, so that NaN padding cannot reach the
    loss or leak into gradients (0 * NaN through torch.where's backward)."""
    valid = mask != 0
    return [torch.where(valid, x.to(dtype), 0.0) for x in xs]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = mask != 0
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def _as_float(name, value):
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    return float(value)


def check_clip(clip_low, clip_high, dual_clip):
    """Validate and resolve the clip settings; returns (clip_low, clip_high, dual_clip)."""
    clip_low = _checks.positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _checks.positive("clip_high", clip_high)
    dual_clip = _as_float("dual_clip", dual_clip)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    return clip_low, clip_high, dual_clip


def ppo_per_token(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip):
    """Per-token clipped surrogate l and its pieces (fp32 tensors). Plain torch ops, differentiable."""
    return clipped_surrogate(torch.exp(logprobs - old_logprobs), advantages, clip_low, clip_high, dual_clip)


def sequence_ratio(logprobs, old_logprobs, valid):
    """GSPO's sequence importance ratio (Zheng et al. 2025, "Group Sequence Policy Optimization"), per row:
    s = exp(sum_t m (logprobs - old) / sum_t m), m = valid; 1 for a row without a valid token. (..., T) -> (...),
    differentiable in logprobs. Invalid positions never enter (a NaN there stays out)."""
    d = torch.where(valid, logprobs - old_logprobs, 0.0)
    return torch.exp(d.sum(-1) / valid.sum(-1).clamp(min=1))


def clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip):
    """max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), dual-clipped where A < 0, and its pieces (ratio, where
    clipped); ratio and advantages broadcast (a (B, 1) sequence ratio against (B, T) advantages)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_mask = clipped > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        clipped_mask = clipped_mask | dual
    return loss, ratio, clipped_mask


def ppo_stats(logprobs, old_logprobs, ratio, clipped_mask, mask):
    d = (logprobs - old_logprobs).detach()
    return {
        "clipfrac": masked_mean(clipped_mask.to(d.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * d * d, mask).detach(),
        "ratio": masked_mean(ratio.detach(), mask).detach(),
    }


def _check_per_token(ref_name, ref, mask, **others):
    _checks.floating(ref_name, ref)
    for name, x in others.items():
        _checks.floating(name, x)
    if ref.dim() < 1:
        raise ValueError(f"{ref_name} must have a time dimension (B, T), got a 0-dim tensor")
    _checks.same_shape(ref_name, ref, **others)
    _checks.mask("mask", mask, ref.shape)
    _checks.same_device(**{ref_name: ref, "mask": mask}, **others)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, agg: str = "token-mean"
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), with asymmetric clip (DAPO's clip-higher) and dual
    clip (Ye et al. 2020).

    Args:
        logprobs: (B, T) current-policy log-probs of the sampled tokens (differentiable).
        old_logprobs: (B, T) log-probs at rollout time.  advantages: (B, T).  mask: (B, T) 0/1.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high defaults to clip_low.
        dual_clip: c > 1 or None; where A < 0 the loss is capped at -A * c.
        agg: "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (see the
            module docstring).

    Per token, ratio = exp(logprobs - old_logprobs),
    l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip c, where A < 0,
    l = min(l, -A * c).

    Returns:
        (loss, stats): loss a 0-dim fp32 tensor; stats detached 0-dim tensors "clipfrac" (share of valid
        tokens whose loss was clipped), "approx_kl" (mean of (logprobs - old)^2 / 2) and "ratio" (mean).
    """
    _check_per_token("logprobs", logprobs, mask, old_logprobs=old_logprobs, advantages=advantages)
    agg = _checks.agg(agg)
    clip_low, clip_high, dual_clip = check_clip(clip_low, clip_high, dual_clip)
    dtype = _checks.compute_dtype(logprobs, old_logprobs, advantages)
    lp, old, adv = masked_inputs(mask, dtype, logprobs, old_logprobs, advantages)
    per_token, ratio, clipped = ppo_per_token(lp, old, adv, clip_low, clip_high, dual_clip)
    return aggregate(per_token, mask, agg), ppo_stats(lp, old, ratio, clipped, mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = 0.2, agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO as in OpenAI baselines / InstructGPT).

    Args:
        values: (B, T) current critic values (differentiable).  old_values: (B, T) values at rollout time.
        returns: (B, T) targets (e.g. from gae).  mask: (B, T) 0/1.
        clip: > 0 or None.  agg: aggregation mode (module docstring).

    Per token 0.5 * max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2); clip=None gives 0.5 * (v - R)^2.

    Returns:
        (loss, stats) with stats "clipfrac" (share of valid tokens where the clipped term was larger).
    """
    _check_per_token("values", values, mask, old_values=old_values, returns=returns)
    agg = _checks.agg(agg)
    dtype = _checks.compute_dtype(values, old_values, returns)
    v, old, ret = masked_inputs(mask, dtype, values, old_values, returns)
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clipfrac = torch.zeros((), dtype=dtype, device=v.device)
    else:
        clip = _checks.positive("clip", clip)
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        clipped = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(dtype), mask)
    return aggregate(per_token, mask, agg), {"clipfrac": clipfrac.detach()}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952; InstructGPT; Llama 2's margin).

    Args:
        chosen_rewards: (P,) scores of the preferred responses.  rejected_rewards: (P,) of the others.
        margin: optional (P,) tensor or a number, the required score gap.

    Returns:
        mean(-log sigmoid(chosen - rejected - margin)), a 0-dim fp32 tensor (float64 for float64 inputs).
    """
    _checks.floating("chosen_rewards", chosen_rewards)
    _checks.floating("rejected_rewards", rejected_rewards)
    _checks.same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards is empty: the Bradley-Terry loss needs at least one pair")
    dtype = _checks.compute_dtype(chosen_rewards, rejected_rewards)
    diff = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            _checks.floating("margin", margin)
            _checks.same_shape("chosen_rewards", chosen_rewards, margin=margin)
            diff = diff - margin.to(dtype)
        else:
            diff = diff - float(_as_float("margin", margin))
    return -F.logsigmoid(diff).mean()

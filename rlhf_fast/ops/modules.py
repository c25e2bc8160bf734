"""nn.Module forms of the fused losses (as Liger-Kernel's LigerFusedLinearCrossEntropyLoss is of its function).

Each module holds its options (checked in the constructor, shown by repr), no parameters and no buffers, and
its forward is exactly the functional op of rlhf_fast.ops with those options.

    loss_fn = FusedLinearPPOLoss(clip_low=0.2, clip_high=0.28, entropy_coef=0.01)
    loss, stats = loss_fn(hidden, lm_head.weight, targets, old_logprobs, advantages, mask)
    kl = FusedLinearKL()(hidden, ref_hidden, lm_head.weight, mask)  # (B, T) exact KL(pi || pi_ref)
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.ops import _checks, _dispatch
from rlhf_fast.ops.fused_kl import fused_linear_kl
from rlhf_fast.ops.fused_ppo import fused_linear_ppo_loss
from rlhf_fast.ops.logprobs import fused_linear_logprobs
from rlhf_fast.ops.losses import bradley_terry_loss, check_clip, value_loss


def _backend(backend: str | None) -> str | None:
    return None if backend is None else _dispatch.requested_backend(backend)


def _options(module: nn.Module, names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={getattr(module, n)!r}" for n in names)


class FusedLinearLogprobs(nn.Module):
    """Per-token log-probabilities (and entropy) straight from hidden states and the lm_head weight, without
    the (N, V) logits: ops.fused_linear_logprobs as a module.

    Args:
        temperature: > 0; logits are divided by it.  ignore_index: targets equal to it give 0 and no gradient.
        return_entropy: forward returns (logprobs, entropy).  checks, backend: as in fused_linear_logprobs.

    forward(hidden (..., H), weight (V, H), targets (...) int64, bias (V,) | None = None)
        -> logprobs (...) fp32, or (logprobs, entropy) each (...) fp32; differentiable in hidden, weight, bias.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 checks: bool | None = None, backend: str | None = None):
        super().__init__()
        self.temperature = _checks.positive("temperature", temperature)
        self.ignore_index = ignore_index
        self.return_entropy = bool(return_entropy)
        self.checks = checks
        self.backend = _backend(backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None):
        return fused_linear_logprobs(hidden, weight, targets, bias, temperature=self.temperature,
                                     ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                                     checks=self.checks, backend=self.backend)

    def extra_repr(self) -> str:
        return _options(self, ("temperature", "ignore_index", "return_entropy", "checks", "backend"))


class FusedLinearPPOLoss(nn.Module):
    """The PPO policy loss straight from hidden states and the lm_head weight (clipped surrogate, optional
    in-loss KL and entropy terms, aggregation): ops.fused_linear_ppo_loss as a module.

    Args (as in fused_linear_ppo_loss): clip_low, clip_high (DAPO's clip-higher; None: clip_low), dual_clip
    (c > 1 or None), entropy_coef, kl_coef (>= 0; needs ref_logprobs in forward when > 0), kl_estimator
    ("k1" | "k2" | "k3" | "abs"), temperature (> 0), ratio_level ("token" | "sequence": GSPO's sequence
    ratio), agg ("token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"),
    ignore_index, checks, backend.

    forward(hidden (B, T, H), weight (V, H), targets (B, T) int64, old_logprobs (B, T), advantages (B, T) | (B,),
            mask (B, T) 0/1, bias (V,) | None = None, ref_logprobs (B, T) | None = None)
        -> (loss 0-dim fp32, stats dict of detached 0-dim tensors: clipfrac, approx_kl, ratio, entropy[, kl]).
    """

    def __init__(self, *, clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                 entropy_coef: float = 0.0, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 temperature: float = 1.0, ratio_level: str = "token", agg: str = "token-mean",
                 ignore_index: int = -100, checks: bool | None = None, backend: str | None = None):
        super().__init__()
        check_clip(clip_low, clip_high, dual_clip)
        _checks.estimator(kl_estimator)
        for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.entropy_coef, self.kl_coef, self.kl_estimator = entropy_coef, kl_coef, kl_estimator
        self.temperature = _checks.positive("temperature", temperature)
        self.ratio_level = _checks.ratio_level(ratio_level)
        self.agg = _checks.agg(agg)
        self.ignore_index, self.checks, self.backend = ignore_index, checks, _backend(backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_ppo_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, bias, ref_logprobs=ref_logprobs,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
            clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
            temperature=self.temperature, ratio_level=self.ratio_level, agg=self.agg,
            ignore_index=self.ignore_index, checks=self.checks, backend=self.backend)

    def extra_repr(self) -> str:
        return _options(self, ("clip_low", "clip_high", "dual_clip", "entropy_coef", "kl_coef", "kl_estimator",
                               "temperature", "ratio_level", "agg", "ignore_index", "checks", "backend"))


class FusedLinearKL(nn.Module):
    """The exact per-token KL(pi || pi_ref) over the whole vocabulary from the policy's and the reference's
    hidden states through one shared lm_head, without the (B, T, V) logits: ops.fused_linear_kl as a module.

    Args: temperature (> 0; both logits are divided by it), checks, backend (as in fused_linear_kl).

    forward(hidden (B, T, H), ref_hidden (B, T, H), weight (V, H), mask (B, T) 0/1, bias (V,) | None = None)
        -> (B, T) fp32 KL, 0 where mask is 0; differentiable in hidden, weight and bias through the policy side
        only (ref_hidden and the reference's logits are constants).
    """

    def __init__(self, *, temperature: float = 1.0, checks: bool | None = None, backend: str | None = None):
        super().__init__()
        self.temperature = _checks.positive("temperature", temperature)
        self.checks = checks
        self.backend = _backend(backend)

    def forward(self, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_kl(hidden, ref_hidden, weight, mask, bias, temperature=self.temperature,
                               checks=self.checks, backend=self.backend)

    def extra_repr(self) -> str:
        return _options(self, ("temperature", "checks", "backend"))


class ValueLoss(nn.Module):
    """The clipped value loss (PPO as in OpenAI baselines / InstructGPT): ops.value_loss as a module.

    Args: clip (> 0, or None for the plain squared error), agg (aggregation mode).

    forward(values (B, T), old_values (B, T), returns (B, T), mask (B, T) 0/1)
        -> (loss 0-dim fp32, {"clipfrac": detached 0-dim}); differentiable in values.
    """

    def __init__(self, *, clip: float | None = 0.2, agg: str = "token-mean"):
        super().__init__()
        self.clip = None if clip is None else _checks.positive("clip", clip)
        self.agg = _checks.agg(agg)

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return value_loss(values, old_values, returns, mask, clip=self.clip, agg=self.agg)

    def extra_repr(self) -> str:
        return _options(self, ("clip", "agg"))


class BradleyTerryLoss(nn.Module):
    """The pairwise reward-model loss mean(-log sigmoid(chosen - rejected - margin)) (Bradley & Terry 1952;
    InstructGPT; Llama 2's margin): ops.bradley_terry_loss as a module.

    Args: margin: a fixed score gap (number) or None.

    forward(chosen_rewards (P,), rejected_rewards (P,), margin (P,) tensor | number | None = None)
        -> 0-dim loss (fp32; float64 for float64 inputs). A margin given to forward replaces the module's.
    """

    def __init__(self, *, margin: float | None = None):
        super().__init__()
        if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool)):
            raise TypeError(f"margin must be a number or None, got {type(margin).__name__}")
        self.margin = None if margin is None else float(margin)

    def forward(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                margin: torch.Tensor | float | None = None) -> torch.Tensor:
        return bradley_terry_loss(chosen_rewards, rejected_rewards, margin=self.margin if margin is None else margin)

    def extra_repr(self) -> str:
        return _options(self, ("margin",))

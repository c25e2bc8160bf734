"""nn.Module forms of the fused losses and of the preference losses (as Liger-Kernel's
LigerFusedLinearCrossEntropyLoss is of its function).

Each module holds its options (checked in the constructor, shown by repr), no parameters and no buffers, and
its forward is exactly the functional op of rlhf_fast.ops with those options.

    loss_fn = FusedLinearPPOLoss(clip_low=0.2, clip_high=0.28, entropy_coef=0.01)
    loss, stats = loss_fn(hidden, lm_head.weight, targets, old_logprobs, advantages, mask)
    kl = FusedLinearKL()(hidden, ref_hidden, lm_head.weight, mask)  # (B, T) exact KL(pi || pi_ref)
    loss, stats = DPOLoss(beta=0.1, loss_type="sigmoid")(chosen_logps, rejected_logps, ref_chosen, ref_rejected)
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.ops import _checks, _dispatch
from rlhf_fast.ops.fused_kl import fused_linear_kl
from rlhf_fast.ops.fused_ppo import fused_linear_ppo_loss
from rlhf_fast.ops.logprobs import fused_linear_logprobs
from rlhf_fast.ops.losses import bradley_terry_loss, check_clip, value_loss
from rlhf_fast.ops.preference import (
    check_beta,
    check_finite,
    check_label_smoothing,
    check_loss_type,
    check_weight,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


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


class DPOLoss(nn.Module):
    """Direct Preference Optimization and its variants (sigmoid / cDPO, hinge, IPO, robust): ops.dpo_loss as a
    module.

    Args: beta (finite > 0), loss_type ("sigmoid" | "hinge" | "ipo" | "robust"), label_smoothing (in [0, 1];
    [0, 0.5) for "robust").

    forward(chosen_logps (B,), rejected_logps (B,), ref_chosen_logps (B,), ref_rejected_logps (B,))
        -> (loss 0-dim fp32, stats: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
    """

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        super().__init__()
        self.beta = check_beta(beta)
        self.loss_type = check_loss_type(loss_type)
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_type)

    def forward(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                ref_rejected_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "loss_type", "label_smoothing"))


class SimPOLoss(nn.Module):
    """Simple Preference Optimization (reference-free, length-normalised, margin gamma): ops.simpo_loss as a
    module.

    Args: beta (finite > 0), gamma (finite), label_smoothing (in [0, 1]).

    forward(chosen_logps (B,), rejected_logps (B,)), both averaged over tokens
        -> (loss 0-dim fp32, stats: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
    """

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = check_beta(beta)
        self.gamma = check_finite("gamma", gamma)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def forward(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return simpo_loss(chosen_logps, rejected_logps, beta=self.beta, gamma=self.gamma,
                          label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "gamma", "label_smoothing"))


class ORPOLoss(nn.Module):
    """Odds Ratio Preference Optimization (chosen NLL + odds-ratio penalty): ops.orpo_loss as a module.

    Args: beta (finite > 0, the odds-ratio weight), checks (log-probs < 0; None: on unless RLHF_FAST_CHECKS=0).

    forward(chosen_logps (B,), rejected_logps (B,), chosen_nll (B,)), log-probs averaged over tokens
        -> (loss 0-dim fp32, stats: rewards/*, log_odds_ratio, log_odds_chosen, nll_loss).
    """

    def __init__(self, *, beta: float = 0.1, checks: bool | None = None):
        super().__init__()
        self.beta = check_beta(beta)
        self.checks = checks

    def forward(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return orpo_loss(chosen_logps, rejected_logps, chosen_nll, beta=self.beta, checks=self.checks)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "checks"))


class KTOLoss(nn.Module):
    """Kahneman-Tversky Optimization on unpaired desirable / undesirable examples: ops.kto_loss as a module.

    Args: beta (finite > 0), desirable_weight, undesirable_weight (finite >= 0).

    forward(policy_logps (B,), ref_logps (B,), desirable (B,) bool, kl 0-dim (detached batch KL estimate))
        -> (loss 0-dim fp32, stats: rewards/chosen, rewards/rejected, kl).
    """

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__()
        self.beta = check_beta(beta)
        self.desirable_weight = check_weight("desirable_weight", desirable_weight)
        self.undesirable_weight = check_weight("undesirable_weight", undesirable_weight)

    def forward(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return kto_loss(policy_logps, ref_logps, desirable, kl, beta=self.beta,
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "desirable_weight", "undesirable_weight"))

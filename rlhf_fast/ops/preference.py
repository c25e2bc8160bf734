"""Offline preference-optimisation losses on per-sequence log-probs: DPO (and its cDPO, hinge, IPO and robust
variants), SimPO, ORPO and KTO.

Every loss takes (B,) tensors, one entry per example (or per pair), computes in fp32 (float64 when an input is
float64; bf16/fp16 inputs are upcast), is differentiable in every log-prob input, and returns
(loss, stats): loss a 0-dim tensor (the mean over the batch), stats a dict of detached 0-dim tensors under
TRL's metric names ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", ...).
No host synchronisation: the only data-reading check (ORPO's log-probs < 0) can be switched off with
checks=False or RLHF_FAST_CHECKS=0 and is always off inside torch.compile'd code.

Below, logsigmoid(z) = -log(1 + exp(-z)), written with torch.nn.functional.logsigmoid (finite for any finite z).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_fast.ops import _checks
from rlhf_fast.ops._dispatch import checks_enabled

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


# ---------------------------------------------------------------- option and input checks


def _number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_beta(beta) -> float:
    """beta must be a finite number > 0 (it divides in IPO and scales every reward)."""
    value = _number("beta", beta)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return value


def check_label_smoothing(label_smoothing, loss_type: str = "sigmoid") -> float:
    """label_smoothing e in [0, 1]; in [0, 0.5) for robust DPO, which divides by 1 - 2e."""
    value = _number("label_smoothing", label_smoothing)
    if loss_type == "robust":
        if not 0.0 <= value < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust' (the loss divides by "
                             f"1 - 2 * label_smoothing), got {label_smoothing!r}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return value


def check_loss_type(loss_type) -> str:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    return loss_type


def check_finite(name: str, value) -> float:
    value_f = _number(name, value)
    if not math.isfinite(value_f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value_f


def check_weight(name: str, value) -> float:
    value_f = _number(name, value)
    if not (math.isfinite(value_f) and value_f >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value_f


def _check_batch(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> torch.dtype:
    """Floating (B,) tensors of one shape, B >= 1, on one device; returns the compute dtype."""
    for name, x in {ref_name: ref, **others}.items():
        _checks.floating(name, x)
    if ref.dim() != 1:
        raise ValueError(f"{ref_name} must be 1-D (B,), got shape {tuple(ref.shape)}")
    _checks.same_shape(ref_name, ref, **others)
    if ref.shape[0] == 0:
        raise ValueError(f"{ref_name} is empty (B=0): the loss is a mean over at least one example")
    _checks.same_device(**{ref_name: ref}, **others)
    return _checks.compute_dtype(ref, *others.values())


def _negative(name: str, x: torch.Tensor, checks: bool | None) -> None:
    """Reads data (a host sync): on by default, off with checks=False or RLHF_FAST_CHECKS=0, and always off
    inside torch.compile'd code (as _checks.targets_in_range)."""
    if torch.compiler.is_compiling() or not checks_enabled(checks):
        return
    bad = x >= 0
    if bool(bad.any()):
        raise ValueError(f"{name} must be < 0 (length-averaged log-probs of completions with probability < 1); "
                         f"found {x[bad][0].item()} ({int(bad.sum())} entries >= 0)")


def _reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics from the per-example implicit rewards (B,)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
    }


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO: the label is flipped with probability e. The e-term is kept even at e = 0 (0 * a finite
    # number) so that the graph does not depend on the value of e.
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# ---------------------------------------------------------------- DPO


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023) and its variants, as TRL's DPOTrainer names them.

    Args:
        chosen_logps: (B,) float, log pi(y_w | x) of the chosen completions (summed over tokens; for "ipo",
            averaged over tokens, as in the IPO paper).
        rejected_logps: (B,) float, log pi(y_l | x) of the rejected completions, same convention.
        ref_chosen_logps, ref_rejected_logps: (B,) float, the same under the reference policy. All four are
            differentiable (usually only the first two require grad).
        beta: finite > 0, the KL strength (IPO's tau).
        loss_type: "sigmoid" | "hinge" | "ipo" | "robust".
        label_smoothing: e, in [0, 1] ([0, 0.5) for "robust"); used by "sigmoid" and "robust".

    With h = (chosen - ref_chosen) - (rejected - ref_rejected) and z = beta * h, the loss is the batch mean of
        "sigmoid": -(1 - e) logsigmoid(z) - e logsigmoid(-z)   (DPO; with e > 0 conservative DPO, Mitchell 2023)
        "hinge":   relu(1 - z)                                 (SLiC, Zhao et al. 2023)
        "ipo":     (h - 1 / (2 beta))^2                        (IPO, Azar et al. 2023, eq. 17)
        "robust":  (-(1 - e) logsigmoid(z) + e logsigmoid(-z)) / (1 - 2e)   (rDPO, Chowdhury et al. 2024)
    Note: TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid" (older TRL applied it as here); with
    e = 0 the two agree.

    Returns:
        (loss, stats): loss 0-dim fp32 (float64 for float64 inputs); stats detached 0-dim tensors with the
        implicit rewards r_w = beta (chosen - ref_chosen), r_l = beta (rejected - ref_rejected):
        "rewards/chosen" = mean(r_w), "rewards/rejected" = mean(r_l), "rewards/margins" = mean(r_w - r_l),
        "rewards/accuracies" = mean(r_w > r_l) (TRL's DPOTrainer metrics).
    """
    dtype = _check_batch("chosen_logps", chosen_logps, rejected_logps=rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = check_beta(beta)
    loss_type = check_loss_type(loss_type)
    e = check_label_smoothing(label_smoothing, loss_type)
    chosen_logratios = chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)  # (B,)
    rejected_logratios = rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    z = beta * h
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(z, e)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        losses = (-(1.0 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1.0 - 2.0 * e)
    return losses.mean(), _reward_stats(beta * chosen_logratios, beta * rejected_logratios)


# ---------------------------------------------------------------- SimPO


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simple Preference Optimization (Meng et al. 2024): reference-free, length-normalised, with a margin.

    Args:
        chosen_logps, rejected_logps: (B,) float, log-probs of the chosen / rejected completions averaged over
            their tokens (the paper's length normalisation is the caller's). Differentiable.
        beta: finite > 0, the reward scale.  gamma: finite, the target reward margin (TRL's simpo_gamma).
        label_smoothing: e in [0, 1], as in conservative DPO (TRL's CPOTrainer applies it the same way).

    z = beta (chosen - rejected) - gamma; loss = mean(-(1 - e) logsigmoid(z) - e logsigmoid(-z)).

    Returns:
        (loss, stats): loss 0-dim fp32 (float64 for float64 inputs); stats (TRL's CPO/SimPO convention, rewards
        r_w = beta chosen, r_l = beta rejected) "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies" as in dpo_loss.
    """
    dtype = _check_batch("chosen_logps", chosen_logps, rejected_logps=rejected_logps)
    beta = check_beta(beta)
    gamma = check_finite("gamma", gamma)
    e = check_label_smoothing(label_smoothing)
    c, r = chosen_logps.to(dtype), rejected_logps.to(dtype)
    z = beta * (c - r) - gamma  # (B,)
    return _smoothed_sigmoid(z, e).mean(), _reward_stats(beta * c, beta * r)


# ---------------------------------------------------------------- ORPO


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, *,
              beta: float = 0.1, checks: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Odds Ratio Preference Optimization (Hong et al. 2024): SFT on the chosen completion plus an odds-ratio
    penalty, no reference model.

    Args:
        chosen_logps, rejected_logps: (B,) float, log-probs averaged over the completion's tokens, each < 0.
        chosen_nll: (B,) float, the SFT negative log-likelihood of each chosen completion. All differentiable.
        beta: finite > 0, the weight of the odds-ratio term (the paper's lambda; TRL's beta).
        checks: verify that the log-probs are < 0 (reads data: a host sync). None: on unless
            RLHF_FAST_CHECKS=0; always off under torch.compile.

    log odds(p) = log p - log(1 - p) with log p = x and log(1 - p) = log(-expm1(x)) (stable for x near 0 and
    for x << 0); log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r)) (paper eqs. 4 and 7);
    loss = mean(chosen_nll) - beta mean(logsigmoid(log_odds)).

    Returns:
        (loss, stats): loss 0-dim fp32 (float64 for float64 inputs); stats "rewards/chosen" = mean(beta c),
        "rewards/rejected" = mean(beta r), "rewards/margins", "rewards/accuracies" (as in dpo_loss),
        "log_odds_ratio" = mean(logsigmoid(log_odds)), "log_odds_chosen" = mean(log_odds),
        "nll_loss" = mean(chosen_nll) (TRL's ORPOTrainer metrics).
    """
    dtype = _check_batch("chosen_logps", chosen_logps, rejected_logps=rejected_logps, chosen_nll=chosen_nll)
    beta = check_beta(beta)
    _negative("chosen_logps", chosen_logps, checks)
    _negative("rejected_logps", rejected_logps, checks)
    c, r, nll = chosen_logps.to(dtype), rejected_logps.to(dtype), chosen_nll.to(dtype)
    log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    nll_loss = nll.mean()
    stats = _reward_stats(beta * c, beta * r)
    stats["log_odds_ratio"] = ratio.detach().mean()
    stats["log_odds_chosen"] = log_odds.detach().mean()
    stats["nll_loss"] = nll_loss.detach()
    return nll_loss - beta * ratio.mean(), stats


# ---------------------------------------------------------------- KTO


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024): unpaired examples labelled desirable or not.

    Args:
        policy_logps, ref_logps: (B,) float, log-probs of each completion under the policy and the reference
            (summed over tokens). policy_logps (and ref_logps) differentiable.
        desirable: (B,) bool, True for a desirable example.
        kl: 0-dim float tensor, the batch estimate of KL(pi || pi_ref) (TRL: the mean of policy - ref log-probs
            on mismatched prompt/completion pairs). A constant: it is detached, no gradient flows to it.
        beta: finite > 0.  desirable_weight, undesirable_weight: finite >= 0 (lambda_D, lambda_U).

    r = policy - ref, z0 = max(kl, 0); per example
        desirable:   desirable_weight * (1 - sigmoid(beta (r - z0)))
        undesirable: undesirable_weight * (1 - sigmoid(beta (z0 - r)))
    (computed as sigmoid(-x), which equals 1 - sigmoid(x) without its cancellation); loss = mean over the batch.

    Returns:
        (loss, stats): loss 0-dim fp32 (float64 for float64 inputs); stats "rewards/chosen" = mean of beta r over
        the desirable examples (0 when there is none), "rewards/rejected" the same over the undesirable ones,
        "kl" = z0.
    """
    _check_batch("policy_logps", policy_logps, ref_logps=ref_logps)
    _checks.tensor("desirable", desirable)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    _checks.same_shape("policy_logps", policy_logps, desirable=desirable)
    _checks.floating("kl", kl)
    if kl.dim() != 0:
        raise ValueError(f"kl must be a 0-dim tensor (the batch KL estimate), got shape {tuple(kl.shape)}")
    _checks.same_device(policy_logps=policy_logps, desirable=desirable, kl=kl)
    beta = check_beta(beta)
    desirable_weight = check_weight("desirable_weight", desirable_weight)
    undesirable_weight = check_weight("undesirable_weight", undesirable_weight)
    dtype = _checks.compute_dtype(policy_logps, ref_logps, kl)
    logratios = policy_logps.to(dtype) - ref_logps.to(dtype)  # (B,)
    z0 = kl.detach().to(dtype).clamp(min=0.0)
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,)
    rewards = beta * logratios.detach()
    undesirable = ~desirable
    stats = {
        "rewards/chosen": torch.where(desirable, rewards, 0.0).sum() / desirable.sum().clamp(min=1),
        "rewards/rejected": torch.where(undesirable, rewards, 0.0).sum() / undesirable.sum().clamp(min=1),
        "kl": z0,
    }
    return losses.mean(), stats

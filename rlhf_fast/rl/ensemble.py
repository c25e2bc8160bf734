"""Reward-model ensembles: K reward members on one base (RoleModel.ensemble_scores) -> one reward per sequence.

Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743): optimising the
ensemble's mean, its minimum (worst-case optimisation, WCO) or a mean penalised by the members' disagreement
(uncertainty-weighted optimisation, UWO) delays the collapse of the gold reward that a single proxy reward
model shows under RL. Their UWO penalises the across-member variance; `mean_minus_std` penalises the standard
deviation (the same units as the reward, so `penalty` does not depend on the reward's scale) and
`mean_minus_var` is their UWO as written.
"""

from __future__ import annotations

import warnings

import torch

from rlhf_fast.errors import ConfigError

REDUCTIONS = ("mean", "min", "mean_minus_std", "mean_minus_var")


def reduce_ensemble(scores: torch.Tensor, reduce: str = "mean_minus_std", penalty: float = 1.0) -> torch.Tensor:
    """One reward per sequence from K members' scores.

    Args:
        scores: (K, B) float, member k's score of sequence b (K >= 1).
        reduce: "mean": mean_k s_k; "min": min_k s_k (WCO); "mean_minus_std": mean_k s_k - penalty * std_k s_k;
            "mean_minus_var": mean_k s_k - penalty * var_k s_k (UWO, Coste et al. 2023). std and var are
            the population ones (divide by K), so one member gives std = var = 0 and every mode is its score.
        penalty: lambda >= 0, the weight of the disagreement term (ignored by mean and min).
    Returns:
        (B,) fp32.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be a (K, B) tensor with K >= 1, got {getattr(scores, 'shape', scores)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    s = scores.float()
    if reduce == "min":
        return s.min(0).values
    mean = s.mean(0)
    if reduce == "mean":
        return mean
    var = s.var(0, unbiased=False)
    return mean - penalty * (var.sqrt() if reduce == "mean_minus_std" else var)


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """(K, B) -> (B,) fp32: the population std across members, logged as rewards/ensemble_std."""
    return scores.float().std(0, unbiased=False)


class EnsembleReward:
    """The reward of a RoleModel's reward ensemble: reduce_ensemble(model.ensemble_scores(...)), remembering the
    across-member std of what it scored since the last `pop_std()` (for the rewards/ensemble_std metric).

    Usage: reward = EnsembleReward(model, "mean_minus_std", 1.0); r = reward(sequences, attention_mask)  # (B,)
    """

    def __init__(self, model, reduce: str = "mean_minus_std", penalty: float = 1.0):
        reduce_ensemble(torch.zeros(1, 1), reduce, penalty)  # checks the options now, not at the first batch
        self.model, self.reduce, self.penalty = model, reduce, penalty
        self._stds: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.model.ensemble_scores(sequences, attention_mask)  # (K, B)
        self._stds.append(ensemble_std(scores))
        return reduce_ensemble(scores, self.reduce, self.penalty)

    def pop_std(self) -> float:
        """Mean over the scored sequences of the across-member std since the last call (0.0 when none)."""
        stds, self._stds = self._stds, []
        return float(torch.cat(stds).mean()) if stds else 0.0


def check_options(reduce: str | None, penalty: float | None, *, has_reward_model: bool) -> None:
    """ConfigError (exit code 2 on the command line) for ensemble options that cannot apply: an unknown reduce,
    a negative or non-finite penalty, a penalty with mean / min (which take none), or either option without a
    reward model to reduce. None means unset."""
    if reduce is not None and reduce not in REDUCTIONS:
        raise ConfigError(f"ensemble_reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if penalty is not None and not (isinstance(penalty, (int, float)) and 0 <= penalty < float("inf")):
        raise ConfigError(f"ensemble_penalty must be a finite number >= 0, got {penalty!r}")
    if penalty is not None and reduce in ("mean", "min"):
        raise ConfigError(f"ensemble_penalty applies to mean_minus_std and mean_minus_var, not to ensemble_reduce "
                          f"{reduce}: drop one of them")
    if (reduce is not None or penalty is not None) and not has_reward_model:
        raise ConfigError("ensemble_reduce / ensemble_penalty reduce a reward-model ensemble: they need "
                          "--reward_model (a folder written by `rlhf-fast rm --ensemble K`)")


def ensemble_reward(model, reduce: str | None, penalty: float | None) -> EnsembleReward | None:
    """The EnsembleReward of `model`'s K > 1 reward members (unset options: mean_minus_std, penalty 1.0), or None
    for a single reward model, whose score stays the reward exactly as before (every mode would give it back;
    options given anyway are reported in a warning)."""
    if model.reward_members == 1:
        if reduce is not None or penalty is not None:
            warnings.warn("ensemble_reduce / ensemble_penalty are ignored: the reward model has one member "
                          "(train an ensemble with `rlhf-fast rm --ensemble K`)", stacklevel=2)
        return None
    return EnsembleReward(model, "mean_minus_std" if reduce is None else reduce, 1.0 if penalty is None else penalty)

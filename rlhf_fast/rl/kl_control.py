"""KL control for PPO's penalty coefficient beta, and running score moments for reward normalisation."""

from __future__ import annotations

import math

import torch


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 ("Fine-tuning language models from human preferences", section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * min(n_steps / horizon, 1)),
    where KL is the measured mean KL per sequence and n_steps the number of sequences seen.

    The paper's update is beta * (1 + e * n / horizon); with n > 5 x horizon (a short horizon, a large batch)
    its factor goes below 0 and beta turns negative. Capping n / horizon at 1 keeps each step's factor in
    [0.8, 1.2], so beta stays positive whatever the options; within the paper's regime (n <= horizon) the
    update is unchanged. A non-finite KL leaves beta as it is.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        if not (kl_coef > 0 and target > 0 and horizon > 0):
            raise ValueError(f"adaptive KL needs kl_coef, target and horizon > 0, got {kl_coef}, {target}, {horizon}")
        self.value = float(kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * min(n_steps / self.horizon, 1.0)

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std (Chan et al. parallel update) for score normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        bm, bv = float(x.mean()), float(x.var(unbiased=False))
        delta, tot = bm - self.mean, self.count + n
        self.mean += delta * n / tot
        self.var = (self.var * self.count + bv * n + delta**2 * self.count * n / tot) / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]

"""KL controllers: Ziegler et al.'s adaptive update, bounded so beta stays positive."""

from __future__ import annotations

import pytest

from rlhf_fast.rl.kl_control import AdaptiveKLController, FixedKLController


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # KL above target: e = clip(9/6 - 1, -0.2, 0.2) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    v = ctl.value
    ctl.update(5.4, 100)  # below target: e = -0.1
    assert ctl.value == pytest.approx(v * (1 - 0.1 * 100 / 10000))
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


@pytest.mark.parametrize("n_steps", [64, 1000, 10**6])
def test_adaptive_kl_stays_positive_with_a_short_horizon(n_steps):
    """kl_horizon < 0.2 x batch_size drove the unbounded update negative (beta -0.03, then a traceback)."""
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=8)
    for _ in range(50):
        ctl.update(0.0, n_steps)  # far below target: the largest possible decrease each time
        assert ctl.value > 0
    assert ctl.value == pytest.approx(0.05 * 0.8**50)  # the factor is capped at 1 - 0.2
    ctl.update(float("nan"), n_steps)
    assert ctl.value == pytest.approx(0.05 * 0.8**50)


def test_adaptive_kl_rejects_a_zero_coefficient():
    with pytest.raises(ValueError, match="kl_coef"):
        AdaptiveKLController(0.0, target=6.0, horizon=100)

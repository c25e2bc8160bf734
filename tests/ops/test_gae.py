"""gae, kl_penalized_gae and masked_whiten against the reverse loop, on every backend."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.ops.backends import backends_for
from tests.tolerances import assert_close


def _mask(B, T, kind):
    if kind == "full":
        return torch.ones(B, T)
    m = (torch.rand(B, T) > 0.3).float()  # interior holes
    if kind == "holes":
        m[0, 0] = 0  # leading hole
        m[-1, -1] = 0  # trailing hole
        if B > 1:
            m[1] = 0  # an empty row
    return m


@pytest.mark.parametrize("backend", backends_for("gae"))
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (2, 1025)])
@pytest.mark.parametrize("kind", ["full", "holes"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_loop(use_backend, backend, B, T, kind, gamma, lam):
    use_backend(backend)
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = _mask(B, T, kind)
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    r_adv, r_ret = ref.gae_loop(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == (B, T)
    # A long row sums up to T terms: fp32 accumulation error grows with it.
    torch.testing.assert_close(adv.double(), r_adv, rtol=1e-4, atol=1e-4 * (1 + T**0.5))
    torch.testing.assert_close(ret.double(), r_ret, rtol=1e-4, atol=1e-4 * (1 + T**0.5))
    assert (adv[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", backends_for("gae"))
def test_gae_bool_mask_and_bf16(use_backend, backend):
    use_backend(backend)
    rewards, values = torch.randn(2, 9).bfloat16(), torch.randn(2, 9).bfloat16()
    mask = torch.rand(2, 9) > 0.4
    adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    r_adv, r_ret = ref.gae_loop(rewards.double(), values.double(), mask, 0.99, 0.9)
    assert adv.dtype == torch.float32
    assert_close(adv, r_adv, torch.float32)
    assert_close(ret, r_ret, torch.float32)


@pytest.mark.parametrize("backend", backends_for("gae"))
def test_gae_nan_propagates(use_backend, backend):
    use_backend(backend)
    rewards, values, mask = torch.randn(1, 6), torch.randn(1, 6), torch.ones(1, 6)
    rewards[0, 3] = float("nan")
    adv, _ = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.isnan(adv[0, :4]).all() and torch.isfinite(adv[0, 4:]).all()


def test_gae_float64_is_exact():
    rewards, values = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    mask = _mask(3, 40, "holes")
    adv, ret = ops.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    r_adv, r_ret = ref.gae_loop(rewards, values, mask, 0.97, 0.9)
    assert_close(adv, r_adv)
    assert_close(ret, r_ret)


@pytest.mark.parametrize("backend", backends_for("kl_penalized_gae"))
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 17)])
def test_kl_penalized_gae_matches_reference(use_backend, backend, estimator, B, T):
    use_backend(backend)
    lp, rlp = -torch.rand(B, T) * 3, -torch.rand(B, T) * 3
    values, scores = torch.randn(B, T), torch.randn(B)
    mask = _mask(B, T, "holes")
    adv, ret, rewards = ops.kl_penalized_gae(lp, rlp, values, scores, mask, kl_coef=0.1, gamma=0.95, lam=0.9,
                                             estimator=estimator)
    r_rewards = ref.kl_rewards(lp, rlp, scores, mask, 0.1, estimator)
    r_adv, r_ret = ref.gae_loop(r_rewards, values, mask, 0.95, 0.9)
    assert_close(rewards, r_rewards, torch.float32)
    assert_close(adv, r_adv, torch.float32)
    assert_close(ret, r_ret, torch.float32)
    empty = mask.sum(1) == 0
    assert (rewards[empty] == 0).all() and (adv[empty] == 0).all() and (ret[empty] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x, mask = torch.randn(3, 11) * 4 + 2, _mask(3, 11, "holes")
    out = ops.masked_whiten(x, mask, shift_mean=shift_mean)
    v = x[mask != 0].double()
    expected = (v - v.mean()) / torch.sqrt(v.var(unbiased=True) + 1e-8) + (0 if shift_mean else v.mean())
    assert_close(out[mask != 0], expected, torch.float32)
    assert (out[mask == 0] == 0).all()
    assert (ops.masked_whiten(x, torch.zeros(3, 11)) == 0).all()


@pytest.mark.parametrize("backend", backends_for("kl_penalized_gae"))
def test_nan_at_masked_positions_does_not_leak(use_backend, backend):
    """Skipped positions never enter: garbage (NaN) there leaves every output finite and 0 at those places."""
    use_backend(backend)
    lp, rlp, values = -torch.rand(2, 9), -torch.rand(2, 9), torch.randn(2, 9)
    mask = torch.ones(2, 9)
    mask[0, [2, 8]] = 0
    mask[1, 0] = 0
    for x in (lp, rlp, values):
        x[mask == 0] = float("nan")
    adv, ret, rewards = ops.kl_penalized_gae(lp, rlp, values, torch.randn(2), mask, kl_coef=0.1, gamma=0.9, lam=0.8)
    for out in (adv, ret, rewards):
        assert torch.isfinite(out).all() and (out[mask == 0] == 0).all()

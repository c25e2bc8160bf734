"""kl_penalty, ppo_policy_loss, value_loss, bradley_terry_loss and aggregation against the references."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.tolerances import assert_close

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def _mask(B, T):
    m = (torch.rand(B, T) > 0.3).float()
    m[0, :2] = 0
    if B > 2:
        m[2] = 0  # a row with no valid token
    return m


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_kl_penalty(estimator, dtype):
    lp, rlp = (-torch.rand(3, 17) * 3).to(dtype), (-torch.rand(3, 17) * 3).to(dtype)
    out = ops.kl_penalty(lp, rlp, estimator)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref.kl(lp, rlp, estimator), torch.float32 if dtype != torch.float64 else dtype)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_high,dual_clip", [(None, None), (0.28, None), (None, 3.0)])
def test_ppo_policy_loss(agg, clip_high, dual_clip):
    B, T = 4, 17
    lp = (-torch.rand(B, T) * 2).double().requires_grad_(True)
    old = lp.detach() + 0.4 * torch.randn(B, T).double()  # ratios well outside [0.8, 1.2] too
    adv = torch.randn(B, T).double() * 2
    mask = _mask(B, T)
    loss, stats = ops.ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip,
                                      agg=agg)
    expected = ref.aggregate(ref.ppo_token_loss(lp, old, adv, 0.2, clip_high, dual_clip), mask, agg)
    assert_close(loss, expected)
    g = torch.autograd.grad(loss, lp)[0]
    r = torch.autograd.grad(expected, lp)[0]
    assert_close(g, r)
    assert set(stats) >= {"clipfrac", "approx_kl"}
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())
    assert 0 < stats["clipfrac"] < 1
    d = (lp - old)[mask != 0]
    assert_close(stats["approx_kl"], (0.5 * d * d).mean())


def test_ppo_policy_loss_gradcheck():
    lp = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + 0.05 * torch.randn(2, 5, dtype=torch.float64)
    adv, mask = torch.randn(2, 5, dtype=torch.float64), torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0.]])
    for agg in AGGS:
        assert torch.autograd.gradcheck(lambda x, a=agg: ops.ppo_policy_loss(x, old, adv, mask, agg=a)[0], (lp,))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss(agg, clip):
    B, T = 3, 17
    v = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old, ret = v.detach() + 0.5 * torch.randn(B, T).double(), torch.randn(B, T).double()
    mask = _mask(B, T)
    loss, stats = ops.value_loss(v, old, ret, mask, clip=clip, agg=agg)
    expected = ref.aggregate(ref.value_token_loss(v, old, ret, clip), mask, agg)
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, v)[0], torch.autograd.grad(expected, v)[0])
    assert "clipfrac" in stats
    if clip is not None:
        assert 0 < stats["clipfrac"] < 1


@pytest.mark.parametrize("agg", AGGS)
def test_all_zero_mask_gives_zero_loss_and_gradients(agg):
    lp = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4)
    old = torch.full((2, 4), float("nan"))  # padding garbage must not leak through masked positions
    loss, stats = ops.ppo_policy_loss(lp, old, torch.randn(2, 4), mask, agg=agg)
    assert loss.item() == 0.0 and torch.isfinite(stats["clipfrac"])
    assert (torch.autograd.grad(loss, lp)[0] == 0).all()
    v = torch.randn(2, 4, requires_grad=True)
    vloss, _ = ops.value_loss(v, torch.randn(2, 4), torch.randn(2, 4), mask, agg=agg)
    assert vloss.item() == 0.0 and (torch.autograd.grad(vloss, v)[0] == 0).all()


def test_nan_in_valid_position_comes_out_nan():
    lp = torch.randn(1, 4)
    adv = torch.randn(1, 4)
    adv[0, 1] = float("nan")
    loss, _ = ops.ppo_policy_loss(lp, lp, adv, torch.ones(1, 4))
    assert torch.isnan(loss)


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
def test_bradley_terry_loss(margin):
    c = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, dtype=torch.float64)
    m = torch.rand(7, dtype=torch.float64) if margin == "tensor" else margin
    loss = ops.bradley_terry_loss(c, r, margin=m)
    diff = c - r - (0 if m is None else m)
    expected = torch.log1p(torch.exp(-diff)).mean()
    assert_close(loss, expected)
    assert torch.autograd.gradcheck(lambda x: ops.bradley_terry_loss(x, r, margin=m), (c,))

"""fused_linear_ppo_loss: value and gradients against the float64 unfused composition, every backend."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.ops.backends import backends_for
from tests.tolerances import assert_close

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def _case(B, T, H, V, dtype, bias):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = (0.1 * torch.randn(V)).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T))
    with torch.no_grad():
        lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, b)
    old = (lp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()  # ratios inside and outside the clip
    ref_lp = (lp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    adv = torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.25).float()
    if T > 3:
        targets[0, 3] = -100
    return hidden, weight, b, targets, old, ref_lp, adv, mask


def _reference_loss(hidden, weight, b, targets, old, adv, mask, ref_lp, *, kl_coef, kl_estimator, entropy_coef,
                    clip_low, clip_high, dual_clip, temperature, agg):
    lp, ent = ref.linear_logprobs_entropy(hidden, weight, targets, b, temperature)
    l = ref.ppo_token_loss(lp, old, adv, clip_low, clip_high, dual_clip)
    if ref_lp is not None:
        l = l + kl_coef * ref.kl(lp, ref_lp, kl_estimator)
    l = l - entropy_coef * ent
    return ref.aggregate(l, mask * (targets != -100), agg)


CONFIGS = [
    dict(kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
         temperature=1.0),
    dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
         temperature=0.7),
    dict(kl_coef=0.05, kl_estimator="k1", entropy_coef=0.0, clip_low=0.1, clip_high=None, dual_clip=None,
         temperature=1.0),
    dict(kl_coef=0.05, kl_estimator="k2", entropy_coef=0.02, clip_low=0.2, clip_high=None, dual_clip=None,
         temperature=1.0),
    dict(kl_coef=0.05, kl_estimator="abs", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=1.5,
         temperature=1.0),
]


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("agg", AGGS)
def test_fused_ppo_matches_unfused_fp32(use_backend, backend, cfg, agg):
    use_backend(backend)
    kw = CONFIGS[cfg]
    hidden, weight, b, targets, old, ref_lp, adv, mask = _case(2, 17, 16, 37, torch.float32, bias=cfg % 2 == 1)
    params = [p.requires_grad_(True) for p in (hidden, weight, b) if p is not None]
    use_ref = kw["kl_coef"] > 0
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, b,
                                            ref_logprobs=ref_lp if use_ref else None, agg=agg, **kw)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = _reference_loss(leaves[0], leaves[1], leaves[2] if b is not None else None, targets, old, adv,
                               mask, ref_lp if use_ref else None, agg=agg, **kw)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32)
    grads = torch.autograd.grad(loss * 1.7, params)  # the backward scales by the incoming gradient
    r_grads = torch.autograd.grad(expected * 1.7, leaves)
    for g, r in zip(grads, r_grads):
        assert_close(g, r, torch.float32)
    assert {"clipfrac", "approx_kl", "entropy"} <= set(stats)
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_ppo_low_precision(use_backend, backend, dtype):
    use_backend(backend)
    kw = CONFIGS[1]
    hidden, weight, b, targets, old, ref_lp, adv, mask = _case(2, 9, 16, 301, dtype, bias=False)
    params = [hidden.requires_grad_(True), weight.requires_grad_(True)]
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, ref_logprobs=ref_lp, **kw)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = _reference_loss(leaves[0], leaves[1], None, targets, old, adv, mask, ref_lp, agg="token-mean", **kw)
    assert_close(loss, expected, dtype)
    for g, r, p in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, leaves), params):
        assert g.dtype == p.dtype
        scale = r.abs().max().clamp(min=1e-3)
        assert_close(g / scale, r / scale, dtype)


def test_fused_ppo_gradcheck():
    torch.manual_seed(3)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [4, -100, 6]])
    old, adv = -torch.rand(2, 3, dtype=torch.float64) - 1.5, torch.randn(2, 3, dtype=torch.float64)
    ref_lp, mask = -torch.rand(2, 3, dtype=torch.float64) - 1.5, torch.tensor([[1, 1, 0], [1, 1, 1.]])

    def f(h, w, b):
        return ops.fused_linear_ppo_loss(h, w, targets, old, adv, mask, b, ref_logprobs=ref_lp, kl_coef=0.1,
                                         entropy_coef=0.05, clip_low=10.0, temperature=0.9)[0]

    # clip_low=10 keeps every ratio inside the clip range: gradcheck needs a locally smooth function.
    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
def test_fused_ppo_all_zero_mask(use_backend, backend):
    use_backend(backend)
    hidden, weight, _, targets, old, _, adv, _ = _case(2, 5, 16, 37, torch.float32, bias=False)
    hidden.requires_grad_(True)
    old[:] = float("nan")
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, torch.zeros(2, 5))
    assert loss.item() == 0.0
    assert (torch.autograd.grad(loss, hidden)[0] == 0).all()
    assert torch.isfinite(stats["clipfrac"])


def test_fused_ppo_without_grad_needs_no_backward():
    hidden, weight, _, targets, old, _, adv, mask = _case(1, 4, 16, 37, torch.float32, bias=False)
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask)
    assert not loss.requires_grad and torch.isfinite(loss)

"""nn.Module wrappers of the fused losses: real modules (no state, options in repr), equal to the functional ops."""

import pytest
import torch
from torch import nn

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.tolerances import assert_close


def _linear(B=2, T=5, H=8, V=13):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    bias = (0.1 * torch.randn(V)).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    targets[0, 2] = -100
    return hidden, weight, bias, targets


def _same(a, b):
    assert torch.equal(a, b), (a, b)


def _is_stateless_module(m, *options):
    assert isinstance(m, nn.Module)
    assert m.state_dict() == {} and list(m.parameters()) == [] and list(m.buffers()) == []
    text = repr(m)
    assert text.startswith(type(m).__name__ + "(")
    for opt in options:
        assert opt in text, (opt, text)


def test_fused_linear_logprobs_module():
    hidden, weight, bias, targets = _linear()
    m = ops.FusedLinearLogprobs(temperature=0.7, return_entropy=True, backend="torch")
    _is_stateless_module(m, "temperature=0.7", "return_entropy=True", "ignore_index=-100", "backend='torch'")
    lp, ent = m(hidden, weight, targets, bias)
    f_lp, f_ent = ops.fused_linear_logprobs(hidden, weight, targets, bias, temperature=0.7, return_entropy=True,
                                            backend="torch")
    _same(lp, f_lp)
    _same(ent, f_ent)
    grads = torch.autograd.grad((lp + ent).sum(), (hidden, weight, bias))
    f_grads = torch.autograd.grad((f_lp + f_ent).sum(), (hidden, weight, bias))
    for g, f in zip(grads, f_grads):
        _same(g, f)
    r_lp, _ = ref.linear_logprobs_entropy(hidden.detach(), weight.detach(), targets, bias.detach(), 0.7)
    assert_close(lp, r_lp, torch.float32)
    assert ops.FusedLinearLogprobs()(hidden, weight, targets).shape == targets.shape  # logprobs only


PPO_OPTIONS = dict(clip_low=0.1, clip_high=0.28, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.05, kl_estimator="k2",
                   temperature=0.9, agg="seq-mean-token-sum")


def test_fused_linear_ppo_loss_module():
    hidden, weight, bias, targets = _linear()
    with torch.no_grad():
        lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, bias, 0.9)
    old, ref_lp = (lp + 0.3 * torch.randn_like(lp)).float(), (lp + 0.2 * torch.randn_like(lp)).float()
    adv, mask = torch.randn(2, 5), (torch.rand(2, 5) > 0.2).float()
    m = ops.FusedLinearPPOLoss(**PPO_OPTIONS)
    _is_stateless_module(m, "clip_low=0.1", "clip_high=0.28", "dual_clip=3.0", "entropy_coef=0.01",
                         "kl_coef=0.05", "kl_estimator='k2'", "temperature=0.9", "agg='seq-mean-token-sum'")
    loss, stats = m(hidden, weight, targets, old, adv, mask, bias, ref_logprobs=ref_lp)
    f_loss, f_stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, bias, ref_logprobs=ref_lp,
                                                **PPO_OPTIONS)
    _same(loss, f_loss)
    assert stats.keys() == f_stats.keys() and "kl" in stats
    for k in stats:
        _same(stats[k], f_stats[k])
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    for g, f in zip(grads, torch.autograd.grad(f_loss, (hidden, weight, bias))):
        _same(g, f)


def test_fused_linear_ppo_loss_module_grpo_options():
    """ratio_level and the Dr. GRPO agg are module options (in repr); (B,) advantages pass through forward."""
    hidden, weight, bias, targets = _linear()
    with torch.no_grad():
        lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, bias)
    old = (lp - torch.tensor([[0.5], [-0.5]], dtype=torch.float64) + 0.1 * torch.randn_like(lp)).float()
    adv, mask = torch.tensor([1.0, -1.0]), (torch.rand(2, 5) > 0.2).float()
    opts = dict(clip_low=0.2, clip_high=0.28, ratio_level="sequence", agg="seq-mean-token-sum-norm")
    m = ops.FusedLinearPPOLoss(**opts)
    _is_stateless_module(m, "ratio_level='sequence'", "agg='seq-mean-token-sum-norm'")
    loss, stats = m(hidden, weight, targets, old, adv, mask, bias)
    f_loss, f_stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, bias, **opts)
    _same(loss, f_loss)
    for k in stats:
        _same(stats[k], f_stats[k])
    expected = ref.linear_ppo_loss(hidden.detach(), weight.detach(), targets, old, adv, mask, bias.detach(), **opts)
    assert_close(loss, expected, torch.float32)
    assert stats["clipfrac"] > 0  # both rows' sequence ratios leave the clip range


def test_fused_linear_kl_module():
    hidden, weight, bias, _ = _linear()
    ref_hidden, mask = torch.randn(2, 5, 8), (torch.rand(2, 5) > 0.3).float()
    m = ops.FusedLinearKL(temperature=0.7, backend="torch")
    _is_stateless_module(m, "temperature=0.7", "checks=None", "backend='torch'")
    kl = m(hidden, ref_hidden, weight, mask, bias)
    f_kl = ops.fused_linear_kl(hidden, ref_hidden, weight, mask, bias, temperature=0.7, backend="torch")
    _same(kl, f_kl)
    grads = torch.autograd.grad(kl.sum(), (hidden, weight, bias))
    for g, f in zip(grads, torch.autograd.grad(f_kl.sum(), (hidden, weight, bias))):
        _same(g, f)
    expected = ref.linear_kl(hidden.detach(), ref_hidden, weight.detach(), mask, bias.detach(), 0.7)
    assert_close(kl, expected, torch.float32)
    assert ops.FusedLinearKL()(hidden, ref_hidden, weight, mask).shape == (2, 5)  # no bias


def test_value_loss_module():
    v = torch.randn(2, 6, requires_grad=True)
    old, ret, mask = torch.randn(2, 6), torch.randn(2, 6), (torch.rand(2, 6) > 0.3).float()
    for kw in (dict(clip=0.3, agg="seq-mean-token-mean"), dict(clip=None)):
        m = ops.ValueLoss(**kw)
        _is_stateless_module(m, *(f"{k}={val!r}" for k, val in kw.items()))
        loss, stats = m(v, old, ret, mask)
        f_loss, f_stats = ops.value_loss(v, old, ret, mask, **kw)
        _same(loss, f_loss)
        _same(stats["clipfrac"], f_stats["clipfrac"])
        _same(torch.autograd.grad(loss, v)[0], torch.autograd.grad(f_loss, v)[0])


def test_bradley_terry_loss_module():
    c, r = torch.randn(7, requires_grad=True), torch.randn(7)
    m = ops.BradleyTerryLoss(margin=0.5)
    _is_stateless_module(m, "margin=0.5")
    _same(m(c, r), ops.bradley_terry_loss(c, r, margin=0.5))
    per_pair = torch.rand(7)
    _same(m(c, r, per_pair), ops.bradley_terry_loss(c, r, margin=per_pair))  # forward's margin replaces it
    _same(ops.BradleyTerryLoss()(c, r), ops.bradley_terry_loss(c, r))
    expected = -torch.nn.functional.logsigmoid(c.detach().double() - r.double() - 0.5).mean()
    assert_close(m(c, r), expected, torch.float32)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: ops.FusedLinearPPOLoss(agg="mean"), ValueError, "agg must be one of"),
    (lambda: ops.FusedLinearPPOLoss(kl_estimator="k4"), ValueError, "estimator must be one of"),
    (lambda: ops.FusedLinearPPOLoss(dual_clip=0.5), ValueError, "dual_clip must be > 1"),
    (lambda: ops.FusedLinearPPOLoss(kl_coef=-1.0), ValueError, "kl_coef must be >= 0"),
    (lambda: ops.FusedLinearPPOLoss(backend="cuda-magic"), ValueError, "is not one of"),
    (lambda: ops.FusedLinearLogprobs(temperature=0), ValueError, "temperature must be > 0"),
    (lambda: ops.FusedLinearPPOLoss(ratio_level="seq"), ValueError, "ratio_level must be one of"),
    (lambda: ops.FusedLinearKL(temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda: ops.FusedLinearKL(backend="cuda-magic"), ValueError, "is not one of"),
    (lambda: ops.ValueLoss(clip=-0.1), ValueError, "clip must be > 0"),
    (lambda: ops.BradleyTerryLoss(margin="big"), TypeError, "margin must be a number"),
])
def test_modules_check_their_options_when_built(make, exc, match):
    with pytest.raises(exc, match=match):
        make()

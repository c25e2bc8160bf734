"""Every public op rejects bad input with a clear error before any kernel launch."""

import pytest
import torch

from rlhf_fast import ops

H, V = 8, 37


def _lin():
    return torch.randn(2, 5, H), torch.randn(V, H), torch.randint(0, V, (2, 5))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda h, w, t: (h.long(), w, t), TypeError, "hidden must be a floating-point"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets must be an integer"),
    (lambda h, w, t: (h, w[:, :5], t), ValueError, "hidden must have shape"),
    (lambda h, w, t: (h, w, t[:, :4]), ValueError, "targets must have shape"),
    (lambda h, w, t: (h, w.double(), t), TypeError, "weight dtype"),
    (lambda h, w, t: (h, w, t.clone().fill_(V)), ValueError, r"targets must be in \[0, 37\)"),
    (lambda h, w, t: (h, w, t.clone().fill_(-3)), ValueError, "found -3"),
    (lambda h, w, t: (h, w[0], t), ValueError, "weight must be 2-D"),
])
def test_fused_linear_logprobs_bad_input(mutate, exc, match):
    with pytest.raises(exc, match=match):
        ops.fused_linear_logprobs(*mutate(*_lin()))


def test_temperature_and_bias_checks():
    h, w, t = _lin()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.fused_linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fused_linear_logprobs(h, w, t, torch.randn(V + 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.logprobs_from_logits(torch.randn(2, V), torch.zeros(2, dtype=torch.long), temperature=-1.0)


def test_range_check_can_be_switched_off(monkeypatch):
    h, w, t = _lin()
    t[0, 0] = V + 5  # out of range: only safe to pass because the torch backend clamps its gathers
    ops.fused_linear_logprobs(h, w, t, checks=False)
    monkeypatch.setenv("RLHF_FAST_CHECKS", "0")
    ops.fused_linear_logprobs(h, w, t)
    monkeypatch.setenv("RLHF_FAST_CHECKS", "1")
    with pytest.raises(ValueError, match="targets must be in"):
        ops.fused_linear_logprobs(h, w, t)


def test_logprobs_from_logits_bad_input():
    with pytest.raises(ValueError, match="targets must have shape"):
        ops.logprobs_from_logits(torch.randn(2, 3, V), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        ops.logprobs_from_logits(torch.ones(2, V, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match="estimator must be one of k1, k2, k3, abs"):
        ops.kl_penalty(torch.randn(2, 3), torch.randn(2, 3), "k4")
    with pytest.raises(ValueError, match="ref_logprobs must have the shape"):
        ops.kl_penalty(torch.randn(2, 3), torch.randn(2, 4))


def test_gae_bad_input():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="values must have the shape"):
        ops.gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.gae(r, v, m[:1])
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        ops.gae(r, v, m, lam=1.5)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        ops.gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="rewards must be a floating-point"):
        ops.gae(r.long(), v, m)
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.kl_penalized_gae(r, r, v, torch.randn(3), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        ops.kl_penalized_gae(r, r, v, torch.randn(2), m, kl_coef=-0.1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ops.kl_penalized_gae(r, r, v, torch.randn(2), m, kl_coef=0.1, estimator="kl")


def test_loss_bad_input():
    x, m = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="agg must be one of"):
        ops.ppo_policy_loss(x, x, x, m, agg="mean")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ops.ppo_policy_loss(x, x, x, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low must be > 0"):
        ops.ppo_policy_loss(x, x, x, m, clip_low=0.0)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        ops.ppo_policy_loss(x, x, x[:, :3], m)
    with pytest.raises(ValueError, match="clip must be > 0"):
        ops.value_loss(x, x, x, m, clip=-1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.value_loss(x, x, x, m[:, :2])
    with pytest.raises(ValueError, match="rejected_rewards must have the shape"):
        ops.bradley_terry_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="empty"):
        ops.bradley_terry_loss(torch.randn(0), torch.randn(0))
    with pytest.raises(ValueError, match="masked_whiten|mask must have shape"):
        ops.masked_whiten(x, m[:1])


def test_fused_ppo_bad_input():
    h, w, t = _lin()
    x, m = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logprobs must have shape"):
        ops.fused_linear_ppo_loss(h, w, t, x[:, :2], x, m)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m, kl_estimator="k5")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m, temperature=0)
    with pytest.raises(TypeError, match="targets must be an integer"):
        ops.fused_linear_ppo_loss(h, w, t.float(), x, x, m)
    t[1, 1] = V
    with pytest.raises(ValueError, match="targets must be in"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m)


def test_fused_ppo_grpo_options_bad_input():
    h, w, t = _lin()
    x, m = torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="ratio_level must be one of token, sequence, got 'seq'"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m, ratio_level="seq")
    for adv in (torch.randn(3), torch.randn(2, 4), torch.randn(5), torch.randn(2, 5, 1)):
        with pytest.raises(ValueError, match=r"advantages must have shape \(2, 5\) \(per token\) or \(2,\) \(per "
                                             r"sequence\), got"):
            ops.fused_linear_ppo_loss(h, w, t, x, adv, m)
    with pytest.raises(TypeError, match="advantages must be a floating-point"):
        ops.fused_linear_ppo_loss(h, w, t, x, torch.ones(2, dtype=torch.long), m)
    with pytest.raises(ValueError, match="agg must be one of .*seq-mean-token-sum-norm"):
        ops.fused_linear_ppo_loss(h, w, t, x, x, m, agg="dr_grpo")


def _kl_args():
    return dict(hidden=torch.randn(2, 5, H), ref_hidden=torch.randn(2, 5, H), weight=torch.randn(V, H),
                mask=torch.ones(2, 5))


@pytest.mark.parametrize("change,exc,match", [
    (dict(hidden=torch.ones(2, 5, H, dtype=torch.long)), TypeError, "hidden must be a floating-point"),
    (dict(ref_hidden=torch.ones(2, 5, H, dtype=torch.long)), TypeError, "ref_hidden must be a floating-point"),
    (dict(weight=torch.ones(V, H, dtype=torch.long)), TypeError, "weight must be a floating-point"),
    (dict(ref_hidden=torch.randn(2, 4, H)), ValueError, r"ref_hidden must have the shape of hidden \(2, 5, 8\)"),
    (dict(hidden=torch.randn(2, 5, H + 1), ref_hidden=torch.randn(2, 5, H + 1)), ValueError,
     "hidden must have shape .* H = weight.shape.1. = 8"),
    (dict(hidden=torch.randn(H), ref_hidden=torch.randn(H)), ValueError, "hidden must have shape"),
    (dict(weight=torch.randn(V)), ValueError, "weight must be 2-D"),
    (dict(mask=torch.ones(2, 4)), ValueError, r"mask must have shape \(2, 5\), got \(2, 4\)"),
    (dict(mask=[[1] * 5] * 2), TypeError, "mask must be a torch.Tensor"),
    (dict(ref_hidden=torch.randn(2, 5, H, dtype=torch.float64)), TypeError, "ref_hidden dtype torch.float64 must "
                                                                             "equal hidden dtype torch.float32"),
    (dict(weight=torch.randn(V, H).half()), TypeError, "weight dtype torch.float16 must equal"),
    (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \(37,\), got \(38,\)"),
    (dict(bias=torch.ones(V, dtype=torch.long)), TypeError, "bias must be a floating-point"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0, got 0.0"),
    (dict(temperature=-1.5), ValueError, "temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be > 0"),
    (dict(temperature="1.0"), TypeError, "temperature must be a number"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(backend="cuda-magic"), ValueError, "is not one of"),
    (dict(backend="native"), NotImplementedError, "no native kernel for fused_linear_kl"),
])
def test_fused_linear_kl_bad_input(change, exc, match):
    kw = {**_kl_args(), **change}
    with pytest.raises(exc, match=match):
        ops.fused_linear_kl(**kw)


def test_fused_linear_kl_one_device():
    kw = {**_kl_args(), "ref_hidden": torch.randn(2, 5, H, device="meta")}  # a second device without a GPU
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.fused_linear_kl(**kw)

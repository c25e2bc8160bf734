"""dpo_loss (sigmoid / cDPO, hinge, ipo, robust), simpo_loss, orpo_loss and kto_loss against the float64
references, the papers' identities, TRL 1.16's own loss code, and bad input."""

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.tolerances import TOL, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
REWARD_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}


def _leaves(dtype, *xs):
    return [x.to(dtype).requires_grad_(True) for x in xs]


def _pairs(B):
    """Summed sequence log-probs (chosen, rejected, ref_chosen, ref_rejected), the policy a little off the
    reference, so that z = beta h spans both signs for beta around 0.5."""
    rc, rr = -torch.rand(B) * 40 - 5, -torch.rand(B) * 40 - 5
    return rc + torch.randn(B) * 3, rr + torch.randn(B) * 3, rc, rr


def _compare_grads(loss, inputs, ref_fn, dtype):
    """The gradients of loss w.r.t. every input against those of the float64 reference ref_fn on the same
    (rounded) inputs; they come back in the input dtype (one rounding), hence that dtype's tolerance row.
    Returns the reference's (loss, stats) and the gradients."""
    refs = [x.detach().double().requires_grad_(True) for x in inputs]
    want_loss, want_stats = ref_fn(*refs)
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(want_loss, refs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        # Normalised by the largest reference gradient: the table's atol is sized for O(1) values, and these
        # gradients are O(beta / B), which an absolute atol of 2e-2 (bf16) would not even see.
        scale = w.abs().max().clamp(min=1e-12)
        assert_close(g.double() / scale, w / scale, dtype, msg=f"gradient w.r.t. input {i}")
    return want_loss, want_stats, got


def _compare_stats(stats, want_stats, dtype):
    value_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert set(stats) == set(want_stats)
    for k, v in stats.items():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == value_dtype, k
        assert_close(v, want_stats[k], value_dtype, msg=k)


# ---------------------------------------------------------------- against the float64 references


@pytest.mark.parametrize("loss_type,e", DPO_CASES)
@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpo_matches_reference(loss_type, e, B, dtype):
    # beta = 0.37, not 0.5: bf16-rounded log-probs make h a multiple of 1/8, and beta h = 1 exactly would sit on
    # hinge's kink, where relu's subgradient (0) and the reference's clamp (1) differ.
    beta = 0.05 if loss_type == "ipo" else 0.37
    inputs = _leaves(dtype, *_pairs(B))
    loss, stats = ops.dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=e)
    want, want_stats, _ = _compare_grads(loss, inputs, lambda *x: ref.dpo(*x, beta, loss_type, e), dtype)
    assert_close(loss, want, torch.float64 if dtype == torch.float64 else torch.float32)
    _compare_stats(stats, want_stats, dtype)
    assert set(stats) == REWARD_KEYS


@pytest.mark.parametrize("e", [0.0, 0.3])
@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simpo_matches_reference(e, B, dtype):
    c, r = -torch.rand(B) * 3, -torch.rand(B) * 3  # length-averaged log-probs
    inputs = _leaves(dtype, c, r)
    loss, stats = ops.simpo_loss(*inputs, beta=2.5, gamma=0.7, label_smoothing=e)
    want, want_stats, _ = _compare_grads(loss, inputs, lambda *x: ref.simpo(*x, 2.5, 0.7, e), dtype)
    assert_close(loss, want, torch.float64 if dtype == torch.float64 else torch.float32)
    _compare_stats(stats, want_stats, dtype)


@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orpo_matches_reference(B, dtype):
    c, r = -torch.rand(B) * 3 - 0.01, -torch.rand(B) * 3 - 0.01  # both sides of -log 2
    nll = torch.rand(B) * 2
    inputs = _leaves(dtype, c, r, nll)
    loss, stats = ops.orpo_loss(*inputs, beta=0.25)
    want, want_stats, _ = _compare_grads(loss, inputs, lambda *x: ref.orpo(*x, 0.25), dtype)
    assert_close(loss, want, torch.float64 if dtype == torch.float64 else torch.float32)
    _compare_stats(stats, want_stats, dtype)
    assert set(stats) == REWARD_KEYS | {"log_odds_ratio", "log_odds_chosen", "nll_loss"}


@pytest.mark.parametrize("kl", [0.7, -0.4])
@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kto_matches_reference(kl, B, dtype):
    policy, reference = -torch.rand(B) * 30, -torch.rand(B) * 30
    desirable = torch.rand(B) > 0.4
    kl_t = torch.tensor(kl, dtype=dtype)
    inputs = _leaves(dtype, policy, reference)
    loss, stats = ops.kto_loss(*inputs, desirable, kl_t, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    want, want_stats, _ = _compare_grads(
        loss, inputs, lambda p, q: ref.kto(p, q, desirable, kl_t, 0.2, 1.3, 0.8), dtype)
    assert_close(loss, want, torch.float64 if dtype == torch.float64 else torch.float32)
    _compare_stats(stats, want_stats, dtype)


def test_gradcheck():
    def leaves(*xs):
        return [x.double().requires_grad_(True) for x in xs]

    for loss_type, e in DPO_CASES:
        beta = 0.05 if loss_type == "ipo" else 0.5
        assert torch.autograd.gradcheck(
            lambda *x, t=loss_type, e=e, b=beta: ops.dpo_loss(*x, beta=b, loss_type=t, label_smoothing=e)[0],
            leaves(*_pairs(3)))
    c, r = -torch.rand(3) * 3 - 0.01, -torch.rand(3) * 3 - 0.01
    assert torch.autograd.gradcheck(lambda *x: ops.simpo_loss(*x, label_smoothing=0.1)[0], leaves(c, r))
    assert torch.autograd.gradcheck(lambda *x: ops.orpo_loss(*x, beta=0.3)[0], leaves(c, r, torch.rand(3)))
    desirable, kl = torch.tensor([True, False, True]), torch.tensor(0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: ops.kto_loss(*x, desirable, kl)[0], leaves(c * 10, r * 10))


# ---------------------------------------------------------------- extreme values


@pytest.mark.parametrize("loss_type,e", DPO_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dpo_extreme_margins_stay_finite(loss_type, e, dtype):
    h = torch.tensor([1e3, -1e3, 7e2, -7e2, 0.5])  # z = beta h = +-1e3 with beta = 1
    c, rc, rr = h.clone(), torch.zeros(5), torch.zeros(5)
    inputs = _leaves(dtype, c, torch.zeros(5), rc, rr)
    loss, stats = ops.dpo_loss(*inputs, beta=1.0, loss_type=loss_type, label_smoothing=e)
    want, _, grads = _compare_grads(loss, inputs, lambda *x: ref.dpo(*x, 1.0, loss_type, e), dtype)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in stats.values())
    assert_close(loss, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_simpo_and_kto_extremes_stay_finite(dtype):
    c, r = _leaves(dtype, torch.tensor([-1e-3, -500.0]), torch.tensor([-500.0, -1e-3]))
    loss, _ = ops.simpo_loss(c, r, beta=2.0, gamma=0.5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (c, r)))
    assert_close(loss, ref.simpo(c, r, 2.0, 0.5)[0], dtype)
    p, q = _leaves(dtype, torch.tensor([1e3, -1e3, 1e3, -1e3]), torch.zeros(4))
    loss, _ = ops.kto_loss(p, q, torch.tensor([True, True, False, False]), torch.tensor(0.0), beta=1.0)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (p, q)))
    assert_close(loss, ref.kto(p, q, torch.tensor([True, True, False, False]), 0.0, 1.0)[0], dtype)  # 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_orpo_log_probs_near_zero_and_very_negative(dtype):
    c = torch.tensor([-1e-6, -50.0, -1e-6, -2.0, -0.6931])
    r = torch.tensor([-50.0, -1e-6, -1e-6, -50.0, -0.7])
    inputs = _leaves(dtype, c, r, torch.rand(5))
    loss, stats = ops.orpo_loss(*inputs, beta=0.5)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    want, want_stats, _ = _compare_grads(loss, inputs, lambda *x: ref.orpo(*x, 0.5), dtype)
    assert_close(loss, want, dtype)
    _compare_stats(stats, want_stats, dtype)


# ---------------------------------------------------------------- the papers' and TRL's semantics


def test_dpo_sigmoid_without_smoothing_is_minus_logsigmoid():
    c, r, rc, rr = _pairs(9)
    loss, _ = ops.dpo_loss(c, r, rc, rr, beta=0.3)
    z = 0.3 * ((c - rc) - (r - rr))
    torch.testing.assert_close(loss, -F.logsigmoid(z).mean())
    assert_close(loss, ops.bradley_terry_loss(0.3 * (c - rc), 0.3 * (r - rr)), torch.float32)


def test_cdpo_mixes_the_flipped_pair():
    """Conservative DPO: with labels flipped with probability e, the loss is the e-mixture of the DPO loss of
    the pair and of the swapped pair."""
    c, r, rc, rr = (x.double() for x in _pairs(11))
    e = 0.15
    loss, _ = ops.dpo_loss(c, r, rc, rr, beta=0.4, label_smoothing=e)
    plain, _ = ops.dpo_loss(c, r, rc, rr, beta=0.4)
    swapped, _ = ops.dpo_loss(r, c, rr, rc, beta=0.4)
    assert_close(loss, (1 - e) * plain + e * swapped)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al. 2024: averaging the robust loss over a flip with probability e gives the clean loss."""
    c, r, rc, rr = (x.double() for x in _pairs(11))
    e = 0.3
    robust, _ = ops.dpo_loss(c, r, rc, rr, beta=0.4, loss_type="robust", label_smoothing=e)
    robust_swapped, _ = ops.dpo_loss(r, c, rr, rc, beta=0.4, loss_type="robust", label_smoothing=e)
    clean, _ = ops.dpo_loss(c, r, rc, rr, beta=0.4)
    assert_close((1 - e) * robust + e * robust_swapped, clean)
    robust0, _ = ops.dpo_loss(c, r, rc, rr, beta=0.4, loss_type="robust")
    assert_close(robust0, clean)


def test_ipo_target_and_hinge_margin():
    beta = 0.1
    zero = torch.zeros(2, dtype=torch.float64)
    # ipo: h = 1 / (2 beta) = 5 is the target, with zero loss; h = 4 is 1 short of it
    loss, _ = ops.dpo_loss(torch.tensor([5.0, 5.0], dtype=torch.float64), zero, zero, zero, beta=beta, loss_type="ipo")
    assert loss.item() == 0.0
    loss, _ = ops.dpo_loss(torch.tensor([5.0, 4.0], dtype=torch.float64), zero, zero, zero, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(0.5)
    # hinge: zero loss and zero gradient once z = beta h >= 1
    x = torch.tensor([20.0, 5.0], dtype=torch.float64, requires_grad=True)
    loss, _ = ops.dpo_loss(x, zero, zero, zero, beta=beta, loss_type="hinge")
    assert loss.item() == pytest.approx(0.25)  # (relu(1 - 2) + relu(1 - 0.5)) / 2
    assert torch.autograd.grad(loss, x)[0].tolist() == [0.0, -beta / 2]


def test_dpo_stats_follow_trl():
    c = torch.tensor([-10.0, -12.0, -9.0, -20.0])
    r = torch.tensor([-11.0, -11.0, -9.0, -30.0])
    rc = torch.tensor([-10.0, -10.0, -10.0, -10.0])
    rr = torch.tensor([-10.0, -10.0, -10.0, -10.0])
    _, stats = ops.dpo_loss(c.requires_grad_(True), r, rc, rr, beta=0.5)
    # r_w = 0.5 (c - rc) = [0, -1, 0.5, -5], r_l = [-0.5, -0.5, 0.5, -10]
    assert stats["rewards/chosen"].item() == pytest.approx(-5.5 / 4)
    assert stats["rewards/rejected"].item() == pytest.approx(-10.5 / 4)
    assert stats["rewards/margins"].item() == pytest.approx(5.0 / 4)
    assert stats["rewards/accuracies"].item() == 0.5  # a tie (the third pair) is not a win
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_simpo_is_bradley_terry_with_a_margin():
    c, r = -torch.rand(9) * 2, -torch.rand(9) * 2
    loss, stats = ops.simpo_loss(c, r, beta=2.5, gamma=0.3)
    assert_close(loss, ops.bradley_terry_loss(2.5 * c, 2.5 * r, margin=0.3), torch.float32)
    assert_close(stats["rewards/margins"], (2.5 * (c - r)).mean(), torch.float32)


def test_orpo_symmetric_pair_has_zero_log_odds():
    x = torch.tensor([-0.3, -2.0], dtype=torch.float64)
    nll = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss, stats = ops.orpo_loss(x, x, nll, beta=0.2)
    assert stats["log_odds_chosen"].item() == 0.0
    assert_close(stats["log_odds_ratio"], torch.tensor(-0.6931471805599453, dtype=torch.float64))
    assert_close(loss, 2.0 + 0.2 * torch.tensor(0.6931471805599453, dtype=torch.float64))
    assert stats["nll_loss"].item() == 2.0


def test_kto_clamps_kl_and_treats_it_as_a_constant():
    policy = torch.randn(6, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(6, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False, False, True])
    kl = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss_neg, stats_neg = ops.kto_loss(policy, reference, desirable, kl)
    loss_zero, _ = ops.kto_loss(policy, reference, desirable, torch.tensor(0.0, dtype=torch.float64))
    assert torch.equal(loss_neg, loss_zero) and stats_neg["kl"].item() == 0.0
    assert torch.autograd.grad(loss_neg, (policy, kl), allow_unused=True)[1] is None
    _, stats = ops.kto_loss(policy, reference, desirable, torch.tensor(0.25))
    assert stats["kl"].item() == 0.25 and not stats["kl"].requires_grad


def test_kto_rewards_of_an_absent_side_are_zero():
    policy, reference = torch.randn(4), torch.randn(4)
    _, stats = ops.kto_loss(policy, reference, torch.ones(4, dtype=torch.bool), torch.tensor(0.1), beta=0.5)
    assert stats["rewards/rejected"].item() == 0.0
    assert_close(stats["rewards/chosen"], (0.5 * (policy - reference)).mean(), torch.float32)
    _, stats = ops.kto_loss(policy, reference, torch.zeros(4, dtype=torch.bool), torch.tensor(0.1))
    assert stats["rewards/chosen"].item() == 0.0


def test_kto_weights_scale_each_side():
    policy, reference = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.2)
    d_only, _ = ops.kto_loss(policy, reference, desirable, kl, undesirable_weight=0.0)
    u_only, _ = ops.kto_loss(policy, reference, desirable, kl, desirable_weight=0.0)
    both, _ = ops.kto_loss(policy, reference, desirable, kl, desirable_weight=2.0, undesirable_weight=3.0)
    assert_close(both, 2.0 * d_only + 3.0 * u_only)


def test_float64_stays_float64_and_low_precision_upcasts():
    c, r, rc, rr = _pairs(5)
    assert ops.dpo_loss(c.double(), r, rc, rr)[0].dtype == torch.float64
    assert ops.dpo_loss(c.half(), r.half(), rc.half(), rr.half())[0].dtype == torch.float32
    assert ops.simpo_loss(-c.abs().bfloat16(), -r.abs().bfloat16())[0].dtype == torch.float32


# ---------------------------------------------------------------- compile: one graph, no host sync


def test_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break (a .item(), a branch on a tensor value): all four losses trace
    into one graph, and give the eager numbers."""
    def all_losses(c, r, rc, rr, nll, desirable, kl):
        dpo, dpo_stats = ops.dpo_loss(c, r, rc, rr, beta=0.3, loss_type="robust", label_smoothing=0.1)
        ipo, _ = ops.dpo_loss(c, r, rc, rr, beta=0.3, loss_type="ipo")
        simpo, _ = ops.simpo_loss(c / 20, r / 20)
        orpo, orpo_stats = ops.orpo_loss(c / 20, r / 20, nll)
        kto, kto_stats = ops.kto_loss(c, rc, desirable, kl)
        return dpo + ipo + simpo + orpo + kto, dpo_stats["rewards/margins"], orpo_stats["log_odds_chosen"], \
            kto_stats["rewards/chosen"]

    c, r, rc, rr = _pairs(7)
    args = (c.requires_grad_(True), r, rc, rr, torch.rand(7), torch.rand(7) > 0.5, torch.tensor(0.3))
    torch._dynamo.reset()
    compiled = torch.compile(all_losses, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), all_losses(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(torch.autograd.grad(got[0], c)[0], torch.autograd.grad(want[0], c)[0])


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("module,options,fn,nargs", [
    (ops.DPOLoss, dict(beta=0.3, loss_type="robust", label_smoothing=0.1), ops.dpo_loss, 4),
    (ops.SimPOLoss, dict(beta=2.5, gamma=0.7, label_smoothing=0.05), ops.simpo_loss, 2),
    (ops.ORPOLoss, dict(beta=0.2, checks=True), ops.orpo_loss, 3),
])
def test_modules_are_the_functions(module, options, fn, nargs):
    m = module(**options)
    assert m.state_dict() == {} and list(m.parameters()) == [] and list(m.buffers()) == []
    text = repr(m)
    assert text.startswith(type(m).__name__ + "(")
    for k, v in options.items():
        assert f"{k}={v!r}" in text, (k, text)
    xs = [(-torch.rand(6) * 3 - 0.01).requires_grad_(True) for _ in range(nargs)]
    loss, stats = m(*xs)
    f_loss, f_stats = fn(*xs, **options)
    assert torch.equal(loss, f_loss) and stats.keys() == f_stats.keys()
    assert all(torch.equal(stats[k], f_stats[k]) for k in stats)
    for g, f in zip(torch.autograd.grad(loss, xs), torch.autograd.grad(f_loss, xs)):
        assert torch.equal(g, f)


def test_kto_module_is_the_function():
    options = dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.5)
    m = ops.KTOLoss(**options)
    assert "desirable_weight=1.5" in repr(m) and list(m.parameters()) == []
    p, q, d, kl = torch.randn(6, requires_grad=True), torch.randn(6), torch.rand(6) > 0.5, torch.tensor(0.2)
    loss, stats = m(p, q, d, kl)
    f_loss, f_stats = ops.kto_loss(p, q, d, kl, **options)
    assert torch.equal(loss, f_loss) and all(torch.equal(stats[k], f_stats[k]) for k in stats)


@pytest.mark.parametrize("build,exc,match", [
    (lambda: ops.DPOLoss(beta=0.0), ValueError, "beta must be a finite number > 0"),
    (lambda: ops.DPOLoss(loss_type="kto"), ValueError, "loss_type must be one of sigmoid, hinge, ipo, robust"),
    (lambda: ops.DPOLoss(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\)"),
    (lambda: ops.SimPOLoss(gamma=float("nan")), ValueError, "gamma must be a finite number"),
    (lambda: ops.ORPOLoss(beta=float("inf")), ValueError, "beta must be a finite number > 0"),
    (lambda: ops.KTOLoss(undesirable_weight=-1.0), ValueError, "undesirable_weight must be a finite number >= 0"),
    (lambda: ops.KTOLoss(beta="0.1"), TypeError, "beta must be a number"),
])
def test_module_options_are_checked(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_exported():
    for name in ("dpo_loss", "simpo_loss", "orpo_loss", "kto_loss", "DPOLoss", "SimPOLoss", "ORPOLoss", "KTOLoss"):
        assert name in ops.__all__ and hasattr(ops, name)
    for name in ("dpo", "simpo", "orpo", "kto"):
        assert name in ref.__all__


# ---------------------------------------------------------------- bad input


def _x(n=4, dtype=torch.float32):
    return -torch.rand(n, dtype=dtype) - 0.1


@pytest.mark.parametrize("call,exc,match", [
    # shapes
    (lambda: ops.dpo_loss(_x(4), _x(5), _x(4), _x(4)), ValueError,
     r"rejected_logps must have the shape of chosen_logps \(4,\), got \(5,\)"),
    (lambda: ops.dpo_loss(_x(4), _x(4), _x(4), _x(3)), ValueError,
     r"ref_rejected_logps must have the shape of chosen_logps \(4,\), got \(3,\)"),
    (lambda: ops.dpo_loss(_x(4)[None], _x(4)[None], _x(4)[None], _x(4)[None]), ValueError,
     r"chosen_logps must be 1-D \(B,\), got shape \(1, 4\)"),
    (lambda: ops.dpo_loss(_x(1)[0], _x(1)[0], _x(1)[0], _x(1)[0]), ValueError, "chosen_logps must be 1-D"),
    (lambda: ops.simpo_loss(_x(4), _x(4)[:, None]), ValueError, "rejected_logps must have the shape of chosen_logps"),
    (lambda: ops.orpo_loss(_x(4), _x(4), _x(2)), ValueError, r"chosen_nll must have the shape of chosen_logps \(4,\)"),
    (lambda: ops.kto_loss(_x(4), _x(3), torch.ones(4, dtype=torch.bool), torch.tensor(0.)), ValueError,
     r"ref_logps must have the shape of policy_logps \(4,\), got \(3,\)"),
    (lambda: ops.kto_loss(_x(4), _x(4), torch.ones(3, dtype=torch.bool), torch.tensor(0.)), ValueError,
     r"desirable must have the shape of policy_logps \(4,\), got \(3,\)"),
    (lambda: ops.kto_loss(_x(4), _x(4), torch.ones(4, dtype=torch.bool), torch.zeros(1)), ValueError,
     r"kl must be a 0-dim tensor .*got shape \(1,\)"),
    # empty batch
    (lambda: ops.dpo_loss(_x(0), _x(0), _x(0), _x(0)), ValueError, r"chosen_logps is empty \(B=0\)"),
    (lambda: ops.simpo_loss(_x(0), _x(0)), ValueError, "empty"),
    (lambda: ops.orpo_loss(_x(0), _x(0), _x(0)), ValueError, "empty"),
    (lambda: ops.kto_loss(_x(0), _x(0), torch.ones(0, dtype=torch.bool), torch.tensor(0.)), ValueError,
     r"policy_logps is empty"),
    # dtypes
    (lambda: ops.dpo_loss(_x(), _x(), _x().long(), _x()), TypeError,
     "ref_chosen_logps must be a floating-point tensor .*got torch.int64"),
    (lambda: ops.simpo_loss(torch.ones(4, dtype=torch.int32), _x()), TypeError, "chosen_logps must be a floating"),
    (lambda: ops.orpo_loss(_x(), _x(), torch.ones(4, dtype=torch.bool)), TypeError, "chosen_nll must be a floating"),
    (lambda: ops.kto_loss(_x(), _x(), torch.ones(4), torch.tensor(0.)), TypeError,
     "desirable must be a bool tensor, got torch.float32"),
    (lambda: ops.kto_loss(_x(), _x(), torch.ones(4, dtype=torch.bool), torch.tensor(0)), TypeError,
     "kl must be a floating-point"),
    (lambda: ops.kto_loss(_x(), _x(), torch.ones(4, dtype=torch.bool), 0.0), TypeError, "kl must be a torch.Tensor"),
    (lambda: ops.dpo_loss([-1.0], _x(1), _x(1), _x(1)), TypeError, "chosen_logps must be a torch.Tensor"),
    # beta
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), beta=0.0), ValueError, "beta must be a finite number > 0, got 0.0"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), beta=-0.1), ValueError, "beta must be a finite number > 0"),
    (lambda: ops.simpo_loss(_x(), _x(), beta=float("inf")), ValueError, "beta must be a finite number > 0, got inf"),
    (lambda: ops.orpo_loss(_x(), _x(), _x(), beta=float("nan")), ValueError, "beta must be a finite number > 0"),
    (lambda: ops.kto_loss(_x(), _x(), torch.ones(4, dtype=torch.bool), torch.tensor(0.), beta=0), ValueError,
     "beta must be a finite number > 0"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), beta=None), TypeError, "beta must be a number"),
    # loss_type and label_smoothing
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="kto"), ValueError,
     "loss_type must be one of sigmoid, hinge, ipo, robust, got 'kto'"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), label_smoothing=-0.1), ValueError,
     r"label_smoothing must be in \[0, 1\], got -0.1"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="robust", label_smoothing=0.5), ValueError,
     r"label_smoothing must be in \[0, 0.5\) for loss_type='robust'.*got 0.5"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="robust", label_smoothing=0.7), ValueError,
     r"\[0, 0.5\) for loss_type='robust'"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="robust", label_smoothing=-0.1), ValueError,
     r"\[0, 0.5\) for loss_type='robust'"),
    (lambda: ops.simpo_loss(_x(), _x(), label_smoothing=1.01), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (lambda: ops.simpo_loss(_x(), _x(), gamma=float("inf")), ValueError, "gamma must be a finite number"),
    (lambda: ops.kto_loss(_x(), _x(), torch.ones(4, dtype=torch.bool), torch.tensor(0.), desirable_weight=-1),
     ValueError, "desirable_weight must be a finite number >= 0"),
    # ORPO's log-probs must be < 0 (a data-reading check)
    (lambda: ops.orpo_loss(torch.tensor([-0.5, 0.0]), _x(2), _x(2)), ValueError,
     r"chosen_logps must be < 0 .*found 0.0 \(1 entries >= 0\)"),
    (lambda: ops.orpo_loss(_x(2), torch.tensor([0.3, 0.2]), _x(2)), ValueError,
     r"rejected_logps must be < 0 .*found 0.3\d* \(2 entries >= 0\)"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_orpo_range_check_can_be_switched_off(monkeypatch):
    c, r, nll = torch.tensor([-0.5, 0.1]), _x(2), _x(2).abs()
    ops.orpo_loss(c, r, nll, checks=False)  # no error: the caller vouches for its data
    monkeypatch.setenv("RLHF_FAST_CHECKS", "0")
    ops.orpo_loss(c, r, nll)
    with pytest.raises(ValueError, match="chosen_logps must be < 0"):
        ops.orpo_loss(c, r, nll, checks=True)
    monkeypatch.setenv("RLHF_FAST_CHECKS", "1")
    with pytest.raises(ValueError, match="chosen_logps must be < 0"):
        ops.ORPOLoss()(c, r, nll)


def test_one_device():
    meta = torch.zeros(4, device="meta")  # a second device without a GPU
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.dpo_loss(_x(), _x(), meta, _x())
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.kto_loss(_x(), _x(), torch.ones(4, dtype=torch.bool), torch.tensor(0.0, device="meta"))


# ---------------------------------------------------------------- TRL 1.16's own loss code


def _trl_dpo_trainer_loss(loss_type, beta, label_smoothing, c_tok, r_tok, c_mask, r_mask, ref_c, ref_r):
    """DPOTrainer._compute_loss of the installed TRL, run on a stand-in for the trainer (only the attributes that
    method reads) and for the model (it returns the given per-token log-probs: TRL sums them over the completion,
    and for "ipo" divides by the completion length). Returns (loss, TRL's logged metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer  # optional package (a test extra)

    per_token = torch.cat([c_tok, r_tok])  # (2B, T): TRL's batch is [chosen; rejected]
    mask = torch.cat([c_mask, r_mask])
    completion_mask = torch.cat([torch.zeros(len(mask), 1), mask], dim=1)  # (2B, T + 1): TRL shifts it by one

    def model(**kwargs):
        shape = per_token.shape
        return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape),
                                     mean_logits=torch.zeros(shape), is_top1=torch.zeros(shape, dtype=torch.bool))

    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long), "completion_mask": completion_mask,
              "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_matches_trl_dpo_trainer(loss_type, e):
    pytest.importorskip("trl")
    B, T = 5, 6
    beta = 0.1 if loss_type == "ipo" else 0.5
    lengths = torch.tensor([6, 3, 1, 4, 5, 2, 6, 6, 1, 3])  # chosen rows, then rejected rows
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (2B, T)
    per_token = -torch.rand(2 * B, T) * 2 * mask  # zero past the completion, as TRL's model output is
    ref_sums = per_token.sum(1) + torch.randn(2 * B)
    per_token.requires_grad_(True)
    trl_loss, metrics = _trl_dpo_trainer_loss(loss_type, beta, e, per_token[:B], per_token[B:], mask[:B], mask[B:],
                                              ref_sums[:B], ref_sums[B:])
    sums = per_token.sum(1)
    if loss_type == "ipo":  # IPO takes length-averaged log-probs (policy and reference alike)
        inputs = (sums / lengths, ref_sums / lengths)
    else:
        inputs = (sums, ref_sums)
    (pol, refs) = inputs
    loss, stats = ops.dpo_loss(pol[:B], pol[B:], refs[:B], refs[B:], beta=beta, loss_type=loss_type,
                               label_smoothing=e)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(loss, trl_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.autograd.grad(loss, per_token)[0], torch.autograd.grad(trl_loss, per_token)[0],
                               rtol=rtol, atol=atol)
    if loss_type != "ipo":  # TRL's reward metrics use the summed log-ratios, which ipo's inputs are not
        for key in REWARD_KEYS:
            assert stats[key].item() == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key

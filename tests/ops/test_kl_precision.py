"""The KL estimators in fp32 through every op and backend that takes one, against the float64 reference, at
d = logprobs - ref_logprobs from 1e-6 to 10 in size, both signs.

k3 = exp(-d) - 1 + d written that way is rounding noise in fp32 near d = 0 (at d = 1e-4: -1.7e-8 for the true
5.0e-9), and expm1(-d) + d still loses up to ~1.2e-7 / |d| relative (9% at d = 1e-6); the implementations
use a Taylor series there (ops/_estimators.py, kernels/_estimators.py, csrc/kl_estimators.h). Here each must be
within 1e-3 relative of float64 at every d, and so must the derivative the Triton PPO kernel writes.
"""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast import reference as ref
from rlhf_fast.ops import _dispatch
from rlhf_fast.ops.kl import kl_terms
from tests.ops.backends import backends_for
from tests.tolerances import assert_close

MAGNITUDES = (1e-6, 1e-4, 1e-2, 1.0, 10.0)
DS = MAGNITUDES + tuple(-m for m in MAGNITUDES)
ESTIMATORS = ("k1", "k2", "k3", "abs")
RTOL = 1e-3


def _pair(ds=DS):
    """fp32 (logprobs, ref_logprobs), (1, len(ds)), with logprobs - ref_logprobs = ds exactly: logprobs = -|d|,
    ref = -2|d| or 0, so no rounding enters (logprobs of size 1 would round d to multiples of 1.2e-7 and give
    old formulas lucky values: 8 of those ulps make d = 2^-20)."""
    d = torch.tensor([ds])
    lp = -d.abs()
    return lp, lp - d
def _backend(use_backend, op, name):
    """Select `name` for the test, or skip where it cannot run here (no rlhf_fast._C, no triton)."""
    ok, why = _dispatch._available(op, name, torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    use_backend(name)


def _assert_rel(got, want, what):
    got, want = got.double(), want.double()
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= RTOL, f"{what}: max relative error {rel:.3g} > {RTOL} (got {got.tolist()}, want {want.tolist()})"


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty(estimator):
    lp, rlp = _pair()
    got = ops.kl_penalty(lp, rlp, estimator)
    _assert_rel(got, ref.kl(lp, rlp, estimator), f"kl_penalty {estimator}")
    if estimator == "k3":
        assert (got > 0).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_float64(estimator):
    # The float64 path switches to the series at |d| < 0.1: exact to the reference's own accuracy (2e-10 at 1e-6).
    lp, rlp = (x.double() for x in _pair(DS + (0.09, -0.09, 0.11, -0.11)))
    assert_close(ops.kl_penalty(lp, rlp, estimator), ref.kl(lp, rlp, estimator))


@pytest.mark.parametrize("backend", backends_for("kl_penalized_gae"))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalized_gae_rewards(use_backend, backend, estimator):
    _backend(use_backend, "kl_penalized_gae", backend)
    lp, rlp = _pair()
    # zero scores and values: rewards = -kl_coef * kl exactly where the formula is right
    zeros, mask = torch.zeros_like(lp), torch.ones_like(lp)
    _, _, rewards = ops.kl_penalized_gae(lp, rlp, zeros, torch.zeros(1), mask, kl_coef=1.0, gamma=1.0, lam=0.95,
                                         estimator=estimator)
    assert rewards.dtype == torch.float32
    _assert_rel(rewards, ref.kl_rewards(lp, rlp, torch.zeros(1), mask, 1.0, estimator),
                f"kl_penalized_gae [{backend}] {estimator}")
    if estimator == "k3":
        assert (rewards < 0).all()  # k3 > 0: never 0 or negative, even at d = 1e-6


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("d", DS)
def test_fused_linear_ppo_loss_kl_term(use_backend, backend, estimator, d):
    """A one-token vocabulary makes log-probs exactly 0 (and the entropy 0); with zero advantages the policy term
    is 0, so the loss is the KL term alone, at logprobs - ref = -ref = d exactly."""
    _backend(use_backend, "fused_linear_ppo_loss", backend)
    B, T, H = 1, 3, 8
    hidden, weight = torch.randn(B, T, H), torch.randn(1, H)
    targets = torch.zeros(B, T, dtype=torch.long)
    old, adv, mask = torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T)
    rlp = torch.full((B, T), -d)
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, ref_logprobs=rlp,
                                            kl_coef=0.5, kl_estimator=estimator)
    want = 0.5 * ref.kl(torch.zeros(1), torch.tensor([-d]), estimator)
    _assert_rel(loss.reshape(1), want, f"fused_linear_ppo_loss [{backend}] {estimator} at d={d}")
    _assert_rel(stats["kl"].reshape(1), want / 0.5, f"stats['kl'] [{backend}] {estimator} at d={d}")
    if estimator == "k3":
        assert loss > 0


def _triton_token_kl(lp, rlp, code):
    """kernels/ppo_loss.py's token kernel with zero advantages (the policy term and its gradient vanish) and unit
    weights: the token loss is the KL term and the log-prob coefficient its derivative."""
    from rlhf_fast.kernels import ppo_loss as k

    n = lp.numel()
    zeros = torch.zeros(n)
    loss, c_lp, c_ent = torch.empty(n), torch.empty(n), torch.empty(n)
    k._token_loss(lp, zeros, lp.clone(), zeros, torch.ones(n), rlp, torch.zeros(n, dtype=torch.long), loss, c_lp,
                  c_ent, kl_coef=1.0, kl_estimator=code, entropy_coef=0.0, clip_low=0.2, clip_high=0.2,
                  dual_clip=None, ignore_index=-100, need_grad=True)
    return loss, c_lp


def _torch_token_kl(lp, rlp, code):
    """The torch backend's KL term: kl_terms(lp - ref), differentiated by autograd."""
    lp = lp.clone().requires_grad_(True)
    kl = kl_terms(lp - rlp, code)
    (g,) = torch.autograd.grad(kl.sum(), lp)
    return kl.detach(), g


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ppo_token_kl_value_and_derivative(backend, estimator):
    """The per-token KL term of the PPO loss and its derivative in the log-prob (what the backward scales), as
    each backend computes them."""
    if backend == "triton" and not _dispatch.triton_usable(torch.device("cpu")):
        pytest.skip("Triton on CPU tensors needs triton and TRITON_INTERPRET=1")
    lp, rlp = (x.reshape(-1) for x in _pair())
    code = ESTIMATORS.index(estimator)
    loss, g_lp = (_triton_token_kl if backend == "triton" else _torch_token_kl)(lp, rlp, code)
    lp64 = lp.double().requires_grad_(True)
    want = ref.kl(lp64, rlp, estimator)
    (want_g,) = torch.autograd.grad(want.sum(), lp64)
    _assert_rel(loss, want.detach(), f"PPO token KL [{backend}] {estimator}")
    _assert_rel(g_lp, want_g, f"PPO token dKL/dlogprob [{backend}] {estimator}")

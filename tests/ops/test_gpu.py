"""GPU-only checks (marked gpu; skipped without CUDA). Run on a GPU machine with RLHF_FAST_GPU_TESTS=1 so
conftest leaves TRITON_INTERPRET unset and the compiled kernels run.

Low precision rule (STYLE.md): against the float64 reference, our error is at most twice that of plain
PyTorch computing the same thing in the same dtype."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref

pytestmark = pytest.mark.gpu


def _rel(x, r):
    return ((x.double() - r).norm() / r.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_linear_logprobs_low_precision_vs_plain_torch(monkeypatch, backend, dtype):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    N, H, V = 1031, 256, 4099
    hidden = torch.randn(N, H, device="cuda").to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device="cuda")
    lp, ent = ops.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    gh, gw = torch.autograd.grad((lp + ent).sum(), (hidden, weight))

    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_lp, r_ent = ref.linear_logprobs_entropy(h64, w64, targets)
    r_gh, r_gw = torch.autograd.grad((r_lp + r_ent).sum(), (h64, w64))

    hp, wp = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    logp = torch.log_softmax((hp @ wp.T), dim=-1)  # plain PyTorch in the input dtype
    p_lp = logp.gather(-1, targets[:, None])[:, 0]
    p_ent = -(logp.exp() * logp).sum(-1)
    p_gh, p_gw = torch.autograd.grad((p_lp.float() + p_ent.float()).sum(), (hp, wp))

    for ours, plain, r in ((lp, p_lp, r_lp), (ent, p_ent, r_ent), (gh, p_gh, r_gh), (gw, p_gw, r_gw)):
        assert torch.isfinite(ours).all()
        assert _rel(ours, r) <= 2 * _rel(plain, r) + 1e-6


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_gae_on_gpu(monkeypatch, backend):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    B, T = 5, 2053
    rewards, values = torch.randn(B, T, device="cuda"), torch.randn(B, T, device="cuda")
    mask = (torch.rand(B, T, device="cuda") > 0.2).float()
    mask[1] = 0
    adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    r_adv, r_ret = ref.gae_loop(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    torch.testing.assert_close(adv.cpu().double(), r_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.cpu().double(), r_ret, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_ppo_loss_on_gpu(monkeypatch, backend):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    B, T, H, V = 3, 257, 128, 2053
    hidden = torch.randn(B, T, H, device="cuda").bfloat16().requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda") / H**0.5).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (B, T), device="cuda")
    with torch.no_grad():
        lp0, _ = ref.linear_logprobs_entropy(hidden, weight, targets)
    old = (lp0 + 0.2 * torch.randn_like(lp0)).float()
    adv, mask = torch.randn(B, T, device="cuda"), (torch.rand(B, T, device="cuda") > 0.2).float()
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, entropy_coef=0.01)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_lp, r_ent = ref.linear_logprobs_entropy(h64, w64, targets)
    r_loss = ref.aggregate(ref.ppo_token_loss(r_lp, old, adv, 0.2) - 0.01 * r_ent, mask, "token-mean")
    r_gh, r_gw = torch.autograd.grad(r_loss, (h64, w64))
    assert abs(loss.item() - r_loss.item()) <= 1e-2 * max(1.0, abs(r_loss.item()))
    assert _rel(gh, r_gh) < 2e-2 and _rel(gw, r_gw) < 2e-2

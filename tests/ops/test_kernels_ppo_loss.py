"""kernels/ppo_loss.py: linear_ppo_loss_fwd against a float64 reference on materialised logits (interpreter)."""

import pytest
import torch

from rlhf_fast.reference import kl as ref_kl
from tests.tolerances import assert_close

K = pytest.importorskip("rlhf_fast.kernels.logprobs")
P = pytest.importorskip("rlhf_fast.kernels.ppo_loss")


CLIP_LOW, CLIP_HIGH, KL_COEF, ENT_COEF = 0.2, 0.28, 0.1, 0.01


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Interpreter-sized tiles and a tiny chunk budget, so N = 17 runs as chunks of 16 and 1 rows."""
    for key, val in dict(block_n=16, block_v=32, block_h=16, mm_block_m=16, mm_block_n=32, mm_block_k=16,
                         mm_group_m=2, row_block_n=8, row_block_v=64, chunk_bytes=1, ppo_chunk_bytes=1,
                         target_programs=4).items():
        monkeypatch.setitem(K.CONFIG, key, val)


def ref_token_loss(lp, ent, old, adv, ref, estimator, dual_clip):
    """The plain per-token formula in float64 (the PPO clipped surrogate, dual clip, KL estimator, entropy)."""
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = pg - ENT_COEF * ent
    if ref is not None:
        loss = loss + KL_COEF * ref_kl(lp, ref, estimator)
    return loss


def make_case(N, H, V, dtype, bias, temperature, with_ref):
    hidden = torch.randn(N, H).to(dtype)
    weight = (3 * torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[[2, N - 1]] = -100
    leaves = [x.double().requires_grad_(True) for x in (hidden, weight, b) if x is not None]
    logp = torch.log_softmax((leaves[0] @ leaves[1].T + (leaves[2] if bias else 0.0)) / temperature, -1)
    valid = targets != -100
    lp = torch.where(valid, logp.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0], 0.0)
    p = logp.exp()
    ent = torch.where(valid, -(p * logp).sum(-1), 0.0)
    # old log-probs chosen so ratio = exp(lp - old) spans [0.3, 3.3]: both clip sides and the dual clip act
    log_ratio = torch.linspace(-1.2, 1.2, N)[torch.randperm(N)].double()
    old = (lp.detach() - log_ratio).float()
    adv = torch.randn(N) + torch.where(torch.arange(N) % 2 == 0, 0.5, -0.5)
    weights = torch.rand(N)
    weights[[0, 5]] = 0.0
    ref = (lp.detach() + 0.3 * torch.randn(N).double()).float() if with_ref else None
    return hidden, weight, b, targets, leaves, lp, ent, old, adv, weights, ref


CASES = [  # (kl_estimator, dual_clip, dtype, bias, temperature, with_ref, V)
    (0, None, torch.float32, True, 0.7, True, 37),
    (1, 2.0, torch.float32, False, 1.0, True, 37),
    (2, None, torch.float32, True, 1.3, True, 301),
    (2, 2.0, torch.float32, True, 0.7, True, 37),
    (3, 2.0, torch.float32, False, 0.7, True, 37),
    (0, None, torch.float32, True, 1.0, False, 37),
    (2, 2.0, torch.bfloat16, True, 0.7, True, 37),
    (3, None, torch.bfloat16, False, 1.0, True, 301),
    (1, None, torch.float16, True, 0.7, True, 37),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kl{c[0]}-dual{c[1]}-{c[2]}-b{c[3]}-T{c[4]}-ref{c[5]}-V{c[6]}")
def test_linear_ppo_loss_matches_reference(case):
    estimator, dual_clip, dtype, bias, temperature, with_ref, V = case
    N, H = 17, 24
    hidden, weight, b, targets, leaves, lp, ent, old, adv, weights, ref = make_case(
        N, H, V, dtype, bias, temperature, with_ref)
    valid = targets != -100
    o, a = old.double(), adv.double()
    r_loss = torch.where(valid, ref_token_loss(lp, ent, o, a, ref.double() if with_ref else None, estimator,
                                               dual_clip), 0.0)

    # the data must exercise every branch, or the test could not catch a wrong one
    ratio = torch.exp(lp.detach() - o)[valid]
    av = a[valid]
    assert ((av > 0) & (ratio > 1 + CLIP_HIGH)).any() and ((av < 0) & (ratio < 1 - CLIP_LOW)).any()
    assert ((ratio > 1 - CLIP_LOW) & (ratio < 1 + CLIP_HIGH)).any()
    if dual_clip is not None:
        assert ((av < 0) & (ratio > dual_clip)).any()

    loss, out_lp, out_ent, gh, gw, gb = P.linear_ppo_loss_fwd(
        hidden, weight, targets, b, old, adv, weights, ref, kl_coef=KL_COEF, kl_estimator=estimator,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=dual_clip,
        temperature=temperature, ignore_index=-100, need_grad=True, need_bias_grad=True)
    assert loss.dtype == out_lp.dtype == out_ent.dtype == torch.float32
    assert_close(out_lp, lp, dtype)
    assert_close(out_ent, ent, dtype)
    assert_close(loss, r_loss, dtype)
    r_grads = torch.autograd.grad((weights.double() * r_loss).sum(), leaves)
    assert gh.dtype == dtype and gw.dtype == torch.float32
    assert_close(gh, r_grads[0], dtype)
    assert_close(gw, r_grads[1], dtype)
    if bias:
        assert_close(gb, r_grads[2], dtype)
    else:
        assert gb is None
    assert (gh[~valid] == 0).all() and (gh[[0, 5]] == 0).all()  # ignored rows and zero-weight rows

    # without gradients: the split-V fused forward, same per-token outputs
    loss2, lp2, ent2, *grads = P.linear_ppo_loss_fwd(
        hidden, weight, targets, b, old, adv, weights, ref, kl_coef=KL_COEF, kl_estimator=estimator,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=dual_clip,
        temperature=temperature, ignore_index=-100, need_grad=False, need_bias_grad=False)
    assert grads == [None, None, None]
    assert_close(loss2, r_loss, dtype)
    assert_close(lp2, lp, dtype)
    assert_close(ent2, ent, dtype)


def test_linear_ppo_loss_zero_weights_and_no_bias_grad():
    """All-zero aggregation weights: zero gradients (never NaN); need_bias_grad=False gives no bias grad."""
    hidden, weight, b, targets, _, lp, ent, old, adv, _, ref = make_case(9, 16, 37, torch.float32, True, 1.0, True)
    loss, *_, gh, gw, gb = P.linear_ppo_loss_fwd(
        hidden, weight, targets, b, old, adv, torch.zeros(9), ref, kl_coef=KL_COEF, kl_estimator=2,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, temperature=1.0,
        ignore_index=-100, need_grad=True, need_bias_grad=False)
    assert torch.isfinite(loss).all() and (loss != 0).any()
    assert (gh == 0).all() and (gw == 0).all() and gb is None


def test_linear_ppo_loss_nan_propagates():
    """A NaN old log-prob makes that token's loss and its hidden gradient NaN, never silently finite."""
    hidden, weight, b, targets, _, lp, ent, old, adv, weights, _ = make_case(9, 16, 37, torch.float32, True, 1.0,
                                                                             False)
    old[4] = float("nan")
    weights[4] = 1.0
    loss, *_, gh, gw, gb = P.linear_ppo_loss_fwd(
        hidden, weight, targets, b, old, adv, weights, None, kl_coef=0.0, kl_estimator=0,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=2.0, temperature=1.0,
        ignore_index=-100, need_grad=True, need_bias_grad=True)
    assert torch.isnan(loss[4]) and torch.isnan(gh[4]).all()
    assert torch.isfinite(loss[[0, 1, 3, 5, 6, 7]]).all() and torch.isfinite(gh[[0, 1, 3, 5, 6, 7]]).all()


def test_linear_ppo_loss_per_row_advantages():
    """advantages (rows,) with adv_row_len = T: each token reads its row's advantage, also in a chunk that starts
    mid-row (N = 18 = 3 rows of 6 runs as chunks of 16 and 2 rows, so the second chunk starts at token 16)."""
    N, H, V, T = 18, 16, 37, 6
    hidden, weight, b, targets, leaves, lp, ent, old, _, weights, ref = make_case(N, H, V, torch.float32, True,
                                                                                  0.7, True)
    adv_rows = torch.tensor([1.5, -0.7, 0.4])
    adv_tok = adv_rows.repeat_interleave(T).double()  # (N,) row r's advantage on its T tokens
    valid = targets != -100
    r_loss = torch.where(valid, ref_token_loss(lp, ent, old.double(), adv_tok, ref.double(), 2, 2.0), 0.0)
    loss, out_lp, _, gh, gw, gb = P.linear_ppo_loss_fwd(
        hidden, weight, targets, b, old, adv_rows, weights, ref, adv_row_len=T, kl_coef=KL_COEF, kl_estimator=2,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=2.0, temperature=0.7,
        ignore_index=-100, need_grad=True, need_bias_grad=True)
    assert_close(loss, r_loss, torch.float32)
    r_grads = torch.autograd.grad((weights.double() * r_loss).sum(), leaves)
    for g, r in zip((gh, gw, gb), r_grads):
        assert_close(g, r, torch.float32)
    loss2, *_ = P.linear_ppo_loss_fwd(  # the split-V forward without gradients: one pass over all 18 tokens
        hidden, weight, targets, b, old, adv_rows, weights, ref, adv_row_len=T, kl_coef=KL_COEF, kl_estimator=2,
        entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=2.0, temperature=0.7,
        ignore_index=-100, need_grad=False, need_bias_grad=False)
    assert_close(loss2, r_loss, torch.float32)

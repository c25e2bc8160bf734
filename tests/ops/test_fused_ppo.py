"""fused_linear_ppo_loss: value and gradients against the float64 unfused composition, every backend."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.ops.backends import backends_for
from tests.tolerances import assert_close

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


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


# ----------------------------------------------------------- GRPO / GSPO: per-sequence advantages, sequence ratio


def _grpo_case(dtype=torch.float32, bias=True, temperature=1.0):
    """B = 5 rows of T = 7 with per-row log-ratio shifts, so that at the sequence level row 0 is clipped above
    (A > 0), row 1 below (A < 0), row 2 stays inside, row 3 has no valid token and row 4 is dual-clipped (A < 0,
    s > 3); ignored targets and mask holes inside rows."""
    B, T, H, V = 5, 7, 9, 37
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = (0.1 * torch.randn(V)).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T))
    targets[0, 3] = targets[2, 6] = -100
    with torch.no_grad():
        lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, b, temperature)
    shift = torch.tensor([0.4, -0.4, 0.05, 0.0, 1.3], dtype=torch.float64)[:, None]
    old = (lp - shift + 0.1 * torch.randn(B, T, dtype=torch.float64)).float()
    ref_lp = (lp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    adv_seq = torch.tensor([1.0, -1.0, 0.5, float("nan"), -2.0])  # row 3 has no valid token: NaN must not leak
    adv_tok = torch.randn(B, T) + adv_seq.nan_to_num()[:, None]
    mask = (torch.rand(B, T) > 0.2).float()
    mask[3] = 0
    mask[:, 0] = torch.tensor([1.0, 1, 1, 0, 1])
    return hidden, weight, b, targets, old, ref_lp, adv_seq, adv_tok, mask


GRPO_CONFIGS = [
    dict(clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0),
    dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.04, entropy_coef=0.01, temperature=0.8),
]


def _grads_vs_reference(loss, expected, params, leaves, dtype=torch.float32):
    assert_close(loss, expected, dtype)
    for g, r in zip(torch.autograd.grad(loss * 1.3, params), torch.autograd.grad(expected * 1.3, leaves)):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("cfg", range(len(GRPO_CONFIGS)))
@pytest.mark.parametrize("adv_kind", ["sequence", "token"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_ratio_matches_reference(backend, cfg, adv_kind, agg):
    """GSPO: values and gradients (through s_i into every token of the row) against the plain float64 loop."""
    kw = GRPO_CONFIGS[cfg]
    hidden, weight, b, targets, old, ref_lp, adv_seq, adv_tok, mask = _grpo_case(temperature=kw["temperature"])
    adv = adv_seq if adv_kind == "sequence" else adv_tok
    params = [p.requires_grad_(True) for p in (hidden, weight, b)]
    rl = ref_lp if kw["kl_coef"] else None
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, b, ref_logprobs=rl,
                                            ratio_level="sequence", agg=agg, backend=backend, **kw)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = ref.linear_ppo_loss(leaves[0], leaves[1], targets, old, adv, mask, leaves[2], rl,
                                   ratio_level="sequence", agg=agg, **kw)
    _grads_vs_reference(loss, expected, params, leaves)

    # the data exercises every branch of the sequence-level clip
    valid = (mask != 0) & (targets != -100)
    s = ref.sequence_ratio(ref.linear_logprobs_entropy(hidden.detach(), weight.detach(), targets, b.detach(),
                                                       kw["temperature"])[0], old, valid)
    assert s[0] > 1 + kw["clip_high"] and s[1] < 1 - kw["clip_low"] and 1 - 0.2 < s[2] < 1.2 and s[4] > 3.0
    assert s[3] == 1.0
    if adv_kind == "sequence":
        # a token is clipped when its row is: clipfrac is the token-weighted share of clipped rows
        rows_clipped = torch.tensor([1.0, 1, 0, 0, 1 if kw["dual_clip"] else 0])
        n = valid.sum(1).double()
        assert_close(stats["clipfrac"], (rows_clipped * n).sum() / n.sum(), torch.float32)
    assert_close(stats["ratio"], s[[0, 1, 2, 4]].mean(), torch.float32)  # mean s over rows with a valid token


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_per_sequence_advantages_equal_expanded(backend, ratio_level):
    """(B,) advantages give the loss, gradients and stats of the same advantages expanded to (B, T) (a
    different code path: the per-row kernel load / broadcast against the per-token one), and match the
    float64 reference."""
    hidden, weight, b, targets, old, ref_lp, adv_seq, _, mask = _grpo_case(temperature=0.8)
    kw = dict(GRPO_CONFIGS[1], ratio_level=ratio_level, agg="seq-mean-token-sum", ref_logprobs=ref_lp,
              backend=backend)
    params = [p.requires_grad_(True) for p in (hidden, weight, b)]
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv_seq, mask, b, **kw)
    expanded = adv_seq[:, None].expand(targets.shape)
    e_loss, e_stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, expanded, mask, b, **kw)
    torch.testing.assert_close(loss, e_loss, rtol=1e-6, atol=1e-7)
    assert stats.keys() == e_stats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], e_stats[k], rtol=1e-6, atol=1e-7)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    # the plain reference has no NaN guard (its where() would leak row 3's NaN into the gradient): give it 0
    expected = ref.linear_ppo_loss(leaves[0], leaves[1], targets, old, adv_seq.nan_to_num(0.0), mask, leaves[2],
                                   ref_lp, **{k: v for k, v in kw.items() if k not in ("ref_logprobs", "backend")})
    assert_close(loss, expected, torch.float32)
    grads, e_grads = torch.autograd.grad(loss, params), torch.autograd.grad(e_loss, params)
    for g, e, r in zip(grads, e_grads, torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        assert_close(g, r, torch.float32)


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_sequence_ratio_low_precision(backend, dtype):
    hidden, weight, b, targets, old, ref_lp, adv_seq, _, mask = _grpo_case(dtype, bias=False, temperature=0.8)
    kw = dict(GRPO_CONFIGS[1], ratio_level="sequence")
    params = [hidden.requires_grad_(True), weight.requires_grad_(True)]
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv_seq, mask, ref_logprobs=ref_lp,
                                        backend=backend, **kw)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = ref.linear_ppo_loss(leaves[0], leaves[1], targets, old, adv_seq, mask, None, ref_lp, **kw)
    assert_close(loss, expected, dtype)
    for g, r, p in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, leaves), params):
        assert g.dtype == p.dtype
        scale = r.abs().max().clamp(min=1e-3)
        assert_close(g / scale, r / scale, dtype)


def test_sequence_ratio_gradcheck():
    torch.manual_seed(4)
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, -100, 3], [4, 5, 6, 0]])
    old, ref_lp = -torch.rand(2, 4, dtype=torch.float64) - 1.5, -torch.rand(2, 4, dtype=torch.float64) - 1.5
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1.]])
    for adv in (torch.randn(2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)):
        def f(h, w, b, adv=adv):
            return ops.fused_linear_ppo_loss(h, w, targets, old, adv, mask, b, ref_logprobs=ref_lp, kl_coef=0.1,
                                             entropy_coef=0.05, clip_low=10.0, temperature=0.9,
                                             ratio_level="sequence", agg="seq-mean-token-sum-norm")[0]

        # clip_low=10 keeps every ratio inside the clip range: gradcheck needs a locally smooth function.
        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
def test_sequence_ratio_all_zero_mask(backend):
    hidden, weight, _, targets, old, _, adv, _ = _case(2, 5, 16, 37, torch.float32, bias=False)
    hidden.requires_grad_(True)
    old[:] = float("nan")
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, old, torch.full((2,), float("nan")),
                                            torch.zeros(2, 5), ratio_level="sequence", backend=backend)
    assert loss.item() == 0.0
    assert (torch.autograd.grad(loss, hidden)[0] == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_and_value_loss_every_agg(agg):
    """ops.aggregate and ops.value_loss take every agg of the fused loss (Dr. GRPO's normaliser included)."""
    l = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 6) > 0.3).float()
    mask[1] = 0
    out = ops.aggregate(l, mask, agg)
    expected = ref.aggregate(l, mask, agg)
    assert_close(out, expected)
    assert_close(torch.autograd.grad(out, l)[0], torch.autograd.grad(expected, l)[0])
    v, old, ret = l.detach().clone().requires_grad_(True), torch.randn(3, 6).double(), torch.randn(3, 6).double()
    vloss, _ = ops.value_loss(v, old, ret, mask, clip=0.2, agg=agg)
    v_expected = ref.aggregate(ref.value_token_loss(v, old, ret, 0.2), mask, agg)
    assert_close(vloss, v_expected)
    if agg == "seq-mean-token-sum-norm":  # the constant normaliser B * T, whatever the mask holds
        assert_close(out, (l * mask).sum() / 18)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_and_high_clip_fractions(backend):
    """clipfrac_low / clipfrac_high count the tokens clipped below (r < 1 - eps_low, A < 0) and above
    (r > 1 + eps_high, A > 0), written out plainly on the same log-probs."""
    torch.manual_seed(3)
    B, T, H, V = 3, 7, 16, 29
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / 4
    targets = torch.randint(0, V, (B, T))
    lp = ref.linear_logprobs_entropy(hidden, weight, targets)[0].float()
    old = lp + 0.5 * torch.randn(B, T)  # ratios spread around 1
    adv = torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.2).float()
    _, st = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                      backend=backend)
    r = torch.exp(lp - old)
    m = mask.bool()
    low = ((r < 0.8) & (adv < 0) & m).sum() / m.sum()
    high = ((r > 1.28) & (adv > 0) & m).sum() / m.sum()
    assert 0 < float(low) and 0 < float(high)  # the case exercises both sides
    torch.testing.assert_close(st["clipfrac_low"], low, atol=1e-6, rtol=0)
    torch.testing.assert_close(st["clipfrac_high"], high, atol=1e-6, rtol=0)


# ----------------------------------------------------------- on-policy (old_logprobs=None) and the torch chunking


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_old_none_matches_reference(backend, ratio_level):
    """old_logprobs=None: the loss, gradients and stats of the float64 reference given the policy's own log-probs
    (detached) as old: every ratio 1, gradient -A (+ the KL and entropy terms)."""
    hidden, weight, b, targets, _, ref_lp, adv_seq, _, mask = _grpo_case(temperature=0.8)
    kw = dict(GRPO_CONFIGS[1], ratio_level=ratio_level, agg="seq-mean-token-mean")
    params = [p.requires_grad_(True) for p in (hidden, weight, b)]
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, targets, None, adv_seq, mask, b, ref_logprobs=ref_lp,
                                            backend=backend, **kw)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    with torch.no_grad():
        own = ref.linear_logprobs_entropy(leaves[0], leaves[1], targets, leaves[2], kw["temperature"])[0]
    expected = ref.linear_ppo_loss(leaves[0], leaves[1], targets, own, adv_seq.nan_to_num(0.0), mask, leaves[2],
                                   ref_lp, **kw)
    _grads_vs_reference(loss, expected, params, leaves)
    assert stats["ratio"].item() == 1.0 and stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0


def test_torch_chunks_equal_one_chunk(monkeypatch):
    """The torch backend's token level in chunks of 3 rows (per-row advantages read across chunk boundaries,
    entropy and KL terms, bias, a frozen weight: no weight gradient formed) against the float64 reference, and
    against the same call in one chunk."""
    from rlhf_fast.ops import fused_ppo

    hidden, weight, b, targets, old, ref_lp, adv_seq, _, mask = _grpo_case(temperature=0.8)
    kw = dict(GRPO_CONFIGS[1], agg="token-mean", ref_logprobs=ref_lp, backend="torch")
    params = [hidden.requires_grad_(True), b.requires_grad_(True)]

    def run():
        loss, _ = ops.fused_linear_ppo_loss(hidden, weight, targets, old, adv_seq, mask, b, **kw)
        return loss, torch.autograd.grad(loss, params)

    one_loss, one_grads = run()
    monkeypatch.setattr(fused_ppo, "_TORCH_MIN_ROWS", 3)
    monkeypatch.setattr(fused_ppo, "_TORCH_CHUNK_ELEMS", 3 * weight.shape[0])
    loss, grads = run()
    torch.testing.assert_close(loss, one_loss, rtol=1e-6, atol=1e-7)
    for g, o in zip(grads, one_grads):
        torch.testing.assert_close(g, o, rtol=1e-5, atol=1e-7)
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = ref.linear_ppo_loss(leaves[0], weight.double(), targets, old, adv_seq.nan_to_num(0.0), mask,
                                   leaves[1], ref_lp, **{k: v for k, v in kw.items()
                                                         if k not in ("ref_logprobs", "backend")})
    assert_close(loss, expected, torch.float32)
    for g, r in zip(grads, torch.autograd.grad(expected, leaves)):
        assert_close(g, r, torch.float32)

"""fused_linear_kl: the exact per-token KL(pi || pi_ref) against the float64 reference on materialised logits
(log_softmax, exact sum over V), values and gradients, every backend; gradcheck; KL >= 0 and == 0 for equal
hidden states. Triton runs under the interpreter with tiny tiles, so several V tiles, V splits and backward
chunks are exercised (both chunking directions: N <= V and N > V)."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import logprobs as torch_logprobs  # the torch backend's block sizes (shared with fused_kl)
from tests.ops import reference as ref
from tests.ops.backends import backends_for
from tests.tolerances import assert_close

BACKENDS = backends_for("fused_linear_kl")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Interpreter-sized tiles (tl.dot needs >= 16) and a 1-byte chunk budget: V = 37 is 3 tiles of 16 in up to
    3 splits, and the backward runs one chunk per 16 columns (N <= V) or 16 rows (N > V). The torch backend
    gets blocks of 16 columns and 2 rows, so its online statistics merge across blocks too."""
    monkeypatch.setattr(torch_logprobs, "_BLOCK_V", 16)
    monkeypatch.setattr(torch_logprobs, "_BLOCK_ELEMS", 64)
    K = pytest.importorskip("rlhf_fast.kernels.logprobs")
    saved = dict(K.CONFIG)
    K.CONFIG.update(block_n=16, block_v=16, block_h=16, mm_block_m=16, mm_block_n=16, mm_block_k=16, mm_group_m=2,
                    chunk_bytes=1, target_programs=4)
    yield
    K.CONFIG.clear()
    K.CONFIG.update(saved)


def _case(B, T, H, V, dtype, bias, spread=1.0):
    hidden = torch.randn(B, T, H).to(dtype)
    ref_hidden = (hidden.float() + spread * torch.randn(B, T, H)).to(dtype)
    weight = (2 * torch.randn(V, H) / H**0.5).to(dtype)
    b = (0.5 * torch.randn(V)).to(dtype) if bias else None
    mask = (torch.rand(B, T) > 0.3).float()
    mask.view(-1)[0] = 1.0
    if mask.numel() > 2:
        mask.view(-1)[1] = 0.0  # a hole
    return hidden, ref_hidden, weight, b, mask


def _reference(hidden, ref_hidden, weight, b, mask, temperature, params):
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    expected = ref.linear_kl(leaves[0], ref_hidden, leaves[1], mask, leaves[2] if len(leaves) > 2 else None,
                             temperature)
    return leaves, expected


CASES = [  # (B, T, H, V, dtype, bias, temperature)
    (2, 5, 7, 37, torch.float32, True, 0.7),
    (1, 1, 5, 37, torch.float32, False, 1.0),  # T = 1
    (3, 20, 9, 37, torch.float32, True, 1.3),  # N = 60 > V: the backward chunks rows
    (2, 3, 17, 61, torch.float32, False, 1.0),
    (2, 5, 7, 37, torch.bfloat16, True, 0.7),
    (3, 20, 9, 37, torch.bfloat16, False, 1.0),
    (2, 4, 9, 37, torch.float16, True, 1.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}-V{c[3]}-{c[4]}-b{c[5]}-t{c[6]}")
def test_fused_kl_matches_reference(backend, case):
    B, T, H, V, dtype, bias, temperature = case
    hidden, ref_hidden, weight, b, mask = _case(B, T, H, V, dtype, bias)
    params = [p.requires_grad_(True) for p in (hidden, weight, b) if p is not None]
    kl = ops.fused_linear_kl(hidden, ref_hidden, weight, mask, b, temperature=temperature, backend=backend)
    leaves, expected = _reference(hidden, ref_hidden, weight, b, mask, temperature, params)
    assert kl.shape == (B, T) and kl.dtype == torch.float32
    assert_close(kl, expected, dtype)
    assert (kl[mask == 0] == 0).all() and (kl[mask != 0] >= 0).all()
    assert (expected[mask != 0] > 1e-2).all()  # the inputs differ: a KL of 0 everywhere would not pass
    g_out = torch.randn(B, T)  # an arbitrary incoming gradient, per token
    grads = torch.autograd.grad((kl * g_out).sum(), params)
    r_grads = torch.autograd.grad((expected * g_out.double()).sum(), leaves)
    for g, r, p in zip(grads, r_grads, params):
        assert g.dtype == p.dtype
        scale = r.abs().max().clamp(min=1e-3)
        assert_close(g / scale, r / scale, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kl_is_zero_for_equal_hidden(backend):
    """hidden == ref_hidden: bitwise-equal logits, so KL and its gradient are exactly 0 (no rounding residue)."""
    hidden, _, weight, b, mask = _case(2, 5, 7, 37, torch.float32, True)
    hidden.requires_grad_(True)
    kl = ops.fused_linear_kl(hidden, hidden.detach().clone(), weight, mask, b, temperature=0.9, backend=backend)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(torch.autograd.grad(kl.sum(), hidden)[0], torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kl_nonnegative_and_scale(backend):
    """KL >= 0 and small (second order in the difference) for near-equal hidden states. fp32 leaves an absolute
    error of a few eps times the logits' range (~1e-7 here, as log_softmax-then-subtract in fp32 does), so at
    KL ~ 1e-4 the relative tolerance is 1e-2."""
    hidden, ref_hidden, weight, b, mask = _case(2, 6, 8, 37, torch.float32, True, spread=1e-2)
    kl = ops.fused_linear_kl(hidden, ref_hidden, weight, mask, b, backend=backend)
    expected = ref.linear_kl(hidden, ref_hidden, weight, mask, b)
    assert (kl >= 0).all() and 0 < kl.max() < 1e-2
    torch.testing.assert_close(kl.double(), expected, rtol=1e-2, atol=1e-6)


def test_fused_kl_gradcheck():
    """gradcheck in hidden (float64, torch backend). weight and bias are not gradchecked by design: their
    gradient is the policy side's only (q held fixed), not the total derivative a numerical perturbation of
    the shared weight sees; test_fused_kl_float64_grads checks them against the reference's autograd."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    weight, bias = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1.]])
    assert torch.autograd.gradcheck(
        lambda h: ops.fused_linear_kl(h, ref_hidden, weight, mask, bias, temperature=0.8, backend="torch"), (hidden,))


def test_fused_kl_float64_grads():
    """Torch backend in float64: values and all three gradients equal the reference's autograd to 1e-9."""
    torch.manual_seed(6)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)  # gets no gradient
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 5) > 0.3).double()
    kl = ops.fused_linear_kl(hidden, ref_hidden, weight, mask, bias, temperature=1.7)
    expected = ref.linear_kl(hidden, ref_hidden, weight, mask, bias, 1.7)
    assert kl.dtype == torch.float64
    assert_close(kl, expected)
    g_out = torch.randn(2, 5, dtype=torch.float64)
    grads = torch.autograd.grad((kl * g_out).sum(), (hidden, weight, bias, ref_hidden), allow_unused=True)
    r_grads = torch.autograd.grad((expected * g_out).sum(), (hidden, weight, bias))
    for g, r in zip(grads[:3], r_grads):
        assert_close(g, r)
    assert grads[3] is None  # the reference is a constant


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max of a NaN row
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kl_masked_positions_never_enter(backend):
    """NaN and huge values in masked positions of ref_hidden give KL 0 there and leave the rest untouched."""
    hidden, ref_hidden, weight, b, mask = _case(2, 4, 7, 37, torch.float32, True)
    hidden.requires_grad_(True)
    ref_hidden[mask == 0] = float("nan")
    kl = ops.fused_linear_kl(hidden, ref_hidden, weight, mask, b, backend=backend)
    assert (kl[mask == 0] == 0).all() and torch.isfinite(kl).all()
    (g,) = torch.autograd.grad(kl.sum(), hidden)
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()
    expected = ref.linear_kl(hidden.detach(), ref_hidden.nan_to_num(0.0), weight, mask, b)
    assert_close(kl, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kl_all_zero_mask(backend):
    hidden, ref_hidden, weight, b, _ = _case(2, 3, 7, 37, torch.float32, False)
    hidden.requires_grad_(True)
    kl = ops.fused_linear_kl(hidden, ref_hidden, weight, torch.zeros(2, 3), backend=backend)
    assert torch.equal(kl, torch.zeros(2, 3))
    assert (torch.autograd.grad(kl.sum(), hidden)[0] == 0).all()

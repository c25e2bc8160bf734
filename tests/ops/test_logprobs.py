"""fused_linear_logprobs and logprobs_from_logits against the float64 reference, on every backend."""

import pytest
import torch

from rlhf_fast import ops
from tests.ops import reference as ref
from tests.ops.backends import backends_for
from tests.tolerances import assert_close

SHAPES = [(1, 1, 16, 37), (2, 17, 24, 301), (1, 1025, 8, 37)]  # (B, T, H, V)


def _inputs(B, T, H, V, dtype, bias, holes=True):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = (0.1 * torch.randn(V)).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T))
    if holes and T > 2:
        targets[:, 1] = -100
        targets[0, T // 2] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_fused_linear_logprobs_matches_reference(use_backend, backend, shape, dtype, bias, temperature):
    use_backend(backend)
    B, T, H, V = shape
    hidden, weight, b, targets = _inputs(B, T, H, V, dtype, bias)
    params = [x for x in (hidden, weight, b) if x is not None]
    for p in params:
        p.requires_grad_(True)
    lp, ent = ops.fused_linear_logprobs(hidden, weight, targets, b, temperature=temperature, return_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == targets.shape == ent.shape

    leaves = [p.detach().double().requires_grad_(True) for p in params]
    r_lp, r_ent = ref.linear_logprobs_entropy(leaves[0], leaves[1], targets, leaves[2] if bias else None,
                                              temperature)
    assert_close(lp, r_lp, dtype)
    assert_close(ent, r_ent, dtype)
    assert (lp[targets == -100] == 0).all() and (ent[targets == -100] == 0).all()

    # Gradient through both outputs, with distinct upstream weights.
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)
    r_grads = torch.autograd.grad((r_lp * g_lp.double()).sum() + (r_ent * g_ent.double()).sum(), leaves)
    for g, r, p in zip(grads, r_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        # Gradients are rounded once to the input dtype; compare in relative terms to their scale.
        scale = r.abs().max().clamp(min=1.0)
        assert_close(g / scale, r / scale, dtype)


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
def test_ignored_positions_get_no_gradient(use_backend, backend):
    use_backend(backend)
    hidden, weight, _, targets = _inputs(2, 5, 16, 37, torch.float32, False, holes=False)
    targets[1] = -100
    hidden.requires_grad_(True)
    lp = ops.fused_linear_logprobs(hidden, weight, targets)
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    assert (g[1] == 0).all() and (g[0] != 0).any()


def test_fused_linear_logprobs_gradcheck():
    """float64 gradcheck of the autograd Function (torch backend), through logprobs and entropy."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -100, 10], [0, 3, 7]])

    def f(h, w, b):
        lp, ent = ops.fused_linear_logprobs(h, w, targets, b, temperature=0.8, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_logprobs_from_logits_gradcheck():
    logits = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, -100, 8], [0, 0, 5, 4]])
    assert torch.autograd.gradcheck(
        lambda x: ops.logprobs_from_logits(x, targets, temperature=1.3, return_entropy=True), (logits,))


@pytest.mark.parametrize("backend", backends_for("logprobs_from_logits"))
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 17, 301)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_from_logits_matches_reference(use_backend, backend, shape, dtype, temperature):
    use_backend(backend)
    B, T, V = shape
    logits = (3 * torch.randn(B, T, V)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    targets[-1, -1] = -100
    lp, ent = ops.logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=True)
    leaf = logits.detach().double().requires_grad_(True)
    r_lp, r_ent = ref.logprobs_entropy(leaf, targets, temperature)
    assert_close(lp, r_lp, dtype)
    assert_close(ent, r_ent, dtype)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (g,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), logits)
    (r,) = torch.autograd.grad((r_lp * g_lp.double()).sum() + (r_ent * g_ent.double()).sum(), leaf)
    assert g.dtype == dtype
    assert_close(g, r, dtype)


def test_logprobs_only_matches_with_entropy():
    hidden, weight, _, targets = _inputs(2, 7, 16, 37, torch.float32, False)
    lp = ops.fused_linear_logprobs(hidden, weight, targets)
    lp2, _ = ops.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    torch.testing.assert_close(lp, lp2)


def test_nan_in_hidden_comes_out_nan():
    hidden, weight, _, targets = _inputs(1, 4, 16, 37, torch.float32, False, holes=False)
    hidden[0, 2, 3] = float("nan")
    lp = ops.fused_linear_logprobs(hidden, weight, targets)
    assert torch.isnan(lp[0, 2]) and torch.isfinite(lp[0, [0, 1, 3]]).all()


def test_blocks_smaller_than_vocab(monkeypatch):
    """The torch backend's online log-sum-exp across several vocabulary and token blocks."""
    from rlhf_fast.ops import logprobs as mod

    monkeypatch.setattr(mod, "_BLOCK_V", 16)
    monkeypatch.setattr(mod, "_BLOCK_ELEMS", 64)
    hidden, weight, b, targets = _inputs(2, 9, 8, 37, torch.float64, True)
    hidden.requires_grad_(True)
    lp, ent = ops.fused_linear_logprobs(hidden, weight, targets, b, return_entropy=True)
    r_lp, r_ent = ref.linear_logprobs_entropy(hidden, weight, targets, b)
    assert_close(lp, r_lp)
    assert_close(ent, r_ent)
    g = torch.autograd.grad((lp + ent).sum(), hidden)[0]
    r = torch.autograd.grad((r_lp + r_ent).sum(), hidden)[0]
    assert_close(g, r)


# ------------------------------------------------------------------------ a frozen head: the one-pass torch path
def _graph_names(t: torch.Tensor, depth: int = 3) -> str:
    """The autograd node names within `depth` steps of t (which op produced it, under the reshapes)."""
    names, frontier = [], [t.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names += [f.name() for f in frontier]
        frontier = [n for f in frontier for n, _ in f.next_functions]
    return " ".join(names)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_frozen_head_one_pass_matches_reference(monkeypatch, dtype, bias, temperature, blocks):
    """A head needing no gradient (LoRA) takes fused_linear_logprobs_frozen on the torch backend: values and the
    hidden-state gradient through both outputs against the float64 reference and against the two-pass op."""
    from rlhf_fast.ops import logprobs as mod

    if blocks == "small":  # several vocabulary blocks (the rescaled accumulators) and token blocks
        monkeypatch.setattr(mod, "_BLOCK_V", 16)
        monkeypatch.setattr(mod, "_BLOCK_ELEMS", 64)
    hidden, weight, b, targets = _inputs(2, 9, 8, 37, dtype, bias)
    hidden.requires_grad_(True)
    lp, ent = ops.fused_linear_logprobs(hidden, weight, targets, b, temperature=temperature, return_entropy=True,
                                        backend="torch")
    assert "fused_linear_logprobs_frozen" in _graph_names(lp)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (g,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), hidden)
    assert g.dtype == dtype and (g[targets == -100] == 0).all()

    h64 = hidden.detach().double().requires_grad_(True)
    r_lp, r_ent = ref.linear_logprobs_entropy(h64, weight.double(), targets, b.double() if bias else None,
                                              temperature)
    (r,) = torch.autograd.grad((r_lp * g_lp.double()).sum() + (r_ent * g_ent.double()).sum(), h64)
    check_dtype = torch.float32 if dtype == torch.float64 else dtype  # fp32 tolerances bound the float64 run too
    assert_close(lp, r_lp, check_dtype)
    assert_close(ent, r_ent, check_dtype)
    scale = r.abs().max().clamp(min=1.0)
    assert_close(g / scale, r / scale, check_dtype)

    # the two-pass op on the same inputs (its backward recomputes the logits)
    h2 = hidden.detach().reshape(-1, 8).requires_grad_(True)
    t1 = targets.reshape(-1)
    lp2, ent2, _ = mod.linear_logprobs_op(h2, weight, b, t1, float(temperature), -100, True, "torch")
    (g2,) = torch.autograd.grad((lp2 * g_lp.reshape(-1)).sum() + (ent2 * g_ent.reshape(-1)).sum(), h2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.reshape(-1), lp2, **tol)
    torch.testing.assert_close(ent.reshape(-1), ent2, **tol)
    torch.testing.assert_close(g.reshape(-1, 8).float(), g2.float(), **(tol if dtype != torch.bfloat16 else
                                                                         dict(rtol=2e-2, atol=2e-2)))


def test_frozen_head_gradcheck():
    torch.manual_seed(2)
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    targets = torch.tensor([[1, -100, 10], [0, 3, 7]])
    lp = ops.fused_linear_logprobs(hidden, weight, targets, bias, backend="torch")
    assert "fused_linear_logprobs_frozen" in _graph_names(lp)
    assert torch.autograd.gradcheck(
        lambda h: ops.fused_linear_logprobs(h, weight, targets, bias, temperature=0.8, return_entropy=True,
                                            backend="torch"), (hidden,))


def test_trainable_head_keeps_the_two_pass_path():
    """A weight (or bias) that needs a gradient gets it: the frozen path is chosen only without one."""
    hidden, weight, b, targets = _inputs(1, 4, 8, 13, torch.float64, True)
    hidden.requires_grad_(True)
    b.requires_grad_(True)
    lp = ops.fused_linear_logprobs(hidden, weight, targets, b, backend="torch")
    assert "frozen" not in _graph_names(lp) and "fused_linear_logprobs" in _graph_names(lp)
    gh, gb = torch.autograd.grad(lp.sum(), (hidden, b))
    r_lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, b)
    rh, rb = torch.autograd.grad(r_lp.sum(), (hidden, b))
    assert_close(gh, rh)
    assert_close(gb, rb)
    with torch.no_grad():  # no gradient at all: the plain forward
        assert ops.fused_linear_logprobs(hidden, weight, targets, b, backend="torch").grad_fn is None


def test_frozen_op_refuses_a_weight_gradient():
    from rlhf_fast.ops.logprobs import linear_logprobs_frozen_op

    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    lp, _, _, _ = linear_logprobs_frozen_op(hidden, weight, None, torch.tensor([0, 6, 2]), 1.0, -100, False)
    with pytest.raises(RuntimeError, match="no weight or bias gradient"):
        lp.sum().backward()

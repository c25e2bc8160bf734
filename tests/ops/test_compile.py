"""torch.compile(fullgraph=True) sees through the fused ops (torch.library custom ops): compiled equals eager,
values and gradients, and both equal the float64 reference; torch.library.opcheck on every custom op.

Shapes are tiny: compiling costs seconds on a 2-core CPU. Triton runs under the interpreter: the custom op is
opaque to the compiler, which traces its fake implementation and calls the real one at run time.
"""

import shutil

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch
from rlhf_fast.ops.fused_kl import linear_kl_backward_op, linear_kl_op
from rlhf_fast.ops.fused_ppo import linear_ppo_loss_op
from rlhf_fast.ops.gae import gae_op, kl_penalized_gae_op
from rlhf_fast.ops.logprobs import (
    linear_logprobs_backward_op,
    linear_logprobs_frozen_op,
    linear_logprobs_op,
    logits_logprobs_backward_op,
    logits_logprobs_op,
)
from tests.ops import reference as ref
from tests.tolerances import assert_close

HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None  # inductor on the CPU writes C++
HAVE_TRITON = _dispatch._available("gae", "triton", torch.device("cpu"))[0]  # the interpreter, on the CPU
HAVE_NATIVE = _dispatch.native_module() is not None


def _skips(compiler, backend):
    marks = []
    if compiler == "inductor" and not HAVE_CXX:
        marks.append(pytest.mark.skip(reason="inductor needs a C++ compiler"))
    if backend == "triton" and not HAVE_TRITON:
        marks.append(pytest.mark.skip(reason="triton (TRITON_INTERPRET=1 on the CPU) is not available"))
    if backend == "native" and not HAVE_NATIVE:
        marks.append(pytest.mark.skip(reason="rlhf_fast._C is not built"))
    return marks


def case(compiler, backend):
    return pytest.param(compiler, backend, marks=_skips(compiler, backend), id=f"{compiler}-{backend}")


def backend_case(backend):
    return pytest.param(backend, marks=_skips(None, backend), id=backend)


# Inductor is paired with the torch backend only (plus the Triton PPO op, whose graph differs): every other
# backend is the same opaque custom op to the compiler, and each inductor compile costs seconds here.
CASES = [case("aot_eager", "torch"), case("aot_eager", "triton"), case("inductor", "torch")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()  # each test compiles its own functions; stale cache entries would only add guards
    yield
    torch.compiler.reset()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _linear_inputs(B=2, T=3, H=8, V=13, bias=True):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    b = (0.1 * torch.randn(V)).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (B, T))
    targets[0, 1] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize("compiler,backend", CASES)
def test_fused_linear_logprobs_compiles(compiler, backend):
    hidden, weight, bias, targets = _linear_inputs()
    g_lp, g_ent = torch.randn(2, 3), torch.randn(2, 3)

    def f(h, w, b):
        lp, ent = ops.fused_linear_logprobs(h, w, targets, b, temperature=0.7, return_entropy=True,
                                            backend=backend)
        return lp, ent, (lp * g_lp + ent * g_ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    *outs, loss = compiled(hidden, weight, bias)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    *e_outs, e_loss = f(hidden, weight, bias)
    e_grads = torch.autograd.grad(e_loss, (hidden, weight, bias))
    for a, b in zip([*outs, *grads], [*e_outs, *e_grads]):
        _close(a, b)
    r_lp, _ = ref.linear_logprobs_entropy(hidden.detach(), weight.detach(), targets, bias.detach(), 0.7)
    assert_close(outs[0], r_lp, torch.float32)


@pytest.mark.parametrize("compiler,backend", CASES)
def test_logprobs_from_logits_compiles(compiler, backend):
    logits = torch.randn(2, 3, 13, requires_grad=True)
    targets = torch.randint(0, 13, (2, 3))

    def f(z):
        lp, ent = ops.logprobs_from_logits(z, targets, return_entropy=True, backend=backend)
        return lp, (lp + 0.5 * ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    lp, loss = compiled(logits)
    (g,) = torch.autograd.grad(loss, logits)
    e_lp, e_loss = f(logits)
    (e_g,) = torch.autograd.grad(e_loss, logits)
    _close(lp, e_lp)
    _close(g, e_g)
    assert_close(lp, ref.logprobs_entropy(logits.detach(), targets)[0], torch.float32)


def _ppo_inputs():
    hidden, weight, bias, targets = _linear_inputs()
    with torch.no_grad():
        lp, _ = ref.linear_logprobs_entropy(hidden, weight, targets, bias)
    old = (lp + 0.3 * torch.randn(2, 3, dtype=torch.float64)).float()
    ref_lp = (lp + 0.2 * torch.randn(2, 3, dtype=torch.float64)).float()
    adv, mask = torch.randn(2, 3), torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    return hidden, weight, bias, targets, old, ref_lp, adv, mask


@pytest.mark.parametrize("compiler,backend", CASES + [case("inductor", "triton")])
def test_fused_linear_ppo_loss_compiles(compiler, backend):
    hidden, weight, bias, targets, old, ref_lp, adv, mask = _ppo_inputs()
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0,
              temperature=0.9, agg="seq-mean-token-mean", backend=backend)

    def f(h, w, b):
        loss, stats = ops.fused_linear_ppo_loss(h, w, targets, old, adv, mask, b, **kw)
        return loss, stats

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    loss, stats = compiled(hidden, weight, bias)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight, bias))
    e_loss, e_stats = f(hidden, weight, bias)
    e_grads = torch.autograd.grad(e_loss * 1.7, (hidden, weight, bias))
    _close(loss, e_loss)
    assert stats.keys() == e_stats.keys()
    for k in stats:
        _close(stats[k], e_stats[k])
    for a, b in zip(grads, e_grads):
        _close(a, b)


@pytest.mark.parametrize("compiler,backend", CASES)
def test_fused_linear_ppo_loss_grpo_options_compile(compiler, backend):
    """GSPO's sequence ratio (two passes on Triton), (B,) advantages and Dr. GRPO's agg, compiled == eager."""
    hidden, weight, bias, targets, old, ref_lp, adv, mask = _ppo_inputs()
    adv_seq = adv[:, 0].contiguous()

    def f(h, w, b):
        out = []
        for level in ("sequence", "token"):
            loss, stats = ops.fused_linear_ppo_loss(h, w, targets, old, adv_seq, mask, b, ref_logprobs=ref_lp,
                                                    kl_coef=0.1, dual_clip=3.0, ratio_level=level,
                                                    agg="seq-mean-token-sum-norm", backend=backend)
            out += [loss, stats["ratio"], stats["clipfrac"]]
        return out

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    outs = compiled(hidden, weight, bias)
    grads = torch.autograd.grad(outs[0] + 2 * outs[3], (hidden, weight, bias))
    e_outs = f(hidden, weight, bias)
    e_grads = torch.autograd.grad(e_outs[0] + 2 * e_outs[3], (hidden, weight, bias))
    for a, b in zip([*outs, *grads], [*e_outs, *e_grads]):
        _close(a, b)
    leaves = [x.detach().double() for x in (hidden, weight, bias)]
    expected = ref.linear_ppo_loss(*leaves[:2], targets, old, adv_seq, mask, leaves[2], ref_lp, kl_coef=0.1,
                                   dual_clip=3.0, ratio_level="sequence", agg="seq-mean-token-sum-norm")
    assert_close(outs[0], expected, torch.float32)


@pytest.mark.parametrize("compiler,backend", CASES)
def test_fused_linear_kl_compiles(compiler, backend):
    hidden, weight, bias, _ = _linear_inputs()
    ref_hidden = torch.randn(2, 3, 8)
    mask = torch.tensor([[1.0, 0, 1], [1, 1, 1]])
    g_out = torch.randn(2, 3)

    def f(h, w, b):
        kl = ops.fused_linear_kl(h, ref_hidden, w, mask, b, temperature=0.7, backend=backend)
        return kl, (kl * g_out).sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    kl, loss = compiled(hidden, weight, bias)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    e_kl, e_loss = f(hidden, weight, bias)
    e_grads = torch.autograd.grad(e_loss, (hidden, weight, bias))
    for a, b in zip([kl, *grads], [e_kl, *e_grads]):
        _close(a, b)
    assert_close(kl, ref.linear_kl(hidden.detach(), ref_hidden, weight.detach(), mask, bias.detach(), 0.7),
                 torch.float32)


@pytest.mark.parametrize("compiler,backend", CASES + [case("aot_eager", "native")])
def test_gae_ops_compile(compiler, backend):
    B, T = 2, 7
    rewards, values, lp, ref_lp = (torch.randn(B, T) for _ in range(4))
    scores, mask = torch.randn(B), (torch.rand(B, T) > 0.3).float()

    def f(r, v, lp, rl, s, m):
        adv, ret = ops.gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
        out = ops.kl_penalized_gae(lp, rl, v, s, m, kl_coef=0.05, gamma=0.9, lam=0.8, estimator="k3",
                                   backend=backend)
        return (adv, ret, *out)

    args = (rewards, values, lp, ref_lp, scores, mask)
    outs = torch.compile(f, fullgraph=True, backend=compiler)(*args)
    for a, b in zip(outs, f(*args)):
        _close(a, b)
    r_adv, r_ret = ref.gae_loop(rewards, values, mask, 0.9, 0.8)
    assert_close(outs[0], r_adv, torch.float32)
    assert_close(outs[1], r_ret, torch.float32)


def test_compiled_function_follows_use_backend():
    """use_backend and backend= are guarded: a different choice retraces, and the graph carries it."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def f(r, v, m):
        return ops.gae(r, v, m, gamma=0.9, lam=0.8)

    compiled = torch.compile(f, fullgraph=True, backend=record)
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with ops.use_backend("torch"):
        a = compiled(r, v, m)
    with ops.use_backend("native" if _dispatch.native_module() is not None else "auto"):
        b = compiled(r, v, m)
    with ops.use_backend("torch"):
        c = compiled(r, v, m)
    assert len(graphs) == 2 and "'torch'" in graphs[0] and "'torch'" not in graphs[1]
    for x, y in zip(a + b, c + c):
        _close(x, y)


def test_range_check_is_skipped_when_compiling():
    """Eager reads the targets (host sync) and raises; compiled code never reads data, as documented."""
    hidden, weight, _, targets = _linear_inputs(bias=False)
    targets[0, 0] = 13  # out of range: the torch backend clamps its gathers, so this is safe to run
    with pytest.raises(ValueError, match="targets must be in"):
        ops.fused_linear_logprobs(hidden, weight, targets, backend="torch")
    compiled = torch.compile(lambda h, w: ops.fused_linear_logprobs(h, w, targets, backend="torch"),
                             fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(hidden, weight)).all()


# -------------------------------------------------------------------------------------------------- opcheck


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["torch", backend_case("triton")])
@pytest.mark.parametrize("need_entropy", [True, False])
def test_opcheck_fused_linear_logprobs(backend, need_entropy):
    hidden, weight, bias, targets = _linear_inputs(B=1, T=4, H=4, V=7)
    h2, t1 = hidden.detach().reshape(4, 4).requires_grad_(True), targets.reshape(4)
    _opcheck(linear_logprobs_op, (h2, weight, bias, t1, 0.8, -100, need_entropy, backend))
    lp, ent, lse = linear_logprobs_op(h2.detach(), weight.detach(), bias.detach(), t1, 0.8, -100, True,
                                               backend)
    _opcheck(linear_logprobs_backward_op,
             (h2.detach(), weight.detach(), bias.detach(), t1, lse, ent, torch.randn(4),
              torch.randn(4) if need_entropy else None, 0.8, -100, True, need_entropy, backend))


@pytest.mark.parametrize("need_entropy", [True, False])
def test_opcheck_fused_linear_logprobs_frozen(need_entropy):
    hidden, weight, bias, targets = _linear_inputs(B=1, T=4, H=4, V=7)
    h2, t1 = hidden.detach().reshape(4, 4).requires_grad_(True), targets.reshape(4)
    _opcheck(linear_logprobs_frozen_op, (h2, weight.detach(), bias.detach(), t1, 0.8, -100, need_entropy))


def test_frozen_head_compiles():
    """The frozen-head path (hidden needs a gradient, the head none) traced whole by torch.compile."""
    hidden, weight, bias, targets = _linear_inputs()
    weight, bias = weight.detach(), bias.detach()
    g_lp, g_ent = torch.randn(2, 3), torch.randn(2, 3)

    def f(h):
        lp, ent = ops.fused_linear_logprobs(h, weight, targets, bias, temperature=0.7, return_entropy=True,
                                            backend="torch")
        return (lp * g_lp + ent * g_ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_eager,) = torch.autograd.grad(f(hidden), hidden)
    (g_comp,) = torch.autograd.grad(compiled(hidden), hidden)
    torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.parametrize("backend", ["torch", backend_case("triton")])
def test_opcheck_logprobs_from_logits(backend):
    logits, targets = torch.randn(4, 7, requires_grad=True), torch.tensor([0, 6, -100, 3])
    _opcheck(logits_logprobs_op, (logits, targets, 1.3, -100, True, backend))
    lp, ent, lse = logits_logprobs_op(logits.detach(), targets, 1.3, -100, True, backend)
    _opcheck(logits_logprobs_backward_op,
             (logits.detach(), targets, lse, ent, torch.randn(4), torch.randn(4), 1.3, -100, backend))


@pytest.mark.parametrize("backend", [backend_case("triton")])
def test_opcheck_fused_linear_ppo_loss(backend):
    hidden, weight, bias, targets, old, ref_lp, adv, mask = _ppo_inputs()
    n = targets.numel()
    h2 = hidden.detach().reshape(n, -1).requires_grad_(True)
    w = torch.full((n,), 1.0 / n)
    args = (h2, weight, bias, targets.reshape(n), old.reshape(n), adv.reshape(n), 0, w, ref_lp.reshape(n), 0.1, 2,
            0.01, 0.2, 0.28, 3.0, 0.9, -100, True, True, True, backend)
    _opcheck(linear_ppo_loss_op, args)
    per_row = (*args[:5], adv[:, 0].contiguous(), 3, *args[7:])  # (B,) advantages, one per row of T = 3
    _opcheck(linear_ppo_loss_op, per_row)


@pytest.mark.parametrize("backend", ["torch", backend_case("triton")])
def test_opcheck_fused_linear_kl(backend):
    hidden, weight, bias, _ = _linear_inputs(B=1, T=4, H=4, V=7)
    h2 = hidden.detach().reshape(4, 4).requires_grad_(True)
    r2, valid = torch.randn(4, 4), torch.tensor([True, False, True, True])
    _opcheck(linear_kl_op, (h2, r2, weight, bias, valid, 0.8, backend))
    kl, lse_p, lse_q = linear_kl_op(h2.detach(), r2, weight.detach(), bias.detach(), valid, 0.8, backend)
    _opcheck(linear_kl_backward_op, (h2.detach(), r2, weight.detach(), bias.detach(), valid, lse_p, lse_q, kl,
                                     torch.randn(4), 0.8, True, True, backend))


@pytest.mark.parametrize("backend", ["torch", backend_case("native"), backend_case("triton")])
def test_opcheck_gae_ops(backend):
    B, T = 2, 5
    valid = torch.rand(B, T) > 0.3
    _opcheck(gae_op, (torch.randn(B, T), torch.randn(B, T), valid, 0.9, 0.8, backend))
    _opcheck(kl_penalized_gae_op, (torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), torch.randn(B),
                                       valid, 0.05, 0.9, 0.8, 1, backend))

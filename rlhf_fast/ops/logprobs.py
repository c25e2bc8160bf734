"""Per-token log-probabilities (and entropy) of chosen tokens.

`fused_linear_logprobs` goes straight from hidden states and the lm_head weight: it never materialises the
(N, V) logits. `logprobs_from_logits` is the same op for callers that already hold logits.

Backends: torch (chunked over tokens and vocabulary with an online log-sum-exp; CPU default),
triton (kernels/logprobs.py; CUDA default, or CPU under TRITON_INTERPRET=1). Both run inside the custom ops
rlhf_fast::fused_linear_logprobs and rlhf_fast::logprobs_from_logits (+ _backward), registered with
torch.library with fake implementations and autograd, so torch.compile traces straight through (_library.py).
A frozen head on the torch backend runs rlhf_fast::fused_linear_logprobs_frozen: one pass over the logits, whose
forward also returns each token's derivatives in its hidden state, so the backward forms no logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast.ops import _checks, _dispatch, _library, cpu_gemm

# Torch backend block sizes: a (rows x vocab) fp32 block of at most _BLOCK_ELEMS elements (4 MiB) lives at a
# time, so the extra memory stays small whatever N and V are.
_BLOCK_V = 4096
_BLOCK_ELEMS = 1 << 20


def _blocks(n: int, v: int) -> tuple[int, int]:
    bv = min(v, _BLOCK_V)
    bn = max(1, min(n, _BLOCK_ELEMS // bv))
    return bn, bv


def _logits_block(h, weight, bias, v0, v1, temperature, dtype):
    z = cpu_gemm.linear(h.to(dtype), weight[v0:v1].to(dtype))  # (bn, bv)
    if bias is not None:
        z = z + bias[v0:v1].to(dtype)
    return z / temperature if temperature != 1.0 else z


def torch_linear_logprobs_fwd(hidden, weight, targets, bias, temperature, ignore_index, need_entropy):
    """Torch backend forward. hidden (N, H), weight (V, H) -> logprobs (N,), entropy (N,) | None, lse (N,)."""
    lp, ent, lse, _, _ = _online_pass(hidden, weight, targets, bias, temperature, ignore_index, need_entropy, False)
    return lp, ent, lse


def torch_linear_logprobs_frozen_fwd(hidden, weight, targets, bias, temperature, ignore_index, need_entropy):
    """Torch backend, one pass for a frozen head: torch_linear_logprobs_fwd that also returns each token's
    derivatives in its own hidden state, so the backward needs no logits.

    With z = (h W^T + b) / T, p = softmax(z), y the target and zbar = sum_v p_v z_v:
        dlogp/dh = (W_y - sum_v p_v W_v) / T
        dH/dh    = -(sum_v p_v z_v W_v - zbar sum_v p_v W_v) / T      (H: the entropy)
    Both depend on the token's own row only, so for any loss of the log-probs (and entropies) the backward is
    grad_h = g_lp * dlogp/dh + g_H * dH/dh; the weight and bias gradients are not available (frozen head).
    Returns logprobs (N,), entropy (N,) | None, dlogp/dh (N, H), dH/dh (N, H) | None, in the compute dtype.
    """
    lp, ent, _, d_lp, d_ent = _online_pass(hidden, weight, targets, bias, temperature, ignore_index, need_entropy,
                                           True)
    return lp, ent, d_lp, d_ent


def _online_pass(hidden, weight, targets, bias, temperature, ignore_index, need_entropy, hidden_grads):
    """The torch backend's forward over (row, vocabulary) blocks with an online log-sum-exp. hidden_grads: also
    accumulate sum_v e_v W_v (and sum_v e_v z_v W_v for the entropy), rescaled with the running max as the sums
    are, for the frozen head's derivatives (torch_linear_logprobs_frozen_fwd).
    Returns lp (N,), ent (N,) | None, lse (N,), dlogp/dh (N, H) | None, dH/dh (N, H) | None."""
    n, v, hd = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype, dev = _checks.compute_dtype(hidden, weight), hidden.device
    lse = torch.empty(n, dtype=dtype, device=dev)
    lp = torch.empty(n, dtype=dtype, device=dev)
    ent = torch.empty(n, dtype=dtype, device=dev) if need_entropy else None
    d_lp = torch.empty(n, hd, dtype=dtype, device=dev) if hidden_grads else None
    d_ent = torch.empty(n, hd, dtype=dtype, device=dev) if hidden_grads and need_entropy else None
    valid = targets != ignore_index
    bn, bv = _blocks(n, v)
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h, t = hidden[r0:r1], targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=dev)
        s = torch.zeros_like(m)  # sum exp(z - m)
        sz = torch.zeros_like(m)  # sum exp(z - m) * z
        zt = torch.zeros_like(m)  # target logit
        aw = torch.zeros(r1 - r0, hd, dtype=dtype, device=dev) if hidden_grads else None  # sum exp(z - m) W_v
        azw = torch.zeros_like(aw) if d_ent is not None else None  # sum exp(z - m) z W_v
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            z = _logits_block(h, weight, bias, v0, v1, temperature, dtype)
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(dim=1)
            ez = e * z if need_entropy else None
            if need_entropy:
                sz = sz * scale + ez.sum(dim=1)
            if hidden_grads:
                w = weight[v0:v1].to(dtype)
                aw = torch.addmm(aw * scale[:, None], e, w)
                if azw is not None:
                    azw = torch.addmm(azw * scale[:, None], ez, w)
            m = m_new
            inside = (t >= v0) & (t < v1)
            zt = torch.where(inside, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zt)
        lse[r0:r1] = m + torch.log(s)
        lp[r0:r1] = zt - lse[r0:r1]
        if need_entropy:
            ent[r0:r1] = lse[r0:r1] - sz / s
        if hidden_grads:
            ok = valid[r0:r1, None]
            pw = aw / s[:, None]  # sum_v p_v W_v
            w_t = weight[t.clamp(0, v - 1)].to(dtype)  # (bn, H) the targets' rows
            d_lp[r0:r1] = torch.where(ok, (w_t - pw) / temperature, 0.0)
            if d_ent is not None:
                zbar = (sz / s)[:, None]
                d_ent[r0:r1] = torch.where(ok, -(azw / s[:, None] - zbar * pw) / temperature, 0.0)
    lp = torch.where(valid, lp, 0.0)
    if need_entropy:
        ent = torch.where(valid, ent, 0.0)
    return lp, ent, lse, d_lp, d_ent


def torch_linear_logprobs_bwd(hidden, weight, targets, bias, lse, entropy, grad_logprobs, grad_entropy,
                              temperature, ignore_index, need_weight_grad, need_bias_grad):
    """Torch backend backward: recomputes logits block by block.

    dlogp/dz_j = [j == target] - p_j;  dH/dz_j = -p_j (z_j - lse + H);  z = logits / temperature.
    Returns grad_hidden (N, H) in hidden.dtype, grad_weight (V, H) and grad_bias (V,) in the compute dtype.
    """
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _checks.compute_dtype(hidden, weight)
    valid = targets != ignore_index
    g_lp = torch.where(valid, grad_logprobs.to(dtype), 0.0) if grad_logprobs is not None else None
    g_h = torch.where(valid, grad_entropy.to(dtype), 0.0) if grad_entropy is not None else None
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight_grad else None
    grad_bias = torch.zeros(v, dtype=dtype, device=weight.device) if need_bias_grad else None
    bn, bv = _blocks(n, v)
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h, t, l_ = hidden[r0:r1], targets[r0:r1], lse[r0:r1, None]
        h_c = h.to(dtype)
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            z = _logits_block(h, weight, bias, v0, v1, temperature, dtype)
            p = torch.exp(z - l_)
            gz = torch.zeros_like(z)
            if g_lp is not None:
                gz -= g_lp[r0:r1, None] * p
                inside = valid[r0:r1] & (t >= v0) & (t < v1)
                cols = (t - v0).clamp(0, v1 - v0 - 1)[:, None]
                gz.scatter_add_(1, cols, torch.where(inside, g_lp[r0:r1], 0.0)[:, None])
            if g_h is not None:
                gz -= g_h[r0:r1, None] * p * (z - l_ + entropy[r0:r1, None])
            if temperature != 1.0:
                gz = gz / temperature
            grad_hidden[r0:r1] += cpu_gemm.matmul(gz, weight[v0:v1].to(dtype))
            if grad_weight is not None:
                grad_weight[v0:v1] += gz.T @ h_c
            if grad_bias is not None:
                grad_bias[v0:v1] += gz.sum(dim=0)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def torch_logits_logprobs_fwd(logits, targets, temperature, ignore_index, need_entropy):
    """Torch backend forward on held logits (N, V), chunked over rows to bound the fp32 copy."""
    n, v = logits.shape
    dtype = _checks.compute_dtype(logits)
    lse = torch.empty(n, dtype=dtype, device=logits.device)
    lp = torch.empty(n, dtype=dtype, device=logits.device)
    ent = torch.empty(n, dtype=dtype, device=logits.device) if need_entropy else None
    bn = max(1, _BLOCK_ELEMS // max(v, 1))
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        z = logits[r0:r1].to(dtype) / temperature  # (bn, V)
        l_ = torch.logsumexp(z, dim=1)
        lse[r0:r1] = l_
        t = targets[r0:r1].clamp(0, v - 1)
        lp[r0:r1] = z.gather(1, t[:, None])[:, 0] - l_
        if need_entropy:
            ent[r0:r1] = l_ - (torch.softmax(z, dim=1) * z).sum(dim=1)
    valid = targets != ignore_index
    lp = torch.where(valid, lp, 0.0)
    if need_entropy:
        ent = torch.where(valid, ent, 0.0)
    return lp, ent, lse


def torch_logits_logprobs_bwd(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature,
                              ignore_index):
    n, v = logits.shape
    dtype = _checks.compute_dtype(logits)
    valid = targets != ignore_index
    grad = torch.empty_like(logits)
    bn = max(1, _BLOCK_ELEMS // max(v, 1))
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        z = logits[r0:r1].to(dtype) / temperature
        p = torch.exp(z - lse[r0:r1, None])
        gz = torch.zeros_like(z)
        ok = valid[r0:r1]
        if grad_logprobs is not None:
            g = torch.where(ok, grad_logprobs[r0:r1].to(dtype), 0.0)
            gz -= g[:, None] * p
            gz.scatter_add_(1, targets[r0:r1].clamp(0, v - 1)[:, None], g[:, None])
        if grad_entropy is not None:
            g = torch.where(ok, grad_entropy[r0:r1].to(dtype), 0.0)
            gz -= g[:, None] * p * (z - lse[r0:r1, None] + entropy[r0:r1, None])
        grad[r0:r1] = (gz / temperature).to(logits.dtype)
    return grad


def _kernels():
    from rlhf_fast.kernels import logprobs as k

    return k


# ------------------------------------------------------------------------------------- custom ops (_library.py)


@_library.custom_op("fused_linear_logprobs")
def linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                       ignore_index: int, need_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64 -> logprobs (N,), entropy (N,)
    (empty (0,) unless need_entropy), lse (N,), in the compute dtype. Backends: torch | triton."""
    fwd = torch_linear_logprobs_fwd if backend == "torch" else _kernels().linear_logprobs_fwd
    lp, ent, lse = fwd(hidden, weight, targets, bias, temperature, ignore_index, need_entropy)
    return lp, _library.none_as_empty(ent, lp), lse


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, need_entropy, backend):
    n, dtype = hidden.shape[0], _checks.compute_dtype(hidden, weight)
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n if need_entropy else 0, dtype=dtype),
            hidden.new_empty(n, dtype=dtype))


@_library.custom_op("fused_linear_logprobs_backward")
def linear_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                                entropy: Tensor | None, grad_logprobs: Tensor, grad_entropy: Tensor | None,
                                temperature: float, ignore_index: int, need_weight_grad: bool,
                                need_bias_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_logprobs * logprobs + grad_entropy * entropy) in hidden (N, H), weight (V, H) and
    bias (V,), each in its input's dtype; the weight and bias ones empty (0,) unless asked for."""
    bwd = torch_linear_logprobs_bwd if backend == "torch" else _kernels().linear_logprobs_bwd
    gh, gw, gb = bwd(hidden, weight, targets, bias, lse, entropy, grad_logprobs, grad_entropy, temperature,
                     ignore_index, need_weight_grad, need_bias_grad)
    gw = gw.to(weight.dtype) if need_weight_grad else weight.new_empty(0)
    gb = gb.to(bias.dtype) if need_bias_grad else weight.new_empty(0)
    return gh, gw, gb


@linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      need_weight_grad, need_bias_grad, backend):
    gw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if need_bias_grad else weight.new_empty(0)
    return hidden.new_empty(hidden.shape), gw, gb


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, need_entropy, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.cfg = (temperature, ignore_index, need_entropy, backend)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an output nobody used comes back as None: its term is skipped


def _linear_backward(ctx, grad_lp, grad_ent, _grad_lse):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, need_entropy, backend = ctx.cfg
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not need_entropy:
        grad_ent = None
    if grad_lp is None:
        grad_lp = torch.zeros_like(lse)
    gh, gw, gb = linear_logprobs_backward_op(hidden, weight, bias, targets, lse, ent if need_entropy else None,
                                             grad_lp, grad_ent, temperature, ignore_index, need_w,
                                             bias is not None and need_b, backend)
    return (gh if need_h else None, gw if need_w else None, gb if bias is not None and need_b else None,
            None, None, None, None, None)


linear_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@_library.custom_op("fused_linear_logprobs_frozen")
def linear_logprobs_frozen_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                              temperature: float, ignore_index: int,
                              need_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch backend, frozen head (torch_linear_logprobs_frozen_fwd): hidden (N, H) -> logprobs (N,), entropy (N,)
    (empty (0,) unless need_entropy), dlogp/dh (N, H), dH/dh (N, H) (empty unless need_entropy), compute dtype.
    Differentiable in hidden only."""
    lp, ent, d_lp, d_ent = torch_linear_logprobs_frozen_fwd(hidden, weight, targets, bias, temperature,
                                                            ignore_index, need_entropy)
    return lp, _library.none_as_empty(ent, lp), d_lp, _library.none_as_empty(d_ent, lp)


@linear_logprobs_frozen_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, need_entropy):
    n, dtype = hidden.shape[0], _checks.compute_dtype(hidden, weight)
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n if need_entropy else 0, dtype=dtype),
            hidden.new_empty(hidden.shape, dtype=dtype),
            hidden.new_empty(hidden.shape if need_entropy else (0,), dtype=dtype))


def _frozen_setup_context(ctx, inputs, output):
    hidden, need_entropy = inputs[0], inputs[6]
    _, _, d_lp, d_ent = output
    ctx.save_for_backward(d_lp, d_ent)
    ctx.cfg = (need_entropy, hidden.dtype)
    ctx.mark_non_differentiable(d_lp, d_ent)
    ctx.set_materialize_grads(False)


def _frozen_backward(ctx, grad_lp, grad_ent, _g1, _g2):
    d_lp, d_ent = ctx.saved_tensors
    need_entropy, dtype = ctx.cfg
    if any(ctx.needs_input_grad[1:3]):
        raise RuntimeError("fused_linear_logprobs_frozen has no weight or bias gradient: fused_linear_logprobs "
                           "takes this path only for a head that needs none")
    gh = grad_lp.to(d_lp.dtype)[:, None] * d_lp if grad_lp is not None else torch.zeros_like(d_lp)
    if need_entropy and grad_ent is not None:
        gh += grad_ent.to(gh.dtype)[:, None] * d_ent
    return gh.to(dtype), None, None, None, None, None, None


linear_logprobs_frozen_op.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


@_library.custom_op("logprobs_from_logits")
def logits_logprobs_op(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int, need_entropy: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V), targets (N,) int64 -> logprobs (N,), entropy (N,) (empty (0,) unless need_entropy),
    lse (N,), in the compute dtype. Backends: torch | triton."""
    fwd = torch_logits_logprobs_fwd if backend == "torch" else _kernels().logits_logprobs_fwd
    lp, ent, lse = fwd(logits, targets, temperature, ignore_index, need_entropy)
    return lp, _library.none_as_empty(ent, lp), lse


@logits_logprobs_op.register_fake
def _(logits, targets, temperature, ignore_index, need_entropy, backend):
    n, dtype = logits.shape[0], _checks.compute_dtype(logits)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n if need_entropy else 0, dtype=dtype),
            logits.new_empty(n, dtype=dtype))


@_library.custom_op("logprobs_from_logits_backward")
def logits_logprobs_backward_op(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor | None,
                                grad_logprobs: Tensor, grad_entropy: Tensor | None, temperature: float,
                                ignore_index: int, backend: str) -> Tensor:
    """grad_logits (N, V) in logits.dtype of sum(grad_logprobs * logprobs + grad_entropy * entropy)."""
    bwd = torch_logits_logprobs_bwd if backend == "torch" else _kernels().logits_logprobs_bwd
    return bwd(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index)


@logits_logprobs_backward_op.register_fake
def _(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits)


def _logits_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, need_entropy, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.cfg = (temperature, ignore_index, need_entropy, backend)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _logits_backward(ctx, grad_lp, grad_ent, _grad_lse):
    logits, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, need_entropy, backend = ctx.cfg
    if not need_entropy:
        grad_ent = None
    if grad_lp is None:
        grad_lp = torch.zeros_like(lse)
    grad = logits_logprobs_backward_op(logits, targets, lse, ent if need_entropy else None, grad_lp, grad_ent,
                                       temperature, ignore_index, backend)
    return grad, None, None, None, None, None


logits_logprobs_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


# ----------------------------------------------------------------------------------------------- public ops


def _check_common(targets, temperature, ignore_index):
    _checks.integer("targets", targets)
    _checks.positive("temperature", temperature)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    checks: bool | None = None,
    backend: str | None = None,
):
    """Log-probability of each target token, straight from hidden states and the lm_head weight.

    Args:
        hidden: (..., H) fp32/bf16/fp16, the final hidden states.
        weight: (V, H), the lm_head weight, same dtype as hidden.
        targets: (...) int64 token ids in [0, V), or ignore_index.
        bias: optional (V,) lm_head bias.
        temperature: > 0; the logits are divided by it (sampling temperature of the rollout).
        ignore_index: targets equal to it give logprob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        checks: read targets to check their range (a host sync); default on, off with checks=False or
            RLHF_FAST_CHECKS=0 for CUDA-graph capture. Always skipped inside torch.compile'd code
            (torch.compiler.is_compiling()): a compiled graph does not sync with the host.
        backend: "auto" | "torch" | "triton" | "native", or None (default): use_backend's, else
            RLHF_FAST_BACKEND's, else auto. An explicit backend that cannot serve the call raises
            NotImplementedError (native: no kernel for this op; triton: float64 inputs, or the CPU without
            TRITON_INTERPRET=1).

    Returns:
        logprobs (...) fp32: log_softmax((hidden @ weight.T + bias) / temperature)[target];
        with return_entropy, (logprobs, entropy) with entropy = -sum_v p_v log p_v of the same distribution.
        Differentiable in hidden, weight and bias through both outputs. The (N, V) logits are never
        materialised: the vocabulary is tiled with an online log-sum-exp, and the backward recomputes them.
        On the torch backend a frozen head (weight and bias needing no gradient, as under LoRA) takes one pass
        instead: the forward also forms each token's derivative in its own hidden state, (N, H), and the backward
        only scales it (rlhf_fast::fused_linear_logprobs_frozen).
    """
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    _check_common(targets, temperature, ignore_index)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        _checks.floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    device = _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    _checks.targets_in_range(targets, weight.shape[0], ignore_index, checks)
    backend = _dispatch.select("fused_linear_logprobs", device, _checks.compute_dtype(hidden, weight), backend)

    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    if backend == "torch" and torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad and (
            bias is None or not bias.requires_grad):  # a frozen head (LoRA): one pass, no logits in the backward
        lp, ent, _, _ = linear_logprobs_frozen_op(h2, weight.contiguous(), bias, t1, float(temperature), ignore_index,
                                                  bool(return_entropy))
    else:
        lp, ent, _ = linear_logprobs_op(h2, weight.contiguous(), bias, t1, float(temperature), ignore_index,
                                        bool(return_entropy), backend)
    lp = lp.reshape(shape)
    return (lp, ent.reshape(shape)) if return_entropy else lp


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    checks: bool | None = None,
    backend: str | None = None,
):
    """Log-probability of each target from logits the caller already holds.

    Drop-in for TRL's selective_log_softmax + entropy_from_logits.

    Args:
        logits: (..., V) fp32/bf16/fp16.
        targets: (...) int64 in [0, V) or ignore_index.
        temperature, ignore_index, return_entropy, checks, backend: as in fused_linear_logprobs.

    Returns:
        logprobs (...) fp32 = log_softmax(logits / temperature)[target], or (logprobs, entropy).
        Differentiable in logits through both outputs.
    """
    _checks.floating("logits", logits)
    _check_common(targets, temperature, ignore_index)
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    device = _checks.same_device(logits=logits, targets=targets)
    _checks.targets_in_range(targets, logits.shape[-1], ignore_index, checks)
    backend = _dispatch.select("logprobs_from_logits", device, _checks.compute_dtype(logits), backend)
    shape = targets.shape
    l2 = logits.reshape(-1, logits.shape[-1]).contiguous()  # (N, V)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    lp, ent, _ = logits_logprobs_op(l2, t1, float(temperature), ignore_index, bool(return_entropy), backend)
    lp = lp.reshape(shape)
    return (lp, ent.reshape(shape)) if return_entropy else lp

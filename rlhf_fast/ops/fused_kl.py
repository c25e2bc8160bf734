"""The exact per-token KL between the policy and the reference softmax over the whole vocabulary, straight from
hidden states and one shared lm_head weight, without materialising the (N, V) logits.

With z_p = (hidden @ weight.T + bias) / temperature, z_q the same with ref_hidden, p = softmax(z_p),
q = softmax(z_q):
    KL(p || q) = sum_v p_v (log p_v - log q_v)
The forward keeps per row, over V tiles with online rescaling, the running maxima m_p, m_q, the sums
s_p = sum e^(z_p - m_p), s_q = sum e^(z_q - m_q) and u = sum e^(z_p - m_p) ((z_p - m_p) - (z_q - m_q)); then
KL = u / s_p + log s_q - log s_p, lse_p = m_p + log s_p, lse_q = m_q + log s_q. Every term is a difference of
O(log V)-sized numbers centred on the row maxima, not of O(|z|)-sized logits, and hidden == ref_hidden gives
bitwise-equal z_p and z_q, so u = 0, s_p = s_q and KL = 0 exactly. When the maxima move (m -> m'), u becomes
e^(m_p - m_p') (u + ((m_p - m_p') - (m_q - m_q')) s_p), as the entropy statistic of ops/logprobs.py does.

Backward (the reference side is a constant: no gradient to ref_hidden, nor to weight or bias through z_q).
d p_v / d z_j = p_v ([v == j] - p_j), so
    dKL/dz_p,j = sum_v p_v ([v == j] - p_j) (log p_v - log q_v + 1) = p_j (log p_j - log q_j - KL)
and dKL/dlogits_j = p_j (log p_j - log q_j - KL) / temperature, with log p_j = z_p,j - lse_p and
log q_j = z_q,j - lse_q recomputed tile by tile from the saved (N,) lse_p, lse_q and KL. Then with G the logit
gradient (N, V): grad_hidden = G @ W, grad_weight = G^T @ hidden, grad_bias = sum_n G.

Flops (N tokens, H hidden, V vocabulary): forward 4NHV (two logits GEMMs), backward 8NHV (4NHV to recompute both,
2NHV each for grad_hidden and grad_weight). Backends: torch (chunked over tokens and vocabulary like
ops/logprobs.py; at most two (rows x vocab) blocks of _BLOCK_ELEMS live at a time) and triton
(kernels/fused_kl.py), both inside the custom ops rlhf_fast::fused_linear_kl (+ _backward), registered with
torch.library with fake implementations and autograd, so torch.compile traces straight through (_library.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast.ops import _checks, _dispatch, _library
from rlhf_fast.ops.logprobs import _blocks, _logits_block

_NEG_BIG = -1.0e30  # running-max start: finite, so (m_old - m_new) * 0 stays 0 (not -inf * 0 = NaN)


def torch_linear_kl_fwd(hidden, ref_hidden, weight, bias, valid, temperature):
    """Torch backend forward. hidden, ref_hidden (N, H), weight (V, H), valid (N,) bool -> kl (N,) (0 where not
    valid), lse_p (N,), lse_q (N,), in the compute dtype."""
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _checks.compute_dtype(hidden, weight)
    kl = torch.empty(n, dtype=dtype, device=hidden.device)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    bn, bv = _blocks(n, v)
    bn = max(1, bn // 2)  # two logit blocks (policy and reference) live at a time
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h, hr = hidden[r0:r1], ref_hidden[r0:r1]
        m_p = torch.full((r1 - r0,), _NEG_BIG, dtype=dtype, device=hidden.device)
        m_q = m_p.clone()
        s_p, s_q, u = torch.zeros_like(m_p), torch.zeros_like(m_p), torch.zeros_like(m_p)
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            zp = _logits_block(h, weight, bias, v0, v1, temperature, dtype)  # (bn, bv)
            zq = _logits_block(hr, weight, bias, v0, v1, temperature, dtype)  # (bn, bv)
            mp_new = torch.maximum(m_p, zp.max(dim=1).values)
            mq_new = torch.maximum(m_q, zq.max(dim=1).values)
            a_p = torch.exp(m_p - mp_new)
            ep = torch.exp(zp - mp_new[:, None])
            # p_v = 0 (a -inf logit, or underflow) contributes nothing, even where log q_v = -inf
            diff = torch.where(ep > 0, ep * ((zp - mp_new[:, None]) - (zq - mq_new[:, None])), 0.0)
            u = a_p * (u + ((m_p - mp_new) - (m_q - mq_new)) * s_p) + diff.sum(dim=1)
            s_p = a_p * s_p + ep.sum(dim=1)
            s_q = torch.exp(m_q - mq_new) * s_q + torch.exp(zq - mq_new[:, None]).sum(dim=1)
            m_p, m_q = mp_new, mq_new
        log_sp, log_sq = torch.log(s_p), torch.log(s_q)
        kl[r0:r1] = u / s_p + log_sq - log_sp
        lse_p[r0:r1] = m_p + log_sp
        lse_q[r0:r1] = m_q + log_sq
    return torch.where(valid, kl, 0.0), lse_p, lse_q


def torch_linear_kl_bwd(hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl, grad_kl, temperature,
                        need_weight_grad, need_bias_grad):
    """Torch backend backward: recomputes both logit blocks; G = grad_kl p (log p - log q - KL) / temperature
    (module docstring). Returns grad_hidden (N, H) in hidden.dtype, grad_weight (V, H) and grad_bias (V,) (None
    unless asked for) in the compute dtype."""
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _checks.compute_dtype(hidden, weight)
    g = torch.where(valid, grad_kl.to(dtype), 0.0)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight_grad else None
    grad_bias = torch.zeros(v, dtype=dtype, device=weight.device) if need_bias_grad else None
    bn, bv = _blocks(n, v)
    bn = max(1, bn // 2)
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h, hr = hidden[r0:r1], ref_hidden[r0:r1]
        h_c, ok = h.to(dtype), valid[r0:r1, None]
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            logp = _logits_block(h, weight, bias, v0, v1, temperature, dtype) - lse_p[r0:r1, None]
            logq = _logits_block(hr, weight, bias, v0, v1, temperature, dtype) - lse_q[r0:r1, None]
            p = torch.exp(logp)
            gz = torch.where(ok & (p > 0), p * (logp - logq - kl[r0:r1, None]), 0.0) * g[r0:r1, None]
            if temperature != 1.0:
                gz = gz / temperature
            grad_hidden[r0:r1] += gz @ weight[v0:v1].to(dtype)
            if grad_weight is not None:
                grad_weight[v0:v1] += gz.T @ h_c
            if grad_bias is not None:
                grad_bias[v0:v1] += gz.sum(dim=0)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def _kernels():
    from rlhf_fast.kernels import fused_kl as k

    return k


# ------------------------------------------------------------------------------------- custom ops (_library.py)


@_library.custom_op("fused_linear_kl")
def linear_kl_op(hidden: Tensor, ref_hidden: Tensor, weight: Tensor, bias: Tensor | None, valid: Tensor,
                 temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """hidden, ref_hidden (N, H), weight (V, H), bias (V,) | None, valid (N,) bool -> kl (N,) (0 where not
    valid), lse_p (N,), lse_q (N,), in the compute dtype. Backends: torch | triton."""
    fwd = torch_linear_kl_fwd if backend == "torch" else _kernels().linear_kl_fwd
    return fwd(hidden, ref_hidden, weight, bias, valid, temperature)


@linear_kl_op.register_fake
def _(hidden, ref_hidden, weight, bias, valid, temperature, backend):
    n, dtype = hidden.shape[0], _checks.compute_dtype(hidden, weight)
    return tuple(hidden.new_empty(n, dtype=dtype) for _ in range(3))


@_library.custom_op("fused_linear_kl_backward")
def linear_kl_backward_op(hidden: Tensor, ref_hidden: Tensor, weight: Tensor, bias: Tensor | None, valid: Tensor,
                          lse_p: Tensor, lse_q: Tensor, kl: Tensor, grad_kl: Tensor, temperature: float,
                          need_weight_grad: bool, need_bias_grad: bool, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_kl * kl) through the policy side in hidden (N, H), weight (V, H) and bias (V,),
    each in its input's dtype; the weight and bias ones empty (0,) unless asked for."""
    bwd = torch_linear_kl_bwd if backend == "torch" else _kernels().linear_kl_bwd
    gh, gw, gb = bwd(hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl, grad_kl, temperature,
                     need_weight_grad, need_bias_grad)
    gw = gw.to(weight.dtype) if need_weight_grad else weight.new_empty(0)
    gb = gb.to(bias.dtype) if need_bias_grad else weight.new_empty(0)
    return gh, gw, gb


@linear_kl_backward_op.register_fake
def _(hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl, grad_kl, temperature, need_weight_grad,
      need_bias_grad, backend):
    gw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if need_bias_grad else weight.new_empty(0)
    return hidden.new_empty(hidden.shape), gw, gb


def _kl_setup_context(ctx, inputs, output):
    hidden, ref_hidden, weight, bias, valid, temperature, backend = inputs
    kl, lse_p, lse_q = output
    ctx.save_for_backward(hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl)
    ctx.cfg = (temperature, backend)
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.set_materialize_grads(False)


def _kl_backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
    hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl = ctx.saved_tensors
    temperature, backend = ctx.cfg
    need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and bias is not None
    if grad_kl is None:
        grad_kl = torch.zeros_like(kl)
    gh, gw, gb = linear_kl_backward_op(hidden, ref_hidden, weight, bias, valid, lse_p, lse_q, kl, grad_kl,
                                       temperature, need_w, need_b, backend)
    # ref_hidden: a constant (the frozen reference), no gradient
    return gh if need_h else None, None, gw if need_w else None, gb if need_b else None, None, None, None


linear_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)


# ------------------------------------------------------------------------------------------------ public op


def fused_linear_kl(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
    checks: bool | None = None,
) -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) over the whole vocabulary, from the policy's and the reference's hidden
    states through one shared lm_head, without materialising the (B, T, V) logits.

    Args:
        hidden: (B, T, H) fp32/bf16/fp16 final hidden states of the policy (differentiable).
        ref_hidden: (B, T, H) the reference model's, same dtype; a constant (it gets no gradient).
        weight: (V, H) the shared lm_head weight, same dtype.  bias: optional (V,) lm_head bias.
        mask: (B, T) 0/1 (float or bool); KL is 0, with no gradient, where it is 0.
        temperature: > 0; both logits are divided by it.
        backend: "auto" | "torch" | "triton" | "native", or None (default): use_backend's, else
            RLHF_FAST_BACKEND's, else auto. An explicit backend that cannot serve the call raises
            NotImplementedError (native: no kernel for this op; triton: float64 inputs, or the CPU without
            TRITON_INTERPRET=1).
        checks: accepted for the ops' common signature; this op's checks read no tensor data (no host sync),
            so they always run and it has no effect.

    Returns:
        (B, T) fp32 (float64 for float64 inputs on the torch backend):
        KL_t = sum_v p_v (log p_v - log q_v), p = softmax((hidden @ weight.T + bias) / temperature), q the same
        with ref_hidden; >= 0, and exactly 0 where hidden == ref_hidden. Differentiable in hidden, weight and
        bias through the policy side only: the reference's logits are a constant, as if its lm_head were a
        frozen copy (the gradient in weight is that of KL with q held fixed). The vocabulary is tiled with
        online statistics; the backward recomputes the logits (formulas in the module docstring).
    """
    _checks.floating("hidden", hidden)
    _checks.floating("ref_hidden", ref_hidden)
    _checks.floating("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (B, T, H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                         f"got {tuple(ref_hidden.shape)}")
    for name, x in (("weight", weight), ("ref_hidden", ref_hidden)):
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {x.dtype} must equal hidden dtype {hidden.dtype}")
    shape = hidden.shape[:-1]
    _checks.mask("mask", mask, shape)
    if bias is not None:
        _checks.floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    temperature = _checks.positive("temperature", temperature)
    device = _checks.same_device(hidden=hidden, ref_hidden=ref_hidden, weight=weight, mask=mask, bias=bias)
    dtype = _checks.compute_dtype(hidden, weight)
    backend = _dispatch.select("fused_linear_kl", device, dtype, backend)

    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    r2 = ref_hidden.detach().reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    valid = (mask != 0).reshape(-1).contiguous()  # (N,)
    kl, _, _ = linear_kl_op(h2, r2, weight.contiguous(), bias, valid, temperature, backend)
    return kl.reshape(shape)

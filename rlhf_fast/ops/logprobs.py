"""Per-token log-probabilities (and entropy) of chosen tokens.

`fused_linear_logprobs` goes straight from hidden states and the lm_head weight: it never materialises the
(N, V) logits. `logprobs_from_logits` is the same op for callers that already hold logits.

Backends: torch (chunked over tokens and vocabulary with an online log-sum-exp; CPU default),
triton (kernels/logprobs.py; CUDA default, or CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _dispatch
from rlhf_fast.ops import _checks

# Torch backend block sizes: a (rows x vocab) fp32 block of at most _BLOCK_ELEMS elements (4 MiB) lives at a
# time, so the extra memory stays small whatever N and V are.
_BLOCK_V = 4096
_BLOCK_ELEMS = 1 << 20


def _blocks(n: int, v: int) -> tuple[int, int]:
    bv = min(v, _BLOCK_V)
    bn = max(1, min(n, _BLOCK_ELEMS // bv))
    return bn, bv


def _logits_block(h, weight, bias, v0, v1, temperature, dtype):
    z = h.to(dtype) @ weight[v0:v1].to(dtype).T  # (bn, bv)
    if bias is not None:
        z = z + bias[v0:v1].to(dtype)
    return z / temperature if temperature != 1.0 else z


def torch_linear_logprobs_fwd(hidden, weight, targets, bias, temperature, ignore_index, need_entropy):
    """Torch backend forward. hidden (N, H), weight (V, H) -> logprobs (N,), entropy (N,) | None, lse (N,)."""
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _checks.compute_dtype(hidden, weight)
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    lp = torch.empty(n, dtype=dtype, device=hidden.device)
    ent = torch.empty(n, dtype=dtype, device=hidden.device) if need_entropy else None
    bn, bv = _blocks(n, v)
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h, t = hidden[r0:r1], targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=hidden.device)
        s = torch.zeros_like(m)  # sum exp(z - m)
        sz = torch.zeros_like(m)  # sum exp(z - m) * z
        zt = torch.zeros_like(m)  # target logit
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            z = _logits_block(h, weight, bias, v0, v1, temperature, dtype)
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(dim=1)
            if need_entropy:
                sz = sz * scale + (e * z).sum(dim=1)
            m = m_new
            inside = (t >= v0) & (t < v1)
            zt = torch.where(inside, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zt)
        lse[r0:r1] = m + torch.log(s)
        lp[r0:r1] = zt - lse[r0:r1]
        if need_entropy:
            ent[r0:r1] = lse[r0:r1] - sz / s
    valid = targets != ignore_index
    lp = torch.where(valid, lp, 0.0)
    if need_entropy:
        ent = torch.where(valid, ent, 0.0)
    return lp, ent, lse


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
            grad_hidden[r0:r1] += gz @ weight[v0:v1].to(dtype)
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


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd for fused_linear_logprobs on flattened inputs. Backward recomputes the logits block-wise."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, need_entropy, backend):
        fwd = torch_linear_logprobs_fwd if backend == "torch" else _kernels().linear_logprobs_fwd
        lp, ent, lse = fwd(hidden, weight, targets, bias, temperature, ignore_index, need_entropy)
        if ent is None:
            ent = lp.new_zeros(0)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.cfg = (temperature, ignore_index, need_entropy, backend)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        temperature, ignore_index, need_entropy, backend = ctx.cfg
        if not need_entropy:
            grad_ent = None
        bwd = torch_linear_logprobs_bwd if backend == "torch" else _kernels().linear_logprobs_bwd
        gh, gw, gb = bwd(hidden, weight, targets, bias, lse, ent if need_entropy else None, grad_lp, grad_ent,
                         temperature, ignore_index, ctx.needs_input_grad[1],
                         bias is not None and ctx.needs_input_grad[2])
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None


class LogitsLogprobsFunction(torch.autograd.Function):
    """Autograd for logprobs_from_logits on flattened (N, V) logits."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, need_entropy, backend):
        fwd = torch_logits_logprobs_fwd if backend == "torch" else _kernels().logits_logprobs_fwd
        lp, ent, lse = fwd(logits, targets, temperature, ignore_index, need_entropy)
        if ent is None:
            ent = lp.new_zeros(0)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.cfg = (temperature, ignore_index, need_entropy, backend)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        temperature, ignore_index, need_entropy, backend = ctx.cfg
        bwd = torch_logits_logprobs_bwd if backend == "torch" else _kernels().logits_logprobs_bwd
        grad = bwd(logits, targets, lse, ent if need_entropy else None, grad_lp,
                   grad_ent if need_entropy else None, temperature, ignore_index)
        return grad, None, None, None, None, None


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
            RLHF_FAST_CHECKS=0 for CUDA-graph capture.

    Returns:
        logprobs (...) fp32: log_softmax((hidden @ weight.T + bias) / temperature)[target];
        with return_entropy, (logprobs, entropy) with entropy = -sum_v p_v log p_v of the same distribution.
        Differentiable in hidden, weight and bias through both outputs. The (N, V) logits are never
        materialised: the vocabulary is tiled with an online log-sum-exp, and the backward recomputes them.
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
    backend = _dispatch.select("fused_linear_logprobs", device)

    shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    lp, ent = LinearLogprobsFunction.apply(h2, weight.contiguous(), bias, t1, float(temperature), ignore_index,
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
):
    """Log-probability of each target from logits the caller already holds.

    Drop-in for TRL's selective_log_softmax + entropy_from_logits.

    Args:
        logits: (..., V) fp32/bf16/fp16.
        targets: (...) int64 in [0, V) or ignore_index.
        temperature, ignore_index, return_entropy, checks: as in fused_linear_logprobs.

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
    backend = _dispatch.select("logprobs_from_logits", device)
    shape = targets.shape
    l2 = logits.reshape(-1, logits.shape[-1]).contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    lp, ent = LogitsLogprobsFunction.apply(l2, t1, float(temperature), ignore_index, bool(return_entropy), backend)
    lp = lp.reshape(shape)
    return (lp, ent.reshape(shape)) if return_entropy else lp

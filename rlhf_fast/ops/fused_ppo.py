"""The PPO policy loss in one pass from hidden states and the lm_head weight.

Per token, with lp the log-prob of the target under (hidden @ weight.T + bias) / temperature and H the
entropy of that distribution:
    l = ppo_clipped_surrogate(lp, old_logprobs, advantages) + kl_coef * kl_penalty(lp, ref_logprobs)
        - entropy_coef * H
then aggregated with `agg`. The loss is linear in l with mask-only weights w, so dL/dlp and dL/dH are known
in closed form per token once lp and H are.

Triton backend (the custom op rlhf_fast::fused_linear_ppo_loss, see _library.py): one pass computes the
logits chunk once, and the forward produces the gradients for hidden, weight and bias right away; the
backward only scales them by the incoming gradient (no second lm_head GEMM pass).
Torch backend: the composition of the custom op rlhf_fast::fused_linear_logprobs (chunked, logits never
materialised) and the per-token formula above in plain torch, under autograd, so its gradient is that of
the unfused composition by construction. It makes the same two passes over the logits as a forward that
also produced the gradients (torch must recompute them either way), but keeps only (N,) statistics between
forward and backward instead of the (N, H) and (V, H) gradients; and a custom op's implementation runs
below autograd, so the per-token dL/dlp could not come from autograd inside one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast.ops import _checks, _dispatch, _library
from rlhf_fast.ops.kl import kl_terms
from rlhf_fast.ops.logprobs import linear_logprobs_op
from rlhf_fast.ops.losses import agg_weights, check_clip, masked_mean, ppo_per_token

# ------------------------------------------------------------------------------------- custom op (_library.py)


@_library.custom_op("fused_linear_ppo_loss")
def linear_ppo_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, old: Tensor, adv: Tensor,
                       w: Tensor, ref: Tensor | None, kl_coef: float, kl_estimator: int, entropy_coef: float,
                       clip_low: float, clip_high: float, dual_clip: float | None, temperature: float,
                       ignore_index: int, need_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backend: hidden (N, H), weight (V, H), bias (V,) | None, targets (N,); old, adv, w, ref (N,)
    fp32 -> loss () = sum(w * token_loss), logprobs (N,), entropy (N,), and the gradients of loss in hidden
    (N, H) (hidden.dtype; empty (0,) unless need_grad), weight (V, H) and bias (V,) (fp32; empty (0,) unless
    need_weight_grad / need_bias_grad)."""
    if backend != "triton":
        raise NotImplementedError(f"rlhf_fast::fused_linear_ppo_loss has no {backend!r} implementation")
    from rlhf_fast.kernels import ppo_loss as k

    token_loss, lp, ent, gh, gw, gb = k.linear_ppo_loss_fwd(
        hidden, weight, targets, bias, old, adv, w, ref, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        temperature=temperature, ignore_index=ignore_index, need_grad=need_grad, need_bias_grad=need_bias_grad)
    loss = (w * token_loss).sum()
    gh = _library.none_as_empty(gh if need_grad else None, lp)
    gw = _library.none_as_empty(gw if need_weight_grad else None, lp)
    gb = _library.none_as_empty(gb if need_bias_grad else None, lp)
    return loss, lp, ent, gh, gw, gb


@linear_ppo_loss_op.register_fake
def _(hidden, weight, bias, targets, old, adv, w, ref, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
      dual_clip, temperature, ignore_index, need_grad, need_weight_grad, need_bias_grad, backend):
    n, f32 = hidden.shape[0], torch.float32
    gh = hidden.new_empty(hidden.shape) if need_grad else hidden.new_empty(0, dtype=f32)
    gw = weight.new_empty(weight.shape, dtype=f32) if need_weight_grad else hidden.new_empty(0, dtype=f32)
    gb = weight.new_empty(weight.shape[0], dtype=f32) if need_bias_grad else hidden.new_empty(0, dtype=f32)
    return hidden.new_empty((), dtype=f32), hidden.new_empty(n, dtype=f32), hidden.new_empty(n, dtype=f32), gh, gw, gb


def _ppo_setup_context(ctx, inputs, output):
    _, lp, ent, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(lp, ent, gh, gw, gb)


def _ppo_backward(ctx, g_loss, *_):
    grads = [None if not needed else (g * g_loss.to(g.dtype)).to(dtype)
             for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3])]
    return (*grads, *([None] * 17))


linear_ppo_loss_op.register_autograd(_ppo_backward, setup_context=_ppo_setup_context)


# ------------------------------------------------------------------------------------------------ public op


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    agg: str = "token-mean",
    ignore_index: int = -100,
    checks: bool | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO policy loss straight from hidden states: log-probs, entropy, clipped surrogate, KL and entropy
    terms and aggregation in one pass, without materialising the (B, T, V) logits.

    Args:
        hidden: (B, T, H) fp32/bf16/fp16 final hidden states of the policy.
        weight: (V, H) lm_head weight (same dtype).  bias: optional (V,).
        targets: (B, T) int64 tokens whose log-probs are scored (ignore_index positions do not count).
        old_logprobs: (B, T) rollout-time log-probs.  advantages: (B, T).  mask: (B, T) 0/1.
        ref_logprobs: optional (B, T) reference log-probs for the in-loss KL term (GRPO style).
        kl_coef: >= 0, weight of kl_penalty(logprobs, ref_logprobs, kl_estimator).
        entropy_coef: weight of the entropy bonus (subtracted).
        clip_low, clip_high, dual_clip: as in ppo_policy_loss.  temperature: > 0, as in the rollout.
        agg: "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean".
        checks: target-range check (host sync); off with checks=False or RLHF_FAST_CHECKS=0, and always
            skipped inside torch.compile'd code (torch.compiler.is_compiling()).
        backend: "auto" | "torch" | "triton" | "native", or None (default): use_backend's, else
            RLHF_FAST_BACKEND's, else auto. An explicit backend that cannot serve the call raises
            NotImplementedError (native: no kernel for this op; triton: float64 inputs, or the CPU without
            TRITON_INTERPRET=1).

    Per token l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) [dual-clipped where A < 0]
    + kl_coef * kl(lp, ref) - entropy_coef * H, with r = exp(lp - old); loss = agg(l, mask).
    The gradient in hidden, weight and bias equals that of the unfused composition.

    Returns:
        (loss, stats): loss 0-dim fp32; stats detached 0-dim tensors clipfrac, approx_kl, ratio, entropy
        (masked means) and kl (when ref_logprobs is given).
    """
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    _checks.integer("targets", targets)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (B, T, H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    shape = hidden.shape[:-1]
    if targets.shape != shape:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(shape)}, got {tuple(targets.shape)}")
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)):
        if x is None:
            continue
        _checks.floating(name, x)
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    _checks.mask("mask", mask, shape)
    if bias is not None:
        _checks.floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    code = _checks.estimator(kl_estimator)
    agg = _checks.agg(agg)
    clip_low, clip_high, dual_clip = check_clip(clip_low, clip_high, dual_clip)
    temperature = _checks.positive("temperature", temperature)
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    device = _checks.same_device(hidden=hidden, weight=weight, targets=targets, old_logprobs=old_logprobs,
                                 advantages=advantages, mask=mask, bias=bias, ref_logprobs=ref_logprobs)
    _checks.targets_in_range(targets, weight.shape[0], ignore_index, checks)
    dtype = _checks.compute_dtype(hidden, weight)
    backend = _dispatch.select("fused_linear_ppo_loss", device, dtype, backend)

    t1 = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    valid = (mask != 0).reshape(-1) & (t1 != ignore_index)  # (N,)
    # Masked positions never enter: zero their per-token inputs so NaN padding cannot leak through 0 * NaN.
    flat = lambda x: torch.where(valid, x.detach().reshape(-1).to(dtype), 0.0).contiguous()  # noqa: E731
    old, adv = flat(old_logprobs), flat(advantages)
    ref = flat(ref_logprobs) if ref_logprobs is not None else None
    w = agg_weights(valid.reshape(shape), agg, dtype).reshape(-1).contiguous()  # (N,) loss = sum(w * l)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    if backend == "torch":
        lp, ent, _ = linear_logprobs_op(h2, weight.contiguous(), bias, t1, temperature, ignore_index, True, "torch")
        l, _, _ = ppo_per_token(lp, old, adv, clip_low, clip_high, dual_clip)
        if ref is not None and kl_coef != 0.0:
            l = l + kl_coef * kl_terms(lp - ref, code)
        if entropy_coef != 0.0:
            l = l - entropy_coef * ent
        loss = (w * l).sum()
    else:
        grad = torch.is_grad_enabled()
        need_w = grad and weight.requires_grad
        need_b = grad and bias is not None and bias.requires_grad
        need_grad = need_w or need_b or (grad and hidden.requires_grad)
        loss, lp, ent, *_ = linear_ppo_loss_op(
            h2, weight.contiguous(), bias, t1, old, adv, w, ref, float(kl_coef), code, float(entropy_coef),
            clip_low, clip_high, dual_clip, temperature, ignore_index, need_grad, need_w, need_b, backend)
    stats = _stats(lp.detach(), ent.detach(), old, adv, ref, valid, code, clip_low, clip_high, dual_clip)
    return loss, stats


def _stats(lp, ent, old, adv, ref, valid, code, clip_low, clip_high, dual_clip):
    with torch.no_grad():
        _, ratio, clipped = ppo_per_token(lp, old, adv, clip_low, clip_high, dual_clip)
        d = lp - old
        stats = {
            "clipfrac": masked_mean(clipped.to(lp.dtype), valid),
            "approx_kl": masked_mean(0.5 * d * d, valid),
            "ratio": masked_mean(ratio, valid),
            "entropy": masked_mean(ent, valid),
        }
        if ref is not None:
            stats["kl"] = masked_mean(kl_terms(lp - ref, code), valid)
    return stats

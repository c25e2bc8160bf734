"""The PPO policy loss in one pass from hidden states and the lm_head weight.

Per token, with lp the log-prob of the target under (hidden @ weight.T + bias) / temperature and H the
entropy of that distribution:
    l = ppo_clipped_surrogate(lp, old_logprobs, advantages) + kl_coef * kl_penalty(lp, ref_logprobs)
        - entropy_coef * H
then aggregated with `agg`. The loss is linear in l with mask-only weights w, so dL/dlp and dL/dH are known
in closed form per token once lp and H are: the forward pass produces the gradients for hidden, weight and
bias right away, and the backward only scales them by the incoming gradient (no second lm_head GEMM pass).
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _dispatch
from rlhf_fast.ops import _checks
from rlhf_fast.ops.kl import kl_terms
from rlhf_fast.ops.logprobs import torch_linear_logprobs_bwd, torch_linear_logprobs_fwd
from rlhf_fast.ops.losses import agg_weights, check_clip, masked_mean, ppo_per_token


def token_loss_and_grads(lp, ent, old, adv, ref, w, kl_coef, code, entropy_coef, clip_low, clip_high, dual_clip):
    """Per-token loss, dL/dlp and dL/dH for L = sum(w * l), by autograd on the plain formula, so the fused
    gradient is that of the unfused composition by construction. Element-wise over N tokens: cheap."""
    with torch.enable_grad():
        lp_ = lp.detach().requires_grad_(True)
        ent_ = ent.detach().requires_grad_(True)
        l, ratio, clipped = ppo_per_token(lp_, old, adv, clip_low, clip_high, dual_clip)
        if ref is not None and kl_coef != 0.0:
            l = l + kl_coef * kl_terms(lp_ - ref, code)
        if entropy_coef != 0.0:
            l = l - entropy_coef * ent_
        g_lp, g_ent = torch.autograd.grad((w * l).sum(), (lp_, ent_), allow_unused=True)
    g_lp = torch.zeros_like(lp) if g_lp is None else g_lp
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
    return l.detach(), g_lp, g_ent, ratio.detach(), clipped


class LinearPPOLossFunction(torch.autograd.Function):
    """Forward returns (loss, logprobs, entropy, token_loss); only loss is differentiable, in hidden,
    weight and bias. Gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, w, ref, cfg, backend):
        (kl_coef, code, entropy_coef, clip_low, clip_high, dual_clip, temperature, ignore_index) = cfg
        need_grad = any(ctx.needs_input_grad[:3])
        need_bias_grad = bias is not None and ctx.needs_input_grad[2]
        if backend == "torch":
            lp, ent, lse = torch_linear_logprobs_fwd(hidden, weight, targets, bias, temperature, ignore_index, True)
            token_loss, g_lp, g_ent, _, _ = token_loss_and_grads(
                lp, ent, old.to(lp.dtype), adv.to(lp.dtype), None if ref is None else ref.to(lp.dtype),
                w.to(lp.dtype), kl_coef, code, entropy_coef, clip_low, clip_high, dual_clip)
            gh = gw = gb = None
            if need_grad:
                gh, gw, gb = torch_linear_logprobs_bwd(hidden, weight, targets, bias, lse, ent, g_lp, g_ent,
                                                       temperature, ignore_index, ctx.needs_input_grad[1],
                                                       need_bias_grad)
        else:
            from rlhf_fast.kernels import ppo_loss as k

            token_loss, lp, ent, gh, gw, gb = k.linear_ppo_loss_fwd(
                hidden, weight, targets, bias, old, adv, w, ref, kl_coef=kl_coef, kl_estimator=code,
                entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                temperature=temperature, ignore_index=ignore_index, need_grad=need_grad,
                need_bias_grad=need_bias_grad)
        loss = (w.to(token_loss.dtype) * token_loss).sum()
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lp, ent, token_loss)
        return loss, lp, ent, token_loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent, _g_tok):
        grads = []
        for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3]):
            grads.append(None if g is None or not needed else (g * g_loss.to(g.dtype)).to(dtype))
        return (*grads, None, None, None, None, None, None, None)


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
        checks: target-range check (host sync); off with checks=False or RLHF_FAST_CHECKS=0.

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
    backend = _dispatch.select("fused_linear_ppo_loss", device)

    dtype = _checks.compute_dtype(hidden, weight)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    valid = (mask != 0).reshape(-1) & (t1 != ignore_index)
    # Masked positions never enter: zero their per-token inputs so NaN padding cannot leak through 0 * NaN.
    flat = lambda x: torch.where(valid, x.detach().reshape(-1).to(dtype), 0.0).contiguous()  # noqa: E731
    old, adv = flat(old_logprobs), flat(advantages)
    ref = flat(ref_logprobs) if ref_logprobs is not None else None
    w = agg_weights(valid.reshape(shape), agg, dtype).reshape(-1).contiguous()
    cfg = (float(kl_coef), code, float(entropy_coef), clip_low, clip_high, dual_clip, temperature, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    loss, lp, ent, _tok = LinearPPOLossFunction.apply(h2, weight.contiguous(), bias, t1, old, adv, w, ref, cfg,
                                                      backend)
    stats = _stats(lp, ent, old, adv, ref, valid, code, clip_low, clip_high, dual_clip)
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

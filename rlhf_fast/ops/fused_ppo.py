"""The PPO policy loss in one pass from hidden states and the lm_head weight.

Per token, with lp the log-prob of the target under (hidden @ weight.T + bias) / temperature and H the
entropy of that distribution:
    l = clipped_surrogate(r, A) + kl_coef * kl_penalty(lp, ref_logprobs) - entropy_coef * H
then aggregated with `agg`. r is the token ratio exp(lp - old) (PPO), or with ratio_level="sequence" the
row's GSPO ratio s = exp(mean over the row's valid tokens of (lp - old)) (Zheng et al. 2025). A is per token
(B, T) or per sequence (B,) (GRPO), broadcast over the row. The loss is linear in l with mask-only weights w,
so at the token level dL/dlp and dL/dH are known in closed form per token once lp and H are.

Token level, both backends: one pass, in the custom op rlhf_fast::fused_linear_ppo_loss (see _library.py).
Per chunk of rows the logits (C, V) are formed once; from them the softmax statistics, the token loss, its
closed-form per-token coefficients dL/dlp and dL/dH, the logit gradient and, right away, the gradients in
hidden, weight and bias; the backward only scales them by the incoming gradient (no second lm_head pass).
4NHV flops (+ 2NHV for the weight's gradient) against 6NHV (+ 2NHV) for the composition of the fused log-prob
op and the formula under autograd, which recomputes the logits in its backward. Triton: kernels/ppo_loss.py;
torch (the CPU default): torch_linear_ppo_loss_fwd below, chunks sized by _TORCH_CHUNK_ELEMS and _TORCH_MIN_ROWS.
Sequence level (GSPO), both backends: the composition of rlhf_fast::fused_linear_logprobs (chunked, logits never
materialised) and the per-token formula in plain torch, under autograd, so its gradient is that of the unfused
composition by construction. This is the two-pass scheme: every token's dL/dlp depends on s of its row, a
reduction over the row's log-probs, so they must all exist before any logit gradient can be formed: pass 1
the fused log-prob forward (2NHV), then s and the loss in torch (O(N)), pass 2 the fused log-prob backward
(recomputes the logits, 6NHV): 8NHV in all. The token level's one pass would need chunks of whole sequences
here (C = k T rows, so the (C, V) scratch is at least T V: 7.5 GB at T = 8192, V = 151936, over the chunk
budget for long responses); not done.

On-policy (old_logprobs=None): the old log-probs are this call's own, detached (ratio 1 at every token, the
gradient -A), as TRL's GRPO at num_iterations 1; no separate log-prob pass is needed for them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast.ops import _checks, _dispatch, _library, cpu_gemm
from rlhf_fast.ops._estimators import kl_terms_grad
from rlhf_fast.ops.kl import kl_terms
from rlhf_fast.ops.logprobs import linear_logprobs_op
from rlhf_fast.ops.losses import (
    agg_weights,
    check_clip,
    clipped_surrogate,
    masked_mean,
    ppo_per_token,
    sequence_ratio,
)

# ------------------------------------------------------------------------------------- custom op (_library.py)


@_library.custom_op("fused_linear_ppo_loss")
def linear_ppo_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, old: Tensor | None,
                       adv: Tensor,
                       adv_row_len: int, w: Tensor, ref: Tensor | None, kl_coef: float, kl_estimator: int,
                       entropy_coef: float, clip_low: float, clip_high: float, dual_clip: float | None,
                       temperature: float, ignore_index: int, need_grad: bool, need_weight_grad: bool,
                       need_bias_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The token level, one pass: hidden (N, H), weight (V, H), bias (V,) | None, targets (N,); old (N,) | None
    (None: on-policy, old = this call's log-probs), w, ref (N,) in the compute dtype; adv (N,) when
    adv_row_len == 0, else (N / adv_row_len,): one per row of adv_row_len tokens -> loss () = sum(w *
    token_loss), logprobs (N,), entropy (N,) in the compute dtype, and the gradients of loss in hidden (N, H)
    (hidden.dtype; empty (0,) unless need_grad), weight (V, H) and bias (V,) (compute dtype; empty (0,) unless
    need_weight_grad / need_bias_grad). Backends: torch | triton."""
    if backend == "torch":
        fwd = torch_linear_ppo_loss_fwd
    elif backend == "triton":
        from rlhf_fast.kernels import ppo_loss as k

        fwd = k.linear_ppo_loss_fwd
    else:
        raise NotImplementedError(f"rlhf_fast::fused_linear_ppo_loss has no {backend!r} implementation")
    token_loss, lp, ent, gh, gw, gb = fwd(
        hidden, weight, targets, bias, old, adv, w, ref, adv_row_len=adv_row_len, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, temperature=temperature, ignore_index=ignore_index, need_grad=need_grad,
        need_bias_grad=need_bias_grad, **({"need_weight_grad": need_weight_grad} if backend == "torch" else {}))
    loss = (w * token_loss).sum()
    gh = _library.none_as_empty(gh if need_grad else None, lp)
    gw = _library.none_as_empty(gw if need_weight_grad else None, lp)
    gb = _library.none_as_empty(gb if need_bias_grad else None, lp)
    return loss, lp, ent, gh, gw, gb


@linear_ppo_loss_op.register_fake
def _(hidden, weight, bias, targets, old, adv, adv_row_len, w, ref, kl_coef, kl_estimator, entropy_coef, clip_low,
      clip_high, dual_clip, temperature, ignore_index, need_grad, need_weight_grad, need_bias_grad, backend):
    n, f32 = hidden.shape[0], _checks.compute_dtype(hidden, weight)
    gh = hidden.new_empty(hidden.shape) if need_grad else hidden.new_empty(0, dtype=f32)
    gw = weight.new_empty(weight.shape, dtype=f32) if need_weight_grad else hidden.new_empty(0, dtype=f32)
    gb = weight.new_empty(weight.shape[0], dtype=f32) if need_bias_grad else hidden.new_empty(0, dtype=f32)
    return hidden.new_empty((), dtype=f32), hidden.new_empty(n, dtype=f32), hidden.new_empty(n, dtype=f32), gh, gw, gb


# Torch backend, token level: a chunk holds the logits of at most _TORCH_CHUNK_ELEMS (row, word) pairs (4 MiB of
# fp32, as the log-prob op's blocks; up to three such buffers live at a time), but never fewer than _TORCH_MIN_ROWS
# rows: each chunk streams the whole (V, H) weight twice, so at a large vocabulary narrow chunks are bound by that
# traffic (measured with bench/fused_ppo_cpu.py on 1 thread, V = 49152, H = 576, 384 tokens: 32-row chunks ran
# 0.86x the two-pass composition, 128-row chunks 1.32x, 256-row ones 1.16x). At V = 151936 a 128-row chunk is 78 MB.
_TORCH_CHUNK_ELEMS = 1 << 20
_TORCH_MIN_ROWS = 128


def token_loss_and_coefficients(lp, ent, old, adv, w, ref, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
                                dual_clip):
    """Per token (1-D tensors, old None: on-policy, old = lp) -> (token loss l, dL/dlp, dL/dH) with L = sum(w l):
    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) [min(., -A dual_clip) where A < 0] + kl_coef kl(lp - ref)
    - entropy_coef H, r = exp(lp - old) (losses.clipped_surrogate). dl/dlp = -A r where no clip binds, else 0, +
    kl_coef kl'(lp - ref); inside the clip range both branches are equal, so the unclipped gradient is kept there; a
    NaN ratio gives a NaN gradient (no clip is marked binding), as autograd of the formula does."""
    ratio = torch.ones_like(lp) if old is None else torch.exp(lp - old)
    l, _, binding = clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
    d_lp = torch.where(binding, 0.0, -adv * ratio)  # d(-A r)/dlp = -A r
    if ref is not None and kl_coef != 0.0:
        d = lp - ref
        l = l + kl_coef * kl_terms(d, kl_estimator)
        d_lp = d_lp + kl_coef * kl_terms_grad(d, kl_estimator)
    if entropy_coef != 0.0:
        l = l - entropy_coef * ent
    return l, w * d_lp, w * -entropy_coef


def torch_linear_ppo_loss_fwd(hidden, weight, targets, bias, old, adv, w, ref, *, adv_row_len, kl_coef, kl_estimator,
                              entropy_coef, clip_low, clip_high, dual_clip, temperature, ignore_index, need_grad,
                              need_bias_grad, need_weight_grad=True):
    """Torch backend, token level, one pass (see the module docstring); the arguments as linear_ppo_loss_op's.

    Per chunk of C rows: z = (hidden_c @ W^T + b) / temperature (C, V) once; log p = z - logsumexp(z); lp = log
    p[target], H = -sum p log p; the token loss and its coefficients c_lp, c_H (token_loss_and_coefficients);
    the logit gradient G = c_lp ([j = target] - p) - c_H p (log p + H), / temperature; grad_hidden_c = G @ W,
    grad_weight += G^T @ hidden_c (only when need_weight_grad), grad_bias += sum_rows G. Positions with targets ==
    ignore_index get lp = H = 0 and no gradient (their w is 0). -> (token_loss, lp, entropy (N,), grad_hidden
    (N, H) in hidden.dtype, grad_weight (V, H) | None, grad_bias (V,) | None), gradients None unless need_grad."""
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _checks.compute_dtype(hidden, weight)
    dev = hidden.device
    wc = weight.to(dtype)  # (V, H); no copy in fp32 / float64
    bc = None if bias is None else bias.to(dtype)
    loss, lp, ent = (torch.empty(n, dtype=dtype, device=dev) for _ in range(3))
    gh = gw = gb = None
    if need_grad:
        gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
        gw = torch.zeros(weight.shape, dtype=dtype, device=dev) if need_weight_grad else None
        gb = torch.zeros(v, dtype=dtype, device=dev) if need_bias_grad and bias is not None else None
    c = max(1, min(n, max(_TORCH_MIN_ROWS, _TORCH_CHUNK_ELEMS // max(1, v))))
    for r0 in range(0, n, c):
        r1 = min(n, r0 + c)
        h = hidden[r0:r1].to(dtype)
        t = targets[r0:r1]
        valid = t != ignore_index
        z = cpu_gemm.linear(h, wc)  # (C, V)
        if bc is not None:
            z += bc
        if temperature != 1.0:
            z /= temperature
        z -= torch.logsumexp(z, dim=1, keepdim=True)  # log p, in place (C, V)
        p = torch.exp(z)
        cols = t.clamp(0, v - 1)[:, None]
        lp_c = torch.where(valid, z.gather(1, cols)[:, 0], 0.0)
        ent_c = torch.where(valid, -(p * z).sum(dim=1), 0.0)
        adv_c = adv[torch.arange(r0, r1, device=dev) // adv_row_len] if adv_row_len else adv[r0:r1]
        l, c_lp, c_ent = token_loss_and_coefficients(
            lp_c, ent_c, None if old is None else old[r0:r1], adv_c, w[r0:r1], None if ref is None else ref[r0:r1],
            kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip)
        loss[r0:r1], lp[r0:r1], ent[r0:r1] = l, lp_c, ent_c
        if not need_grad:
            continue
        # c_lp and c_H are 0 off the valid tokens: w is 0 there, and their lp, H, old, A, ref are 0 (finite)
        if entropy_coef != 0.0:  # G = -p (c_lp + c_H (log p + H)), then + c_lp at the target
            z += ent_c[:, None]
            z *= c_ent[:, None]
            z += c_lp[:, None]
            g = p.mul_(z).neg_()
        else:
            g = p.mul_(-c_lp[:, None])
        g.scatter_add_(1, cols, c_lp[:, None])
        if temperature != 1.0:
            g /= temperature
        gh[r0:r1] = cpu_gemm.matmul(g, wc)
        if gw is not None:
            gw.addmm_(g.T, h)
        if gb is not None:
            gb += g.sum(dim=0)
    return loss, lp, ent, gh, gw, gb


def _ppo_setup_context(ctx, inputs, output):
    _, lp, ent, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(lp, ent, gh, gw, gb)


def _ppo_backward(ctx, g_loss, *_):
    grads = [None if not needed else (g * g_loss.to(g.dtype)).to(dtype)
             for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3])]
    return (*grads, *([None] * 18))


linear_ppo_loss_op.register_autograd(_ppo_backward, setup_context=_ppo_setup_context)


# ------------------------------------------------------------------------------------------------ public op


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
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
    ratio_level: str = "token",
    agg: str = "token-mean",
    ignore_index: int = -100,
    checks: bool | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO / GRPO / GSPO policy loss straight from hidden states: log-probs, entropy, clipped surrogate, KL and
    entropy terms and aggregation in one pass, without materialising the (B, T, V) logits.

    Args:
        hidden: (B, T, H) fp32/bf16/fp16 final hidden states of the policy.
        weight: (V, H) lm_head weight (same dtype).  bias: optional (V,).
        targets: (B, T) int64 tokens whose log-probs are scored (ignore_index positions do not count).
        old_logprobs: (B, T) rollout-time log-probs, or None: strictly on-policy, the old log-probs are the ones
            this call computes, detached (r = 1 at every token; TRL's GRPO at num_iterations 1), with no
            separate log-prob pass.  mask: (B, T) 0/1.
        advantages: (B, T) per token, or (B,) per sequence (GRPO's one advantage per completion), broadcast
            over the row's tokens (never expanded to (B, T) in memory).
        ref_logprobs: optional (B, T) reference log-probs for the in-loss KL term (GRPO's beta term).
        kl_coef: >= 0, weight of kl_penalty(logprobs, ref_logprobs, kl_estimator).
        entropy_coef: weight of the entropy bonus (subtracted).
        clip_low, clip_high, dual_clip: as in ppo_policy_loss (clip_high is DAPO's clip-higher, TRL's
            epsilon_high).  temperature: > 0, as in the rollout.
        ratio_level: "token" (PPO, GRPO: r_t = exp(lp_t - old_t)) or "sequence" (GSPO, Zheng et al. 2025:
            every token of row i uses s_i = exp(sum_t m (lp - old) / sum_t m), m the loss mask
            mask * (targets != ignore_index); s_i = 1 for a row without a valid token, which has no loss).
            The gradient flows through s_i to every valid token of the row. dual_clip applies to s_i as it
            does to r_t (where A < 0 the loss is capped at -A c).
        agg: "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (Dr. GRPO:
            sum(l m) / (B T), T the time dimension); see ops.losses.
        checks: target-range check (host sync); off with checks=False or RLHF_FAST_CHECKS=0, and always
            skipped inside torch.compile'd code (torch.compiler.is_compiling()).
        backend: "auto" | "torch" | "triton" | "native", or None (default): use_backend's, else
            RLHF_FAST_BACKEND's, else auto. An explicit backend that cannot serve the call raises
            NotImplementedError (native: no kernel for this op; triton: float64 inputs, or the CPU without
            TRITON_INTERPRET=1). Triton at ratio_level="sequence" runs two passes (module docstring).

    Per token l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) [min(l, -A dual_clip) where A < 0]
    + kl_coef * kl(lp, ref) - entropy_coef * H, with r = exp(lp - old) (token level) or r = s_i (sequence
    level); loss = agg(l, m). The gradient in hidden, weight and bias equals that of the unfused composition.

    Returns:
        (loss, stats): loss 0-dim fp32; stats detached 0-dim tensors: clipfrac (share of valid tokens whose
        loss was clipped; at the sequence level a token is clipped when its row's s_i is, so with (B,)
        advantages it is the token-weighted share of clipped sequences), clipfrac_low / clipfrac_high (share of
        valid tokens with r < 1 - clip_low and A < 0 / r > 1 + clip_high and A > 0: TRL's clip_ratio/low_mean and
        high_mean), approx_kl (mean of (lp - old)^2 / 2
        over valid tokens, at either level), ratio (mean r over valid tokens; at the sequence level the mean
        of s_i over rows with a valid token), entropy (masked mean) and kl (when ref_logprobs is given).
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
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is None:
            continue
        _checks.floating(name, x)
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    _checks.floating("advantages", advantages)
    per_sequence = advantages.shape == shape[:-1]
    if advantages.shape != shape and not per_sequence:
        raise ValueError(f"advantages must have shape {tuple(shape)} (per token) or {tuple(shape[:-1])} (per "
                         f"sequence), got {tuple(advantages.shape)}")
    _checks.mask("mask", mask, shape)
    if bias is not None:
        _checks.floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    code = _checks.estimator(kl_estimator)
    agg = _checks.agg(agg)
    level = _checks.ratio_level(ratio_level)
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

    rows, T = math.prod(shape[:-1]), shape[-1]  # sequences and their length: (N,) views as (rows, T)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    valid = (mask != 0).reshape(-1) & (t1 != ignore_index)  # (N,)
    # Masked positions never enter: zero their per-token inputs so NaN padding cannot leak through 0 * NaN.
    flat = lambda x: torch.where(valid, x.detach().reshape(-1).to(dtype), 0.0).contiguous()  # noqa: E731
    old = None if old_logprobs is None else flat(old_logprobs)
    if per_sequence:  # (rows,), zero for a row without a valid token (its advantage may be NaN padding)
        row_valid = valid.reshape(rows, T).any(dim=1)
        adv = torch.where(row_valid, advantages.detach().reshape(rows).to(dtype), 0.0).contiguous()
    else:
        adv = flat(advantages)  # (N,)
    ref = flat(ref_logprobs) if ref_logprobs is not None else None
    w = agg_weights(valid.reshape(shape), agg, dtype).reshape(-1).contiguous()  # (N,) loss = sum(w * l)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    as_rows = lambda x: None if x is None else x.view(rows, T)  # noqa: E731
    adv2 = adv[:, None] if per_sequence else as_rows(adv)  # (rows, 1) or (rows, T)
    if level == "sequence":
        lp, ent, _ = linear_logprobs_op(h2, weight.contiguous(), bias, t1, temperature, ignore_index, True, backend)
        if old is None:
            old = lp.detach()
        l, _, _ = _surrogate(as_rows(lp), as_rows(old), adv2, as_rows(valid), level, clip_low, clip_high, dual_clip)
        if ref is not None and kl_coef != 0.0:
            l = l + kl_coef * kl_terms(as_rows(lp) - as_rows(ref), code)
        if entropy_coef != 0.0:
            l = l - entropy_coef * as_rows(ent)
        loss = (as_rows(w) * l).sum()  # l may be (rows, 1): a sequence ratio with per-sequence advantages
    else:
        grad = torch.is_grad_enabled()
        need_w = grad and weight.requires_grad
        need_b = grad and bias is not None and bias.requires_grad
        need_grad = need_w or need_b or (grad and hidden.requires_grad)
        loss, lp, ent, *_ = linear_ppo_loss_op(
            h2, weight.contiguous(), bias, t1, old, adv, T if per_sequence else 0, w, ref, float(kl_coef), code,
            float(entropy_coef), clip_low, clip_high, dual_clip, temperature, ignore_index, need_grad, need_w,
            need_b, backend)
    old = lp.detach() if old is None else old  # on-policy at the token level: the op's own log-probs
    stats = _stats(as_rows(lp.detach()), as_rows(ent.detach()), as_rows(old), adv2, as_rows(ref), as_rows(valid),
                   code, level, clip_low, clip_high, dual_clip)
    return loss, stats


def _surrogate(lp, old, adv, valid, level, clip_low, clip_high, dual_clip):
    # (rows, T) inputs, adv (rows, T) or (rows, 1) -> (loss, ratio, clipped), each (rows, T) or (rows, 1)
    if level == "sequence":
        ratio = sequence_ratio(lp, old, valid)[:, None]  # (rows, 1)
        return clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
    return ppo_per_token(lp, old, adv, clip_low, clip_high, dual_clip)


def _stats(lp, ent, old, adv, ref, valid, code, level, clip_low, clip_high, dual_clip):
    with torch.no_grad():
        _, ratio, clipped = _surrogate(lp, old, adv, valid, level, clip_low, clip_high, dual_clip)
        d = lp - old
        if level == "sequence":
            mean_ratio = masked_mean(ratio[:, 0], valid.any(dim=1))  # over rows with a valid token
        else:
            mean_ratio = masked_mean(ratio, valid)
        high = clip_low if clip_high is None else clip_high
        low_clipped = ((ratio < 1 - clip_low) & (adv < 0)).expand(valid.shape).to(lp.dtype)
        high_clipped = ((ratio > 1 + high) & (adv > 0)).expand(valid.shape).to(lp.dtype)
        stats = {
            "clipfrac": masked_mean(clipped.expand(valid.shape).to(lp.dtype), valid),
            "clipfrac_low": masked_mean(low_clipped, valid),  # TRL's clip_ratio/low_mean
            "clipfrac_high": masked_mean(high_clipped, valid),  # TRL's clip_ratio/high_mean
            "approx_kl": masked_mean(0.5 * d * d, valid),
            "ratio": mean_ratio,
            "entropy": masked_mean(ent, valid),
        }
        if ref is not None:
            stats["kl"] = masked_mean(kl_terms(lp - ref, code), valid)
    return stats

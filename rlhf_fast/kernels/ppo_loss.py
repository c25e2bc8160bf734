"""Triton kernels for the fused PPO policy loss on the lm_head: per-token loss and, in the same forward pass,
the gradients of L = sum(weights * token_loss) wrt hidden, weight and bias.

Per token (ratio = exp(lp - old), A the advantage - per token, or per row of ADV_T tokens (GRPO's per-sequence
advantage, read at (row0 + i) // ADV_T, never expanded) - and d = lp - ref):
    pg = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip c and A < 0: min(pg, -A c)
    token_loss = pg + kl_coef * kl(d) - entropy_coef * entropy
kl estimators (code): 0 k1 = d, 1 k2 = d^2 / 2, 2 k3 = exp(-d) - 1 + d, 3 abs = |d|  (Schulman, "Approximating
KL divergence", 2020), with their derivatives, from kernels/_estimators.py. dL/dlp = w (dpg/dlp + kl_coef dkl/dlp),
dpg/dlp = -A ratio on the unclipped branch and 0 when clipped or dual-clipped; dL/dentropy = -w entropy_coef. The
logit gradient then follows the formula in kernels/logprobs.py.

Design and flops (N tokens, H hidden, V vocabulary), with gradients (need_grad):
  per chunk of C rows: Z = hidden_c @ W^T (+ bias) / T into an fp32 (C, V) buffer by a GEMM whose epilogue
  also writes each (row, V tile)'s softmax statistics (2CHV) -> a small kernel merges them into lse, the
  target log-prob and the entropy -> the token kernel makes the loss and the two per-token coefficients ->
  the logit gradient G (C, V, input dtype) from Z -> grad_hidden_c = G @ W (2CHV) and grad_weight (+)= G^T @
  hidden_c (2CHV, fp32; written by the first chunk, accumulated by the rest). Total 6NHV: the lm_head
  forward + backward GEMM floor; the logits are never recomputed.
  Memory traffic beyond the GEMM operands, per logit: Z written (4 B) and read once (4 B), G written (2 B)
  and read by both GEMMs (4 B): 14 B, ~17 GB at N = 8192, V = 151936 (~5 ms of H100 HBM next to ~42 ms of
  GEMM), plus 8VH bytes (5 GB) of fp32 grad_weight read-modify-write per chunk after the first (chunks are
  sized by CONFIG["ppo_chunk_bytes"]: 2 GiB -> 4 chunks of 2048 rows there). Estimate: ~1.25-1.3x of the
  floor if the tl.dot GEMMs ran at cuBLAS speed - not measured (no GPU when this was written).
  What would close the gap to the issue's 1.2x: (1) one chunk when memory allows (ppo_chunk_bytes >= 6NV,
  7.5 GB there, still under half of the ~20 GiB eager peak): no grad_weight RMW and full GEMM grids;
  (2) write G in place over Z (bf16 in the low half of each fp32 row) to halve the scratch, so twice the rows
  fit per chunk; (3) persistent TMA/wgmma GEMMs with tuned 128x256 tiles and a split-K grad_hidden GEMM
  (its grid is only C/128 x H/128 tiles); (4) fold the token kernel and G into one pass (they already
  share the row statistics). Without gradients the fused split-V forward of kernels/logprobs.py is used
  (2NHV, no (C, V) scratch at all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import logprobs as _lp
from ._estimators import kl_estimate, kl_estimate_grad

KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}


@triton.jit
def _ppo_token_kernel(lp_ptr, ent_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, tgt_ptr, loss_ptr, clp_ptr,
                      cent_ptr, N, adv_row0, ADV_T, kl_coef, entropy_coef, ratio_low, ratio_high, dual_clip,
                      IGNORE, HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr,
                      ADV_PER_ROW: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # Element-wise: token loss and, when NEED_GRAD, dL/dlogprob and dL/dentropy with L = sum(w * loss).
    # ADV_PER_ROW: adv holds one advantage per row of ADV_T tokens and token i (of a chunk starting at token
    # adv_row0) reads adv[(adv_row0 + i) // ADV_T].
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lp = tl.load(lp_ptr + offs, mask=mask, other=0.0)
    ent = tl.load(ent_ptr + offs, mask=mask, other=0.0)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0)
    if ADV_PER_ROW:
        adv = tl.load(adv_ptr + (offs + adv_row0) // ADV_T, mask=mask, other=0.0)
    else:
        adv = tl.load(adv_ptr + offs, mask=mask, other=0.0)
    active = tl.load(tgt_ptr + offs, mask=mask, other=IGNORE) != IGNORE
    ratio = tl.exp(lp - old)
    loss1 = -adv * ratio
    # NaN must come out as NaN: the GPU's default min/max return the non-NaN operand (maxnum), so a NaN ratio
    # would be clipped to a finite loss; PropagateNan.ALL keeps it (the interpreter's numpy always does).
    clipped = tl.maximum(ratio, ratio_low, propagate_nan=tl.PropagateNan.ALL)
    clipped = tl.minimum(clipped, ratio_high, propagate_nan=tl.PropagateNan.ALL)
    loss2 = -adv * clipped
    pg = tl.maximum(loss1, loss2, propagate_nan=tl.PropagateNan.ALL)
    # inside the clip range loss1 == loss2 exactly, so the unclipped gradient is kept there; written as
    # "not clipped" so that a NaN ratio gives a NaN gradient, not 0
    dpg = tl.where(loss1 < loss2, 0.0, -adv * ratio)
    if HAS_DUAL:
        loss3 = -adv * dual_clip
        dual = (adv < 0) & (loss3 < pg)
        pg = tl.where(dual, loss3, pg)
        dpg = tl.where(dual, 0.0, dpg)
    loss = pg - entropy_coef * ent
    dlp = dpg
    if HAS_REF:
        d = lp - tl.load(ref_ptr + offs, mask=mask, other=0.0)
        loss += kl_coef * kl_estimate(d, KL_EST)
        dlp += kl_coef * kl_estimate_grad(d, KL_EST)
    tl.store(loss_ptr + offs, tl.where(active, loss, 0.0), mask=mask)
    if NEED_GRAD:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(clp_ptr + offs, tl.where(active, w * dlp, 0.0), mask=mask)
        tl.store(cent_ptr + offs, tl.where(active, -w * entropy_coef, 0.0), mask=mask)


def _token_loss(lp, ent, old, adv, weights, ref, targets, loss, c_lp, c_ent, *, kl_coef, kl_estimator,
                entropy_coef, clip_low, clip_high, dual_clip, ignore_index, need_grad, adv_row_len=0, row0=0):
    # adv_row_len > 0: adv is the whole (rows,) per-row tensor and these n tokens start at token row0
    n = lp.shape[0]
    if n == 0:
        return
    block = 1024
    _ppo_token_kernel[(triton.cdiv(n, block),)](
        lp, ent, old, adv, weights, ref if ref is not None else lp, targets, loss,
        c_lp if need_grad else loss, c_ent if need_grad else loss, n, row0, max(1, adv_row_len), float(kl_coef),
        float(entropy_coef), 1.0 - float(clip_low), 1.0 + float(clip_high),
        float(dual_clip) if dual_clip is not None else 0.0, ignore_index, HAS_REF=ref is not None,
        KL_EST=int(kl_estimator), HAS_DUAL=dual_clip is not None, ADV_PER_ROW=adv_row_len > 0,
        NEED_GRAD=need_grad, BLOCK=block, num_warps=4)


def linear_ppo_loss_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                        weights: torch.Tensor, ref_logprobs: torch.Tensor | None, *, adv_row_len: int = 0,
                        kl_coef: float,
                        kl_estimator: int, entropy_coef: float, clip_low: float, clip_high: float,
                        dual_clip: float | None, temperature: float, ignore_index: int, need_grad: bool,
                        need_bias_grad: bool):
    """Per-token PPO loss on the log-probs of softmax((hidden @ weight.T + bias) / temperature), and its grads.

    hidden (N, H), weight (V, H), bias (V,) or None (one float dtype); targets (N,) int64 in [0, V) or
    ignore_index; old_logprobs, weights, ref_logprobs (N,) fp32 (ref None: no KL term; old None: on-policy, old
    = the log-probs computed here); weights are the
    aggregation weights, L = sum(weights * token_loss); advantages (N,) fp32, or with adv_row_len > 0 one per
    row of adv_row_len tokens, (N / adv_row_len,) (GRPO). kl_estimator: 0 k1, 1 k2, 2 k3, 3 abs.
    Returns (token_loss (N,) fp32, logprobs (N,) fp32, entropy (N,) fp32, grad_hidden (N, H) hidden.dtype,
    grad_weight (V, H) fp32, grad_bias (V,) fp32); the three gradients of L are None unless need_grad
    (grad_bias also needs need_bias_grad and a bias). Ignored rows: loss, logprob, entropy 0, no gradient.
    """
    hidden, weight, targets, bias = map(_lp._c, (hidden, weight, targets, bias))
    old_logprobs, advantages, weights, ref_logprobs = map(_lp._per_token,
                                                          (old_logprobs, advantages, weights, ref_logprobs))
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    token_kw = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low,
                    clip_high=clip_high, dual_clip=dual_clip, ignore_index=ignore_index, adv_row_len=adv_row_len)
    per_row = adv_row_len > 0
    loss = torch.empty(N, device=dev, dtype=f32)  # (N,)
    if not need_grad:
        lp, ent, _ = _lp.linear_logprobs_fwd(hidden, weight, targets, bias, temperature, ignore_index, True)
        old = lp if old_logprobs is None else old_logprobs  # on-policy: the log-probs just computed
        _token_loss(lp, ent, old, advantages, weights, ref_logprobs, targets, loss, None, None,
                    need_grad=False, **token_kw)
        return loss, lp, ent, None, None, None

    lp = torch.empty(N, device=dev, dtype=f32)  # (N,)
    if old_logprobs is None:  # on-policy: each chunk's old log-probs are its own, written before the token kernel
        old_logprobs = lp
    ent = torch.empty(N, device=dev, dtype=f32)  # (N,)
    lse = torch.empty(N, device=dev, dtype=f32)  # (N,)
    c_lp = torch.empty(N, device=dev, dtype=f32)  # (N,) dL/dlogprob
    c_ent = torch.empty(N, device=dev, dtype=f32)  # (N,) dL/dentropy
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    grad_weight = torch.empty(V, H, device=dev, dtype=f32)  # (V, H), written whole by the first chunk
    need_bias_grad = need_bias_grad and bias is not None
    grad_bias = torch.zeros(V, device=dev, dtype=f32) if need_bias_grad else None  # (V,)
    if N == 0:
        return loss, lp, ent, grad_hidden, grad_weight.zero_(), grad_bias
    bn = _lp.CONFIG["row_block_n"]
    C = _lp.chunk_rows(N, V, 4 + hidden.element_size(), bn, _lp.CONFIG["ppo_chunk_bytes"])
    z = torch.empty(C, V, device=dev, dtype=f32)  # (C, V) scaled logits of one chunk
    g = torch.empty(C, V, device=dev, dtype=hidden.dtype)  # (C, V) dL/dlogits of one chunk
    gb_part = torch.empty(C // bn, V, device=dev, dtype=f32) if need_bias_grad else None
    v_tiles = triton.cdiv(V, _lp.CONFIG["mm_block_n"])
    part = torch.empty(4, v_tiles * C, device=dev, dtype=f32)  # softmax statistics per (V tile, row)
    inv_t = 1.0 / temperature
    for row0 in range(0, N, C):
        n = min(C, N - row0)
        sl = slice(row0, row0 + n)
        zc = z[:n]
        _lp.matmul(hidden[sl], weight.t(), zc, bias=bias, scale=inv_t, stats=(targets[sl], part))
        _lp.combine_stats(part, v_tiles, targets[sl], ignore_index, lp[sl], ent[sl], lse[sl])
        _token_loss(lp[sl], ent[sl], old_logprobs[sl], advantages if per_row else advantages[sl], weights[sl],
                    ref_logprobs[sl] if ref_logprobs is not None else None, targets[sl], loss[sl], c_lp[sl],
                    c_ent[sl], need_grad=True, row0=row0, **token_kw)
        _lp.logprobs_grad(zc, None, targets[sl], None, lse[sl], ent[sl], c_lp[sl], c_ent[sl], 1.0, inv_t,
                          ignore_index, 0, n, g, gb_part)
        _lp.grads_from_logit_grad(g[:n], hidden, weight, row0, grad_hidden, grad_weight)
        if need_bias_grad:
            grad_bias += gb_part[:triton.cdiv(n, bn)].sum(0)
    return loss, lp, ent, grad_hidden, grad_weight, grad_bias

"""Triton kernels for the exact per-token KL(p || q) between two softmaxes over the vocabulary sharing one lm_head:
p = softmax((hidden @ W^T + b) / T), q = softmax((ref_hidden @ W^T + b) / T). Formulas (the online statistics
and the backward dKL/dz_p,j = p_j (log p_j - log q_j - KL)) in rlhf_fast/ops/fused_kl.py.

Forward (linear_kl_fwd): one pass over V tiles. Each program (row tile, V split) computes the policy and the
reference logit tiles together (_logits_tiles: each W block is loaded once and feeds two tl.dot) and keeps
per row m_p, s_p, m_q, s_q, u with online rescaling; the V splits (only as many as fill the device, as in
kernels/logprobs.py) are merged in torch ((5, splits, N) floats).
4NHV flops, O(N) extra memory.

Backward (linear_kl_bwd): recomputes both logit tiles and writes the logit gradient G chunk by chunk (input
dtype; along the shorter of N and V, CONFIG["chunk_bytes"], as linear_logprobs_bwd does and for the same
reasons), which the GEMMs of kernels/logprobs.py turn into grad_hidden = G @ W and grad_weight = G^T @ hidden.
8NHV flops. No gradient for ref_hidden (the reference is a constant).

Launch configuration: kernels/logprobs.py's CONFIG (block_n, block_v, block_h, num_warps, num_stages, the GEMM
tiles and chunk_bytes), so tests shrink both files' tiles with one fixture. Two fp32 (block_n, block_v)
accumulators live per program here instead of one: at the GPU default 128x128 with 8 warps that is 128 registers
per thread for the accumulators alone, so on sm_90a a 64-wide block_v may be faster (not measured: no GPU in
the session that wrote this; bench/ should tune it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import logprobs as _lp

# finite running-max start (as kernels/logprobs.py): exp(m_old - m_new) and (m_old - m_new) * 0 stay defined
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _logits_tiles(h_ptr, r_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_r, stride_w,
                  inv_t, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # The policy's and the reference's fp32 logit tiles z[rows, cols] = (x[rows] @ W[cols].T + b[cols]) * inv_t
    # for x = hidden and ref_hidden, reduced over H in BLOCK_H steps; one load of each W block serves both.
    acc_p = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        x_mask = row_mask[:, None] & k_mask[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :], mask=x_mask, other=0.0)  # (BLOCK_N, BLOCK_H)
        r = tl.load(r_ptr + rows64[:, None] * stride_r + ks[None, :], mask=x_mask, other=0.0)  # (BLOCK_N, BLOCK_H)
        w = tl.load(w_ptr + cols64[None, :] * stride_w + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # (BLOCK_H, BLOCK_V) = W^T tile
        if UPCAST:
            h = h.to(tl.float32)
            r = r.to(tl.float32)
            w = w.to(tl.float32)
        acc_p = tl.dot(h, w, acc_p, input_precision=PREC)
        acc_q = tl.dot(r, w, acc_q, input_precision=PREC)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_p += b[None, :]
        acc_q += b[None, :]
    return acc_p * inv_t, acc_q * inv_t


@triton.jit
def _kl_partials_kernel(h_ptr, r_ptr, w_ptr, b_ptr, mp_ptr, sp_ptr, mq_ptr, sq_ptr, u_ptr,
                        N, V, H, stride_h, stride_r, stride_w, inv_t, TILES_PER_SPLIT,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # Program (row tile, V split): online m_p, s_p, m_q, s_q and u = sum e^(z_p - m_p) ((z_p - m_p) - (z_q - m_q))
    # over its share of the V tiles, stored as split `split` of (SPLITS, N) fp32 buffers.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m_p = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    m_q = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    s_p = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * TILES_PER_SPLIT * BLOCK_V
    for i in range(0, TILES_PER_SPLIT):
        cols = v_begin + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        zp, zq = _logits_tiles(h_ptr, r_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_r,
                               stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PREC)
        # columns past V are -inf for the maxima and sums; zp, zq themselves stay finite (0) there, so the
        # difference below never meets -inf - -inf
        zp_v = tl.where(col_mask[None, :], zp, float("-inf"))
        zq_v = tl.where(col_mask[None, :], zq, float("-inf"))
        mp_new = tl.maximum(m_p, tl.max(zp_v, axis=1))
        mq_new = tl.maximum(m_q, tl.max(zq_v, axis=1))
        a_p = tl.exp(m_p - mp_new)
        ep = tl.exp(zp_v - mp_new[:, None])
        # p_v = 0 (columns past V, -inf logits, underflow) contributes nothing, even where log q_v = -inf
        diff = tl.where(ep > 0, ep * ((zp - mp_new[:, None]) - (zq - mq_new[:, None])), 0.0)
        u = a_p * (u + ((m_p - mp_new) - (m_q - mq_new)) * s_p) + tl.sum(diff, axis=1)
        s_p = a_p * s_p + tl.sum(ep, axis=1)
        s_q = tl.exp(m_q - mq_new) * s_q + tl.sum(tl.exp(zq_v - mq_new[:, None]), axis=1)
        m_p = mp_new
        m_q = mq_new
    out = split * N + rows
    tl.store(mp_ptr + out, m_p, mask=row_mask)
    tl.store(sp_ptr + out, s_p, mask=row_mask)
    tl.store(mq_ptr + out, m_q, mask=row_mask)
    tl.store(sq_ptr + out, s_q, mask=row_mask)
    tl.store(u_ptr + out, u, mask=row_mask)


@triton.jit
def _kl_grad_kernel(h_ptr, r_ptr, w_ptr, b_ptr, valid_ptr, lsep_ptr, lseq_ptr, kl_ptr, gkl_ptr, g_ptr, gb_ptr,
                    row0, n_rows, col0, col_end, H, stride_h, stride_r, stride_w, stride_g, stride_gb, inv_t,
                    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # G[r, c] = gkl p_j (log p_j - log q_j - KL) / T for row row0 + r and vocabulary column col0 + c (chunk-local
    # G), 0 for rows that are not valid; with BIAS_GRAD also the fp32 column sums of this tile into gb[pid_n, c].
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col0 + local_cols
    row_mask = local < n_rows
    col_mask = cols < col_end
    rows = row0 + local
    zp, zq = _logits_tiles(h_ptr, r_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_r,
                           stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PREC)
    active = row_mask & (tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0)
    lse_p = tl.load(lsep_ptr + rows, mask=row_mask, other=0.0)
    lse_q = tl.load(lseq_ptr + rows, mask=row_mask, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
    gkl = tl.load(gkl_ptr + rows, mask=row_mask, other=0.0)
    logp = zp - lse_p[:, None]
    logq = zq - lse_q[:, None]
    p = tl.exp(logp)
    g = tl.where(p > 0, p * (logp - logq - kl[:, None]), 0.0) * (gkl * inv_t)[:, None]
    g = tl.where(active[:, None] & col_mask[None, :], g, 0.0)
    g_offs = local.to(tl.int64)[:, None] * stride_g + local_cols[None, :]
    tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if BIAS_GRAD:
        tl.store(gb_ptr + pid_n * stride_gb + local_cols, tl.sum(g, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------- launchers


def linear_kl_fwd(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  valid: torch.Tensor, temperature: float):
    """Per-token KL(p || q) (module docstring). hidden, ref_hidden (N, H), weight (V, H), bias (V,) or None, one
    float dtype; valid (N,) bool. Returns (kl (N,) fp32, 0 where not valid; lse_p (N,) fp32; lse_q (N,) fp32)."""
    hidden, ref_hidden, weight, bias, valid = map(_lp._c, (hidden, ref_hidden, weight, bias, valid))
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    if N == 0:
        return tuple(torch.empty(0, device=dev, dtype=f32) for _ in range(3))
    cfg = _lp.CONFIG
    bn, bv = cfg["block_n"], cfg["block_v"]
    dot, bh = _lp._dot_args(hidden.dtype, cfg["block_h"])
    n_tiles = triton.cdiv(N, bn)
    v_tiles = triton.cdiv(V, bv)
    splits = max(1, min(v_tiles, triton.cdiv(_lp._target_programs(dev), n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # every split holds at least one column
    part = torch.empty(5, splits, N, device=dev, dtype=f32)  # m_p, s_p, m_q, s_q, u per (split, row)
    _kl_partials_kernel[(n_tiles, splits)](
        hidden, ref_hidden, weight, bias if bias is not None else hidden, part[0], part[1], part[2], part[3],
        part[4], N, V, H, hidden.stride(0), ref_hidden.stride(0), weight.stride(0), 1.0 / temperature,
        tiles_per_split, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot)
    # merge the splits with the same rescaling as over V tiles
    m_p, s_p, m_q, s_q, u = part
    mp_all, mq_all = m_p.max(dim=0).values, m_q.max(dim=0).values  # (N,)
    a_p = torch.exp(m_p - mp_all)
    u_all = (a_p * (u + ((m_p - mp_all) - (m_q - mq_all)) * s_p)).sum(dim=0)
    sp_all = (a_p * s_p).sum(dim=0)
    sq_all = (torch.exp(m_q - mq_all) * s_q).sum(dim=0)
    log_sp, log_sq = torch.log(sp_all), torch.log(sq_all)
    kl = torch.where(valid, u_all / sp_all + log_sq - log_sp, 0.0)
    return kl, mp_all + log_sp, mq_all + log_sq


def linear_kl_bwd(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  valid: torch.Tensor, lse_p: torch.Tensor, lse_q: torch.Tensor, kl: torch.Tensor,
                  grad_kl: torch.Tensor, temperature: float, need_weight_grad: bool, need_bias_grad: bool):
    """Gradients of sum(grad_kl * kl) through the policy side (see linear_kl_fwd): grad_hidden (N, H) in
    hidden.dtype, grad_weight (V, H) fp32 or None, grad_bias (V,) fp32 or None. lse_p, lse_q, kl (N,) from the
    forward. Recomputes both logit tiles; G by chunks along the shorter of N and V, as linear_logprobs_bwd."""
    hidden, ref_hidden, weight, bias = map(_lp._c, (hidden, ref_hidden, weight, bias))
    valid = valid.to(torch.int8).contiguous()  # (N,) 0/1
    lse_p, lse_q, kl, grad_kl = map(_lp._per_token, (lse_p, lse_q, kl, grad_kl))
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = _lp.CONFIG
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    grad_weight = torch.empty(V, H, device=dev, dtype=torch.float32) if need_weight_grad else None  # (V, H)
    need_bias_grad = need_bias_grad and bias is not None
    grad_bias = torch.zeros(V, device=dev, dtype=torch.float32) if need_bias_grad else None  # (V,)
    if N == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return grad_hidden, grad_weight, grad_bias
    bn, bv = cfg["block_n"], cfg["block_v"]
    dot, bh = _lp._dot_args(hidden.dtype, cfg["block_h"])

    def logit_grad(row0, n_rows, col0, g, gb_part):
        _kl_grad_kernel[(triton.cdiv(n_rows, bn), triton.cdiv(g.shape[1], bv))](
            hidden, ref_hidden, weight, bias if bias is not None else hidden, valid, lse_p, lse_q, kl, grad_kl, g,
            gb_part if gb_part is not None else lse_p, row0, n_rows, col0, col0 + g.shape[1], H, hidden.stride(0),
            ref_hidden.stride(0), weight.stride(0), g.stride(0), gb_part.stride(0) if gb_part is not None else 0,
            1.0 / temperature, HAS_BIAS=bias is not None, BIAS_GRAD=gb_part is not None, BLOCK_N=bn, BLOCK_V=bv,
            BLOCK_H=bh, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot)

    if N <= V:
        # chunks of Vc vocabulary columns, all N rows; grad_hidden accumulated in fp32 across chunks
        Vc = _lp.chunk_rows(V, N, hidden.element_size(), bv, cfg["chunk_bytes"])
        g = torch.empty(N, Vc, device=dev, dtype=hidden.dtype)  # (N, Vc) logit gradient of one chunk
        gb_part = torch.empty(triton.cdiv(N, bn), Vc, device=dev, dtype=torch.float32) if need_bias_grad else None
        fp32 = hidden.dtype == torch.float32
        acc = grad_hidden if fp32 else torch.empty(N, H, device=dev, dtype=torch.float32)  # (N, H)
        for col0 in range(0, V, Vc):
            vc = min(Vc, V - col0)
            gc = g[:, :vc]
            logit_grad(0, N, col0, gc, gb_part)
            _lp.matmul(gc, weight[col0:col0 + vc], acc, accumulate=col0 > 0)
            if grad_weight is not None:
                _lp.matmul(gc.t(), hidden, grad_weight[col0:col0 + vc])
            if need_bias_grad:
                grad_bias[col0:col0 + vc] = gb_part[:, :vc].sum(0)
        if not fp32:
            grad_hidden.copy_(acc)
        return grad_hidden, grad_weight, grad_bias

    # chunks of C rows, all V columns; grad_weight accumulated in fp32 across chunks
    C = _lp.chunk_rows(N, V, hidden.element_size(), bn, cfg["chunk_bytes"])
    g = torch.empty(C, V, device=dev, dtype=hidden.dtype)  # (C, V) logit gradient of one chunk
    gb_part = torch.empty(C // bn, V, device=dev, dtype=torch.float32) if need_bias_grad else None
    for row0 in range(0, N, C):
        n = min(C, N - row0)
        logit_grad(row0, n, 0, g, gb_part)
        _lp.grads_from_logit_grad(g[:n], hidden, weight, row0, grad_hidden, grad_weight)
        if need_bias_grad:
            grad_bias += gb_part[:triton.cdiv(n, bn)].sum(0)
    return grad_hidden, grad_weight, grad_bias

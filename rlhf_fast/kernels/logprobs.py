"""Triton kernels for token log-probabilities (and entropy) of a softmax over the vocabulary.

Two entry points per direction:
  linear_logprobs_fwd / _bwd: logits z = (hidden @ weight.T + bias) / temperature are never materialised for
      all N tokens. The forward tiles over V with an online log-sum-exp; the backward recomputes the logits
      tile by tile and materialises only the logit *gradient* G for one chunk at a time (N x Vc columns, or
      C x V rows when N > V; input dtype, CONFIG["chunk_bytes"]), which two GEMMs turn into grad_hidden and
      grad_weight.
  logits_logprobs_fwd / _bwd: the same for logits (N, V) the caller already holds.

Launchers allocate outputs and pick grids; no autograd here (that lives in rlhf_fast/ops/logprobs.py).

Numerics: every load is upcast to fp32 (or fed to tl.dot in its own dtype with an fp32 accumulator on GPU);
the online statistics per row are m (running max), s = sum exp(z - m) and t = sum exp(z - m) (z - m), so
lse = m + log s and entropy = log s - t / s are both differences of O(log V) numbers, not of O(|z|) ones.

Flops (N tokens, H hidden, V vocabulary): forward 2NHV; backward 6NHV (2NHV to recompute the logits tile by
tile, 2NHV for grad_hidden = G @ W, 2NHV for grad_weight = G^T @ hidden). Forward + backward = 8NHV, the
1.33x-of-the-6NHV-GEMM-floor that the issue names as this op's own floor. The forward splits V across
programs (partial statistics per split, merged by a small kernel) only as far as needed to give the GPU
~4 programs per SM, so each program streams a contiguous range of W while its hidden tile stays in L2.
Beyond the GEMMs, the backward moves 6 B per logit of G (bf16), plus 8NH bytes of fp32 grad_hidden
accumulator per vocabulary chunk after the first: at N = 8192, H = 4096, V = 151936 (5 chunks of ~30k
columns) about 7.5 + 1 GB, ~3 ms of HBM next to ~56 ms of GEMM (8NHV); the issue's 1.5x goal (63 ms) thus
leaves the tl.dot GEMMs ~10% below cuBLAS speed. Not measured: no GPU when this was written.

Why the backward materialises G by chunks instead of fusing everything: grad_hidden needs a reduction over V
and grad_weight one over N, while each logit tile needs a reduction over H. A single fused kernel must keep
one of the two output accumulators on chip ((BLOCK_N, H) or (BLOCK_V, H) fp32: 2 MiB at H=4096, ten times an
H100 SM's shared memory) or use fp32 atomics into grad_hidden/grad_weight for every (N tile, V tile) pair
(V/BLOCK_V * N*H*4 bytes ~ 160 GB of atomic traffic at N=8192, H=4096, V=151936, BLOCK_V=128). Writing G once
in bf16 and reading it twice costs 6 bytes per logit, about 2.5 ms of HBM time at that shape, and keeps every
GEMM a plain, deterministic tiled GEMM (no atomics); the output reduced along the chunked axis is accumulated
in fp32 by a GEMM that adds into its fp32 output tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Launch configuration. The defaults are the GPU ones (H100, bf16): 128x128 fp32 accumulator tiles, 8 warps,
# 3 pipeline stages. Compiled for sm_90a (tests/ops/test_kernels_logprobs.py::test_kernels_compile_for_sm90a,
# with the divisibility a real launch sees) every tile kernel gets a 3-stage cp.async pipeline feeding wgmma,
# 96 KiB of shared memory and at most 193 registers per thread for bf16, with no spills. Their speed is not
# measured (no GPU in the session that wrote this): bench/ should tune them. Tests shrink them (tl.dot >= 16).
CONFIG = {
    # fused logits tile (forward statistics and backward gradient tiles)
    "block_n": 128,
    "block_v": 128,
    "block_h": 64,
    "num_warps": 8,
    "num_stages": 3,
    # plain GEMMs (grad_hidden, grad_weight, PPO logits chunk)
    "mm_block_m": 128,
    "mm_block_n": 128,
    "mm_block_k": 64,
    "mm_group_m": 8,
    # memory-bound row kernels on given logits
    "row_block_n": 16,
    "row_block_v": 256,
    "row_num_warps": 4,
    # bytes of logit scratch per chunk. Fewer, larger chunks are faster: every chunk after the first re-reads
    # and re-writes the fp32 accumulator of the output reduced along the chunked axis. Backward (bf16 G,
    # chunks along the shorter of N and V): 512 MiB, i.e. 5 chunks of ~30k columns at N = 8192, V = 151936
    # (4 x 268 MB of grad_hidden accumulator traffic), inside the 1 GiB extra-memory goal. PPO forward
    # (row chunks of fp32 Z + bf16 G, 6 B per logit; lse needs whole rows): 2 GiB, 4 chunks of 2048 rows, and
    # 3 x 5 GB of fp32 grad_weight read-modify-write; a tenth of the ~20 GiB that materialised logits need
    # (the issue sets no memory goal for it; raise it to 6NV bytes for a single chunk).
    "chunk_bytes": 512 << 20,
    "ppo_chunk_bytes": 2 << 30,
    # programs to aim for when splitting V across programs in the forward (None: 4 x SM count on CUDA, 4 on CPU)
    "target_programs": None,
}

# tl.dot always accumulates in fp32; the precision only matters for fp32 inputs (bf16/fp16 products are
# exact). On GPU fp32 tiles use 3xTF32 on the tensor cores (about fp32 accuracy; "ieee" FMA dots at 128x128
# spill 6 KB of registers per thread when compiled for sm_90a); "tf32" trades accuracy for speed, "ieee" is exact.
# The interpreter always computes exact fp32 products.
FP32_DOT_PRECISION = "tf32x3"

# Running-max start: finite, so exp(m_old - m_new) and (m_old - m_new) * 0 stay defined. A tl.constexpr:
# compiled Triton rejects plain Python globals inside kernels (the interpreter does not).
_NEG_BIG = tl.constexpr(-1.0e30)


def _c(x: torch.Tensor | None) -> torch.Tensor | None:
    # Kernels index rows with a unit inner stride; autograd may hand in expanded grads (stride 0), so make
    # every input dense (a no-op for the contiguous tensors the ops layer passes).
    return None if x is None else x.contiguous()


def _per_token(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_args(dtype: torch.dtype, block_k: int) -> tuple[dict, int]:
    """UPCAST, PREC and the K block for tl.dot on tiles of dtype.

    The interpreter cannot tl.dot bf16 tiles (numpy has no bf16), so there tiles are upcast to fp32 first
    (exact products, as on the tensor cores). The K block is given for 2-byte inputs and halved for fp32, so a
    pipeline stage holds the same bytes (sm_90a: 96 KiB of shared memory for 3 stages of 128x128 tiles).
    """
    interp = _interpreting()
    fp32 = dtype == torch.float32
    prec = FP32_DOT_PRECISION if fp32 and not interp else "ieee"
    bk = max(16, block_k // 2) if fp32 else block_k
    return dict(UPCAST=interp, PREC=prec), bk


# ----------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # z[rows, cols] = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_t, fp32, reduced over H in BLOCK_H steps.
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
        w = tl.load(w_ptr + cols64[None, :] * stride_w + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # (BLOCK_H, BLOCK_V) = W^T tile
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PREC)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc * inv_t


@triton.jit
def _tile_row_stats(z, cols, col_mask, tgt):
    # Per-row (max m, sum e^(z - m), sum e^(z - m) (z - m), target logit) of one (rows, BLOCK_V) logit tile;
    # columns past V are -inf. -inf logits (a masked vocabulary) contribute 0 to both sums, not NaN.
    z = tl.where(col_mask[None, :], z, float("-inf"))
    m = tl.maximum(tl.max(z, axis=1), _NEG_BIG)
    e = tl.exp(z - m[:, None])
    t = tl.sum(e * tl.where(z > float("-inf"), z - m[:, None], 0.0), axis=1)
    zt = tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m, tl.sum(e, axis=1), t, zt


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _logprobs_partials_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
                              N, V, H, stride_x, stride_w, inv_t, TILES_PER_SPLIT,
                              LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
                              PREC: tl.constexpr):
    # Program (row tile, V split): online (m, s, t) and the target logit over its share of the V tiles.
    # x is hidden (N, H) when LINEAR, else logits (N, V). Outputs are (SPLITS, N) fp32.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * TILES_PER_SPLIT * BLOCK_V
    for i in range(0, TILES_PER_SPLIT):
        cols = v_begin + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        if LINEAR:
            z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                             inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PREC)
        else:
            offs = rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
            z = tl.load(x_ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            z = z.to(tl.float32) * inv_t
        m_tile, s_tile, t_tile, zt_tile = _tile_row_stats(z, cols, col_mask, tgt)
        # merge the tile into the running statistics; sum e^(z - m_new) (z - m_new) over both parts is
        # alpha * (t + (m - m_new) s) with alpha = e^(m - m_new), and the same for the tile
        m_new = tl.maximum(m, m_tile)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_tile - m_new)
        t = alpha * (t + (m - m_new) * s) + beta * (t_tile + (m_tile - m_new) * s_tile)
        s = alpha * s + beta * s_tile
        zt += zt_tile
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(t_ptr + out, t, mask=row_mask)
    tl.store(zt_ptr + out, zt, mask=row_mask)


@triton.jit
def _logprobs_combine_kernel(m_ptr, s_ptr, t_ptr, zt_ptr, tgt_ptr, lp_ptr, ent_ptr, lse_ptr, N, SPLITS,
                             IGNORE, NEED_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    # Merge the per-split statistics (SPLITS, N) of each row, BLOCK_S splits at a time with the same online
    # rescaling as over V: lse = M + log S, logprob = z_target - lse, entropy = log S - T / S.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m_run = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    s_run = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_run = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, SPLITS, BLOCK_S):
        ks = k0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (ks < SPLITS)[None, :]
        offs = ks[None, :] * N + rows[:, None]
        m = tl.load(m_ptr + offs, mask=mask, other=_NEG_BIG)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        zt += tl.sum(tl.load(zt_ptr + offs, mask=mask, other=0.0), axis=1)
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        a_run = tl.exp(m_run - m_new)
        a = tl.exp(m - m_new[:, None])
        if NEED_ENT:
            t = tl.load(t_ptr + offs, mask=mask, other=0.0)
            t_run = a_run * (t_run + (m_run - m_new) * s_run) + tl.sum(a * (t + (m - m_new[:, None]) * s), 1)
        s_run = a_run * s_run + tl.sum(a * s, axis=1)
        m_run = m_new
    s_run = tl.where(row_mask, s_run, 1.0)  # rows past N: keep log() quiet
    lse = m_run + tl.log(s_run)
    ignored = tl.load(tgt_ptr + rows, mask=row_mask, other=IGNORE) == IGNORE
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(lp_ptr + rows, tl.where(ignored, 0.0, zt - lse), mask=row_mask)
    if NEED_ENT:
        ent = tl.log(s_run) - t_run / s_run
        tl.store(ent_ptr + rows, tl.where(ignored, 0.0, ent), mask=row_mask)


@triton.jit
def _logprobs_grad_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, g_ptr, gb_ptr,
                          row0, n_rows, col0, col_end, H, stride_x, stride_w, stride_g, stride_gb, inv_t,
                          g_scale, IGNORE,
                          LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr,
                          BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # G[r, j] = g_scale * (glp ([j == target] - p_j) - gent p_j (z_j - lse + entropy)) for the rows
    # row0 .. row0 + n_rows and vocabulary columns col0 .. col_end; G is chunk-local (G[r, c] is row row0 + r,
    # column col0 + c). Ignored rows give 0. When BIAS_GRAD, also the fp32 column sums of this tile into
    # gb[pid_n, c] (deterministic, no atomics).
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col0 + local_cols
    row_mask = local < n_rows
    col_mask = cols < col_end
    rows = row0 + local
    if LINEAR:
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                         inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PREC)
    else:
        offs = rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
        z = tl.load(x_ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        z = z.to(tl.float32) * inv_t
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=IGNORE)
    active = row_mask & (tgt != IGNORE)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    g = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - p * glp[:, None]
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        d_ent = p * tl.where(z > float("-inf"), z - lse[:, None] + ent[:, None], 0.0)
        g -= gent[:, None] * d_ent
    g = tl.where(active[:, None] & col_mask[None, :], g * g_scale, 0.0)
    g_offs = local.to(tl.int64)[:, None] * stride_g + local_cols[None, :]
    tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if BIAS_GRAD:
        tl.store(gb_ptr + pid_n * stride_gb + local_cols, tl.sum(g, axis=0), mask=col_mask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, scale,
                   ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # C (+)= (A @ B + bias[None, :]) * scale with an fp32 accumulator; A, B any strides (transposes are
    # strides). Grouped program order so GROUP_M row tiles share each B column tile while it is in L2.
    # STATS (C = logits): also the softmax row statistics of this tile, as split pid_n of (N tiles, M) buffers,
    # so the logits need not be read back for the log-sum-exp.
    pid = tl.program_id(0)
    # plain integer ceil-division rather than tl.cdiv: tl.cdiv is a @jit helper of triton.language, which is a
    # compiled-mode JITFunction if triton was first imported without TRITON_INTERPRET=1 (seen in the test suite)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = rk < K
        a = tl.load(a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn64[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if STATS:
        tgt = tl.load(tgt_ptr + rm, mask=m_mask, other=-1)
        m_t, s_t, t_t, zt_t = _tile_row_stats(acc, rn, n_mask, tgt)
        st = pid_n * M + rm
        tl.store(m_ptr + st, m_t, mask=m_mask)
        tl.store(s_ptr + st, s_t, mask=m_mask)
        tl.store(t_ptr + st, t_t, mask=m_mask)
        tl.store(zt_ptr + st, zt_t, mask=m_mask)
    c_offs = rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------- helpers


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, bias: torch.Tensor | None = None,
           scale: float = 1.0, accumulate: bool = False,
           stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """out (+)= (a @ b + bias) * scale, fp32 accumulation; a (M, K), b (K, N), out (M, N), any strides.

    stats = (targets (M,), part (4, >= cdiv(N, mm_block_n) * M) fp32): out are logits; also write the per-(row,
    column tile) softmax statistics m, s, t, z_target into part[i][tile * M + row], for combine_stats.
    """
    M, K = a.shape
    N = b.shape[1]
    cfg = CONFIG
    dot, bk = _dot_args(a.dtype, cfg["mm_block_k"])
    bm, bn = cfg["mm_block_m"], cfg["mm_block_n"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    tgt, part = stats if stats is not None else (out, (out, out, out, out))
    _matmul_kernel[grid](
        a, b, out, bias if bias is not None else out, tgt, part[0], part[1], part[2], part[3], M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), scale,
        ACCUMULATE=accumulate, HAS_BIAS=bias is not None, STATS=stats is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["mm_group_m"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **dot)
    return out


def _target_programs(device: torch.device) -> int:
    if CONFIG["target_programs"] is not None:
        return CONFIG["target_programs"]
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def chunk_rows(N: int, V: int, bytes_per_logit: int, block_n: int, budget: int) -> int:
    """Rows per chunk: the (C, V) scratch stays within budget bytes, C is a multiple of the row tiles of the
    kernels and GEMMs that read it, and the chunks are as even as that allows (no thin last chunk that
    leaves most SMs idle in its grad_hidden GEMM)."""
    align = max(block_n, CONFIG["mm_block_m"])  # powers of two: the larger is a multiple of the smaller
    c_max = max(align, budget // max(1, V * bytes_per_logit) // align * align)
    n_chunks = triton.cdiv(N, c_max)
    return triton.cdiv(triton.cdiv(N, n_chunks), align) * align


def logprobs_stats(x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
                   bias: torch.Tensor | None, inv_t: float, ignore_index: int, need_entropy: bool,
                   lp: torch.Tensor, ent: torch.Tensor | None, lse: torch.Tensor) -> None:
    """Fill lp, ent, lse (N,) fp32 for the rows of x: hidden (N, H) when weight is given, else logits (N, V)."""
    linear = weight is not None
    N = x.shape[0]
    if N == 0:
        return
    V = weight.shape[0] if linear else x.shape[1]
    H = x.shape[1] if linear else 0
    cfg = CONFIG
    if linear:
        bn, bv, warps = cfg["block_n"], cfg["block_v"], cfg["num_warps"]
    else:
        bn, bv, warps = cfg["row_block_n"], cfg["row_block_v"], cfg["row_num_warps"]
    dot, bh = _dot_args(x.dtype, cfg["block_h"])
    n_tiles = triton.cdiv(N, bn)
    v_tiles = triton.cdiv(V, bv)
    # Split V across programs only as far as needed to fill the device (each split re-reads the hidden tile).
    splits = max(1, min(v_tiles, triton.cdiv(_target_programs(x.device), n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    part = torch.empty(4, splits, N, device=x.device, dtype=torch.float32)  # m, s, t, z_target
    _logprobs_partials_kernel[(n_tiles, splits)](
        x, weight if linear else x, bias if bias is not None else x, targets, part[0], part[1], part[2],
        part[3], N, V, H, x.stride(0), weight.stride(0) if linear else 0, inv_t, tiles_per_split,
        LINEAR=linear, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, **dot,
        num_stages=cfg["num_stages"] if linear else 1)
    combine_stats(part, splits, targets, ignore_index, lp, ent, lse)


def combine_stats(part: torch.Tensor, splits: int, targets: torch.Tensor, ignore_index: int, lp: torch.Tensor,
                  ent: torch.Tensor | None, lse: torch.Tensor) -> None:
    """lp, ent (None: skip), lse (N,) from per-split statistics part[i][split * N + row], i = m, s, t, z_t."""
    N = lp.shape[0]
    block_s = min(64, triton.next_power_of_2(splits))
    block_rows = min(256, 4096 // block_s)
    _logprobs_combine_kernel[(triton.cdiv(N, block_rows),)](
        part[0], part[1], part[2], part[3], targets, lp, ent if ent is not None else lp, lse, N, splits,
        ignore_index, NEED_ENT=ent is not None, BLOCK_N=block_rows, BLOCK_S=block_s, num_warps=4)


def logprobs_grad(x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
                  bias: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor | None,
                  grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, inv_t: float,
                  g_scale: float, ignore_index: int, row0: int, n_rows: int, g: torch.Tensor,
                  gb_part: torch.Tensor | None, col0: int = 0) -> None:
    """Logit gradient of rows row0 .. row0 + n_rows and columns col0 .. col0 + g.shape[1] of x into g[:n_rows]
    (g's rows may be strided), and per-row-tile bias partial sums into gb_part (row tiles, >= g.shape[1])."""
    linear = weight is not None
    n_cols = g.shape[1]
    cfg = CONFIG
    if linear:
        bn, bv, warps = cfg["block_n"], cfg["block_v"], cfg["num_warps"]
    else:
        bn, bv, warps = cfg["row_block_n"], cfg["row_block_v"], cfg["row_num_warps"]
    has_ent = grad_entropy is not None and entropy is not None
    dot, bh = _dot_args(x.dtype, cfg["block_h"])
    grid = (triton.cdiv(n_rows, bn), triton.cdiv(n_cols, bv))
    _logprobs_grad_kernel[grid](
        x, weight if linear else x, bias if bias is not None else x, targets, lse,
        entropy if has_ent else lse, grad_logprobs, grad_entropy if has_ent else grad_logprobs, g,
        gb_part if gb_part is not None else lse, row0, n_rows, col0, col0 + n_cols, x.shape[1] if linear else 0,
        x.stride(0), weight.stride(0) if linear else 0, g.stride(0),
        gb_part.stride(0) if gb_part is not None else 0, inv_t, g_scale, ignore_index, LINEAR=linear,
        HAS_BIAS=bias is not None, HAS_ENT=has_ent, BIAS_GRAD=gb_part is not None, BLOCK_N=bn,
        BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, **dot,
        num_stages=cfg["num_stages"] if linear else 1)


def grads_from_logit_grad(g: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, row0: int,
                          grad_hidden: torch.Tensor, grad_weight: torch.Tensor | None) -> None:
    """grad_hidden[rows] = G @ W; grad_weight (+)= G^T @ hidden[rows]: fp32, written by the first chunk
    (row0 == 0, so grad_weight needs no zero fill) and accumulated by the later ones."""
    n = g.shape[0]
    matmul(g, weight, grad_hidden[row0:row0 + n])
    if grad_weight is not None:
        matmul(g.t(), hidden[row0:row0 + n], grad_weight, accumulate=row0 > 0)


# ----------------------------------------------------------------------------------------------- launchers


def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, temperature: float, ignore_index: int,
                        need_entropy: bool):
    """Log-probs (and entropy) of targets under softmax((hidden @ weight.T + bias) / temperature).

    hidden (N, H), weight (V, H), bias (V,) or None, all one float dtype; targets (N,) int64, each in [0, V)
    or == ignore_index. Returns (logprobs (N,) fp32, entropy (N,) fp32 or None, lse (N,) fp32); ignored rows
    give logprob 0 and entropy 0. 2NHV flops, O(N) extra memory.
    """
    hidden, weight, targets, bias = _c(hidden), _c(weight), _c(targets), _c(bias)
    N = hidden.shape[0]
    lp = torch.empty(N, device=hidden.device, dtype=torch.float32)  # (N,)
    ent = torch.empty_like(lp) if need_entropy else None  # (N,)
    lse = torch.empty_like(lp)  # (N,)
    logprobs_stats(hidden, weight, targets, bias, 1.0 / temperature, ignore_index, need_entropy, lp, ent, lse)
    return lp, ent, lse


def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor | None,
                        grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, temperature: float,
                        ignore_index: int, need_weight_grad: bool, need_bias_grad: bool):
    """Gradients of sum(grad_logprobs * logprobs + grad_entropy * entropy) (see linear_logprobs_fwd).

    lse, entropy (N,) fp32 from the forward; grad_logprobs, grad_entropy (N,) fp32 (grad_entropy None: no
    entropy term). Returns (grad_hidden (N, H) in hidden.dtype, grad_weight (V, H) fp32 or None,
    grad_bias (V,) fp32 or None). Recomputes the logits tile by tile; 6NHV flops.

    The logit gradient G is materialised one chunk at a time (CONFIG["chunk_bytes"]), along the shorter of
    N and V: the output whose reduction runs along the chunked axis is accumulated across chunks in fp32, and
    that costs a read-modify-write of 8 * (other axis) * H bytes per chunk. Chunking V (the usual N < V) only
    re-touches an (N, H) fp32 grad_hidden accumulator (268 MB at N = 8192, H = 4096) instead of the (V, H)
    grad_weight (5 GB at V = 151936), and each grad_weight slice is finished by one GEMM with K = N.
    """
    hidden, weight, targets, bias = _c(hidden), _c(weight), _c(targets), _c(bias)
    lse, entropy, grad_logprobs, grad_entropy = map(_per_token, (lse, entropy, grad_logprobs, grad_entropy))
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    # (V, H): written whole by the first chunk's GEMM; zeros only when there is no chunk
    grad_weight = torch.empty(V, H, device=dev, dtype=torch.float32) if need_weight_grad else None
    need_bias_grad = need_bias_grad and bias is not None
    grad_bias = torch.zeros(V, device=dev, dtype=torch.float32) if need_bias_grad else None
    if N == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return grad_hidden, grad_weight, grad_bias
    bn = CONFIG["block_n"]
    inv_t = 1.0 / temperature
    if N <= V:
        # chunks of Vc vocabulary columns, all N rows
        Vc = chunk_rows(V, N, hidden.element_size(), CONFIG["block_v"], CONFIG["chunk_bytes"])
        g = torch.empty(N, Vc, device=dev, dtype=hidden.dtype)  # (N, Vc) logit gradient of one chunk
        gb_part = torch.empty(triton.cdiv(N, bn), Vc, device=dev, dtype=torch.float32) if need_bias_grad else None
        fp32 = hidden.dtype == torch.float32
        acc = grad_hidden if fp32 else torch.empty(N, H, device=dev, dtype=torch.float32)  # (N, H)
        for col0 in range(0, V, Vc):
            vc = min(Vc, V - col0)
            gc = g[:, :vc]
            logprobs_grad(hidden, weight, targets, bias, lse, entropy, grad_logprobs, grad_entropy, inv_t, inv_t,
                          ignore_index, 0, N, gc, gb_part, col0=col0)
            matmul(gc, weight[col0:col0 + vc], acc, accumulate=col0 > 0)
            if grad_weight is not None:
                matmul(gc.t(), hidden, grad_weight[col0:col0 + vc])
            if need_bias_grad:
                grad_bias[col0:col0 + vc] = gb_part[:, :vc].sum(0)
        if not fp32:
            grad_hidden.copy_(acc)
        return grad_hidden, grad_weight, grad_bias

    # chunks of C rows, all V columns
    C = chunk_rows(N, V, hidden.element_size(), bn, CONFIG["chunk_bytes"])
    g = torch.empty(C, V, device=dev, dtype=hidden.dtype)  # (C, V) logit gradient of one chunk
    gb_part = torch.empty(C // bn, V, device=dev, dtype=torch.float32) if need_bias_grad else None
    for row0 in range(0, N, C):
        n = min(C, N - row0)
        logprobs_grad(hidden, weight, targets, bias, lse, entropy, grad_logprobs, grad_entropy, inv_t, inv_t,
                      ignore_index, row0, n, g, gb_part)
        grads_from_logit_grad(g[:n], hidden, weight, row0, grad_hidden, grad_weight)
        if need_bias_grad:
            grad_bias += gb_part[:triton.cdiv(n, bn)].sum(0)
    return grad_hidden, grad_weight, grad_bias


def logits_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int,
                        need_entropy: bool):
    """As linear_logprobs_fwd for logits (N, V) the caller holds: softmax(logits / temperature)."""
    logits, targets = _c(logits), _c(targets)
    N = logits.shape[0]
    lp = torch.empty(N, device=logits.device, dtype=torch.float32)  # (N,)
    ent = torch.empty_like(lp) if need_entropy else None  # (N,)
    lse = torch.empty_like(lp)  # (N,)
    logprobs_stats(logits, None, targets, None, 1.0 / temperature, ignore_index, need_entropy, lp, ent, lse)
    return lp, ent, lse


def logits_logprobs_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        entropy: torch.Tensor | None, grad_logprobs: torch.Tensor,
                        grad_entropy: torch.Tensor | None, temperature: float, ignore_index: int):
    """grad_logits (N, V) in logits.dtype of sum(grad_logprobs * logprobs + grad_entropy * entropy)."""
    logits, targets = _c(logits), _c(targets)
    lse, entropy, grad_logprobs, grad_entropy = map(_per_token, (lse, entropy, grad_logprobs, grad_entropy))
    N, V = logits.shape
    grad_logits = torch.empty_like(logits)  # (N, V)
    if N == 0:
        return grad_logits
    logprobs_grad(logits, None, targets, None, lse, entropy, grad_logprobs, grad_entropy, 1.0 / temperature,
                  1.0 / temperature, ignore_index, 0, N, grad_logits, None)
    return grad_logits

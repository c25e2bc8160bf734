"""Triton kernels for GAE and KL-penalised GAE (Schulman et al. 2016): a reverse associative scan of affine maps.

Per row, walking t from T-1 down to 0 with next_value = 0 and last = 0: where mask[t] != 0,
delta = r[t] + gamma * next_value - v[t], last = delta + gamma * lam * last, adv[t] = last, next_value = v[t];
masked positions are skipped (adv = 0, state unchanged). returns = adv + v where valid, else 0.
KL variant: r[t] = -kl_coef * kl(logprobs - ref_logprobs)[t] where valid (else 0), plus scores[b] at the last
valid position of the row; estimator 0 = k1 (d), 1 = k2 (d^2 / 2), 2 = k3 (exp(-d) - 1 + d), 3 = abs (|d|), as
kernels/_estimators.py evaluates them.

Scan formulation. Each step maps `last` affinely, last_t = a_t * last_{t+1} + b_t, with (a, b) = (gamma * lam,
delta_t) at a valid step and (1, 0) at a masked one; maps compose associatively. delta_t needs nv_t, the value
at the next valid position after t, itself a reverse scan ("first valid value to my right"). A program owns
BLOCK_B rows and walks them from the end in chunks of BLOCK_T, carrying (next value, any valid seen, last)
from chunk to chunk, so T is unbounded.

Masked positions are selected out with tl.where, never multiplied by the mask: NaN or inf there does not
leak, while NaN at a valid position reaches it and every earlier valid position, as in the loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._estimators import kl_estimate

# tl.associative_scan(reverse=True) is flip(scan(flip)) (interpreter and GPU lowering alike, as in
# jax.lax.associative_scan): the combine function gets (accumulated later positions, current earlier
# element), in that order. Both combines below are written for that order; they are not commutative.


@triton.jit
def _first_valid_combine(seen_later, v_later, seen_here, v_here):
    # The value at the first valid position of the joined segment: mine if I have one, else the later one's.
    return seen_here | seen_later, tl.where(seen_here != 0, v_here, v_later)


@triton.jit
def _affine_combine(a_later, b_later, a_here, b_here):
    # Apply the later map first, then mine: x -> a_here * (a_later * x + b_later) + b_here.
    return a_here * a_later, a_here * b_later + b_here


@triton.jit
def _gae_fwd_kernel(x_ptr, ref_ptr, v_ptr, m_ptr, score_ptr, adv_ptr, ret_ptr, rew_ptr, B, T, kl_coef, gamma,
                    lam, KL: tl.constexpr, ESTIMATOR: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    # x_ptr: rewards (gae) or logprobs (KL). ref_ptr, score_ptr, rew_ptr: KL only.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)
    base = rows.to(tl.int64)[:, None] * T  # (BLOCK_B, 1)
    c = gamma * lam
    if KL:
        score = tl.load(score_ptr + rows, mask=row_ok, other=0.0)
    # State entering the current chunk from its right.
    carry_nv = tl.zeros([BLOCK_B], dtype=tl.float32)  # v at the nearest valid position right of the chunk
    carry_seen = tl.zeros([BLOCK_B], dtype=tl.int32)  # a valid position exists right of the chunk
    carry_last = tl.zeros([BLOCK_B], dtype=tl.float32)  # `last` after the steps right of the chunk
    n_chunks = tl.cdiv(T, BLOCK_T)
    for k in range(n_chunks):
        t = (n_chunks - 1 - k) * BLOCK_T + cols
        ok = row_ok[:, None] & (t < T)[None, :]  # (BLOCK_B, BLOCK_T)
        offs = base + t[None, :]
        m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        valid = m != 0.0

        # nv_t: first valid value strictly after t. Scan the shifted neighbours (t + 1) inside the chunk;
        # the neighbour of the chunk's last column lies in the next chunk, so it comes from the carry.
        ok_n = row_ok[:, None] & ((t + 1) < T)[None, :] & ((cols + 1) < BLOCK_T)[None, :]
        m_n = tl.load(m_ptr + offs + 1, mask=ok_n, other=0.0)
        v_n = tl.load(v_ptr + offs + 1, mask=ok_n, other=0.0).to(tl.float32)
        seen_n, nv = tl.associative_scan(((m_n != 0.0).to(tl.int32), v_n), axis=1,
                                         combine_fn=_first_valid_combine, reverse=True)
        nv = tl.where(seen_n != 0, nv, carry_nv[:, None])

        if KL:
            lp = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            r = tl.where(valid, -kl_coef * kl_estimate(lp - ref, ESTIMATOR), 0.0)
            # The score goes to the last valid position of the row: valid, with nothing valid after it.
            later = (seen_n != 0) | (carry_seen[:, None] != 0)
            r = tl.where(valid & (later == 0), r + score[:, None], r)
            tl.store(rew_ptr + offs, r, mask=ok)
        else:
            r = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)

        a = tl.where(valid, c, 1.0)
        b = tl.where(valid, r + gamma * nv - v, 0.0)
        a_acc, b_acc = tl.associative_scan((a, b), axis=1, combine_fn=_affine_combine, reverse=True)
        last = a_acc * carry_last[:, None] + b_acc  # state after each step, entering from the carry
        adv = tl.where(valid, last, 0.0)
        tl.store(adv_ptr + offs, adv, mask=ok)
        tl.store(ret_ptr + offs, tl.where(valid, adv + v, 0.0), mask=ok)

        # Carries for the chunk to the left: the state at this chunk's first column (selected, not
        # multiplied, so a NaN elsewhere in the chunk does not leak into it).
        first = (cols == 0)[None, :]
        carry_last = tl.sum(tl.where(first, last, 0.0), axis=1)
        carry_nv = tl.sum(tl.where(first, tl.where(valid, v, nv), 0.0), axis=1)
        carry_seen = tl.maximum(carry_seen, tl.max(valid.to(tl.int32), axis=1))


def _check(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _blocks(B: int, T: int, block_t: int | None) -> tuple[int, int]:
    # One chunk covers up to 1024 positions; rows are stacked until a program holds ~2048 elements.
    # Not tuned on a GPU (none was available when this was written).
    block_t = block_t or min(1024, triton.next_power_of_2(max(T, 1)))
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), 2048 // block_t))
    return block_b, block_t


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, *,
            block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over (B, T) rows with holes in the mask (semantics in the module docstring).

    Args:
        rewards, values, mask: (B, T) fp32 contiguous, one device; mask 0/1 (non-zero = valid).
        gamma, lam: discount and GAE lambda.
        block_t: chunk length along T (a power of two; default min(1024, next_pow2(T))).

    Returns:
        (advantages, returns), each (B, T) fp32.
    """
    shape, dev = tuple(rewards.shape), rewards.device
    if len(shape) != 2:
        raise ValueError(f"rewards must be 2-D (B, T), got shape {shape}")
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        _check(name, x, shape, dev)
    B, T = shape
    adv = torch.empty_like(rewards)  # (B, T)
    ret = torch.empty_like(rewards)  # (B, T)
    if B == 0 or T == 0:
        return adv, ret
    block_b, block_t = _blocks(B, T, block_t)
    _gae_fwd_kernel[(triton.cdiv(B, block_b),)](
        rewards, rewards, values, mask, rewards, adv, ret, adv, B, T, 0.0, float(gamma), float(lam),
        KL=False, ESTIMATOR=0, BLOCK_B=block_b, BLOCK_T=block_t)
    return adv, ret


def kl_penalized_gae_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                         scores: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float, lam: float,
                         estimator: int, *, block_t: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL-penalised rewards and GAE in one pass (semantics in the module docstring).

    Args:
        logprobs, ref_logprobs, values, mask: (B, T) fp32 contiguous, one device; mask 0/1.
        scores: (B,) fp32 sequence scores, added at each row's last valid position.
        kl_coef, gamma, lam: floats.  estimator: 0 k1, 1 k2, 2 k3, 3 abs.
        block_t: chunk length along T (a power of two; default min(1024, next_pow2(T))).

    Returns:
        (advantages, returns, rewards), each (B, T) fp32.
    """
    shape, dev = tuple(logprobs.shape), logprobs.device
    if len(shape) != 2:
        raise ValueError(f"logprobs must be 2-D (B, T), got shape {shape}")
    for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values),
                    ("mask", mask)):
        _check(name, x, shape, dev)
    _check("scores", scores, shape[:1], dev)
    if estimator not in (0, 1, 2, 3):
        raise ValueError(f"estimator must be 0 (k1), 1 (k2), 2 (k3) or 3 (abs), got {estimator!r}")
    B, T = shape
    adv = torch.empty_like(logprobs)  # (B, T)
    ret = torch.empty_like(logprobs)  # (B, T)
    rew = torch.empty_like(logprobs)  # (B, T)
    if B == 0 or T == 0:
        return adv, ret, rew
    block_b, block_t = _blocks(B, T, block_t)
    _gae_fwd_kernel[(triton.cdiv(B, block_b),)](
        logprobs, ref_logprobs, values, mask, scores, adv, ret, rew, B, T, float(kl_coef), float(gamma),
        float(lam), KL=True, ESTIMATOR=int(estimator), BLOCK_B=block_b, BLOCK_T=block_t)
    return adv, ret, rew

"""TRL integration: one call makes TRL's trainers score tokens with `rlhf_fast.ops.fused_linear_logprobs`.

    from rlhf_fast.integrations.trl import patch_trl
    patch_trl()   # before or after building GRPOTrainer / DPOTrainer; unpatch_trl() undoes it

Where TRL 1.16 computes per-token log-probs. GRPOTrainer and DPOTrainer (and RLOOTrainer, KTOTrainer,
SFTTrainer) call `trl.trainer.utils.add_fused_lm_head(model, ...)` when they are built. It wraps
`model.forward`; called with `fused_lm_head=True`, the wrapper runs the backbone (looked up per call, so
PEFT and FSDP wrapping are honoured), shifts the labels, takes the last hidden states (N, H) and the lm_head
weight (V, H) and hands them to the module global `trl.trainer.utils._ChunkedLogProbFunction`, TRL's own
vocabulary-tiled autograd kernel, then scatters its per-token outputs back to (B, T - 1) and zeroes the
positions whose label is -100. So TRL 1.16 already never builds the whole (B, T, V) logits; its kernel
holds one (min(N, 4096), 32768) tile per call in the compute dtype.

What is patched: that one module global, nothing else. `patch_trl()` swaps `_ChunkedLogProbFunction` for
`FusedLinearLogprobsHead`, which returns the same five per-token outputs computed by
`fused_linear_logprobs` (fp32 blocks of at most 2^20 logits). The wrapper looks the global up at every
call, so trainers built before the patch use it too. Everything around the kernel stays TRL's: backbone
call, PEFT adapters and reference adapter, label shift and -100 masking, GRPO's `logits_to_keep` slicing
and per-chunk batching, the temperature TRL configured, the losses and metrics.

Falls back to TRL's kernel (with a one-time warning) where `fused_linear_logprobs` cannot give TRL's
semantics: a final-logit tanh soft-cap (Gemma 2/3), a non-positive logit scale, and DeepSpeed ZeRO-3 (its
backward re-reads the lm_head weight outside TRL's gather context).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from rlhf_fast import ops

# TRL's kernel, ChunkedLogProbFunction.forward(ctx, ...), as of TRL 1.16. patch_trl refuses other signatures:
# a positional mismatch would silently score the wrong thing.
_TRL_KERNEL_ARGS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                    "logit_scale", "outputs")
_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Metrics pass: fp32 tiles of at most _BLOCK_ELEMS logits, as in the torch backend of ops/logprobs.py.
_BLOCK_V = 4096
_BLOCK_ELEMS = 1 << 20

_original = None  # TRL's _ChunkedLogProbFunction while the patch is on
_warned: set[str] = set()


def _fallback_reason(final_logit_softcapping, logit_scale) -> str | None:
    if final_logit_softcapping is not None:
        return ("the model soft-caps its logits (final_logit_softcapping); fused_linear_logprobs has no soft-cap, "
                "so TRL's own kernel scores this model")
    if not logit_scale > 0:
        return f"logit_scale={logit_scale} cannot be folded into a temperature; TRL's own kernel scores this model"
    if is_deepspeed_zero3_enabled():
        return ("DeepSpeed ZeRO-3 partitions the lm_head weight that fused_linear_logprobs' backward re-reads; "
                "TRL's own kernel (which gathers it) is used")
    return None


def _top1_and_log_sum_sq(hidden, weight, bias, targets, temperature):
    # Metric-only outputs TRL asks for (DPO's mean_token_accuracy, WPO weights) that fused_linear_logprobs does
    # not return: whether the target is the first argmax, and log sum_v p_v^2. One extra no-grad pass.
    n, v = hidden.shape[0], weight.shape[0]
    bv = min(v, _BLOCK_V)
    bn = max(1, min(n, _BLOCK_ELEMS // max(bv, 1)))
    top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
    log_sum_sq = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, bn):
        r1 = min(n, r0 + bn)
        h = hidden[r0:r1].float()
        m = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        arg = torch.zeros(r1 - r0, dtype=torch.int64, device=hidden.device)
        s = torch.zeros_like(m)  # sum exp(z - m)
        q = torch.zeros_like(m)  # sum exp(2 (z - m))
        for v0 in range(0, v, bv):
            v1 = min(v, v0 + bv)
            z = h @ weight[v0:v1].float().T  # (bn, bv)
            if bias is not None:
                z = z + bias[v0:v1].float()
            z = z / temperature
            block_max, block_arg = z.max(dim=1)  # first maximum inside the block
            arg = torch.where(block_max > m, block_arg + v0, arg)  # strict: an earlier tie keeps the argmax
            m_new = torch.maximum(m, block_max)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(dim=1)
            q = q * scale * scale + (e * e).sum(dim=1)
            m = m_new
        top1[r0:r1] = arg == targets[r0:r1]
        log_sum_sq[r0:r1] = torch.log(q) - 2 * torch.log(s)
    return top1, log_sum_sq


class FusedLinearLogprobsHead:
    """Stand-in for TRL's `_ChunkedLogProbFunction`, with its call signature and outputs, computed by
    `rlhf_fast.ops.fused_linear_logprobs`.

    `apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
    outputs)`:
        hidden: (N, H) last hidden states of the positions TRL scores; weight: (V, H) lm_head weight;
        bias: (V,) or None; targets: (N,) int64 next-token ids in [0, V).
        temperature: TRL's sampling temperature; logit_scale: the config's logit multiplier s. The scored
            distribution is softmax(s * (hidden @ weight.T + bias) / temperature), i.e. fused_linear_logprobs
            at temperature / s.
        chunk_size: TRL's vocabulary tile width; unused (fused_linear_logprobs picks its own blocks).
        outputs: which optional fields to compute, among entropy, log_sum_sq_probs, mean_logits, is_top1.

    Returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None when not asked
    for: log_probs and entropy fp32 and differentiable in hidden, weight and bias (the formula is in
    fused_linear_logprobs); log_sum_sq_probs = log sum_v p_v^2, mean_logits = mean_v z_v (exact as
    hidden @ mean_v(weight) + mean(bias), scaled) and is_top1 (target == first argmax) without gradient.
    Under autocast the logits are computed in fp32 (TRL tiles them in the autocast dtype); hidden is cast to
    weight's dtype when the two differ.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=_OPTIONAL_OUTPUTS):
        reason = _fallback_reason(final_logit_softcapping, logit_scale)
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"rlhf_fast.integrations.trl: {reason}", stacklevel=2)
            # trl is optional: imported where it is used
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction

            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                final_logit_softcapping, logit_scale, outputs)
        t = float(temperature) / float(logit_scale)  # s * z / T = z / (T / s)
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        want_entropy = "entropy" in outputs
        with torch.autocast(hidden.device.type, enabled=False):
            res = ops.fused_linear_logprobs(hidden, weight, targets, bias, temperature=t,
                                            return_entropy=want_entropy)
        log_probs, entropy = res if want_entropy else (res, None)
        log_sum_sq = mean_logits = top1 = None
        with torch.no_grad():
            if "mean_logits" in outputs:
                w_mean = weight.mean(dim=0, dtype=torch.float32)  # (H,): mean_v z_v is linear in weight
                mean_logits = hidden.float() @ w_mean
                if bias is not None:
                    mean_logits = mean_logits + bias.mean(dtype=torch.float32)
                mean_logits = mean_logits / t
            if "is_top1" in outputs or "log_sum_sq_probs" in outputs:
                top1, log_sum_sq = _top1_and_log_sum_sq(hidden, weight, bias, targets, t)
                top1 = top1 if "is_top1" in outputs else None
                log_sum_sq = log_sum_sq if "log_sum_sq_probs" in outputs else None
        return log_probs, entropy, log_sum_sq, mean_logits, top1


def _trl_utils():
    # trl is optional: imported here, not at the top of the module
    try:
        import trl
        import trl.trainer.utils as trl_utils
    except ImportError as e:
        raise ImportError("rlhf_fast.integrations.trl needs TRL: pip install 'trl==1.16.*'") from e
    kernel = _original if _original is not None else getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if kernel is None or not hasattr(trl_utils, "add_fused_lm_head"):
        raise RuntimeError(f"TRL {trl.__version__} has no trl.trainer.utils._ChunkedLogProbFunction / "
                           "add_fused_lm_head (the fused LM head of TRL 1.16) to patch")
    args = tuple(inspect.signature(kernel.forward).parameters)[1:]
    if args != _TRL_KERNEL_ARGS:
        raise RuntimeError(f"TRL {trl.__version__}'s _ChunkedLogProbFunction.forward takes {args}, "
                           f"this patch was written for {_TRL_KERNEL_ARGS} (TRL 1.16)")
    return trl_utils


def patch_trl() -> None:
    """Make TRL's fused LM head (GRPOTrainer, DPOTrainer, RLOO, KTO, SFT in TRL 1.16) compute per-token
    log-probs and entropy with `fused_linear_logprobs`. Idempotent; takes effect for trainers already built.
    Raises ImportError without TRL and RuntimeError when TRL's kernel is not the one this was written for."""
    global _original
    trl_utils = _trl_utils()
    if _original is None:
        _original = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = FusedLinearLogprobsHead


def unpatch_trl() -> None:
    """Restore TRL's own kernel. A no-op when the patch is off."""
    global _original
    if _original is None:
        return
    trl_utils = _trl_utils()
    trl_utils._ChunkedLogProbFunction = _original
    _original = None


def is_trl_patched() -> bool:
    return _original is not None


@contextlib.contextmanager
def trl_patched():
    """`with trl_patched(): trainer.train()`; restores TRL's kernel on exit unless it was patched before."""
    was_patched = is_trl_patched()
    patch_trl()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_trl()

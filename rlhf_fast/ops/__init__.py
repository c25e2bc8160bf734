"""Fused RLHF ops: the public API. Each function documents shapes, dtypes and its formula.

Backends are chosen per call from RLHF_FAST_BACKEND (auto | torch | triton | native); see rlhf_fast.ops._dispatch.
"""

from rlhf_fast.ops.fused_ppo import fused_linear_ppo_loss
from rlhf_fast.ops.gae import gae, kl_penalized_gae, masked_whiten
from rlhf_fast.ops.kl import kl_penalty
from rlhf_fast.ops.logprobs import fused_linear_logprobs, logprobs_from_logits
from rlhf_fast.ops.losses import aggregate, bradley_terry_loss, ppo_policy_loss, value_loss

__all__ = [
    "aggregate",
    "bradley_terry_loss",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "kl_penalized_gae",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_whiten",
    "ppo_policy_loss",
    "value_loss",
]

"""Fused RLHF ops: the public API. Each function documents shapes, dtypes and its formula.

Backends (auto | torch | triton | native): an op's `backend=` argument, else the innermost
`use_backend(...)` block, else RLHF_FAST_BACKEND, else auto; see rlhf_fast.ops._dispatch. The fused ops are
torch.library custom ops (torch.ops.rlhf_fast.*, see rlhf_fast.ops._library), so torch.compile traces
through them. The fused losses and the preference losses (rlhf_fast.ops.preference: DPO, SimPO, ORPO,
KTO) also come as nn.Modules (rlhf_fast.ops.modules).
"""

from rlhf_fast.ops._dispatch import use_backend
from rlhf_fast.ops.fused_kl import fused_linear_kl
from rlhf_fast.ops.fused_ppo import fused_linear_ppo_loss
from rlhf_fast.ops.gae import gae, kl_penalized_gae, masked_whiten
from rlhf_fast.ops.group_advantages import group_advantages
from rlhf_fast.ops.kl import kl_penalty
from rlhf_fast.ops.logprobs import fused_linear_logprobs, logprobs_from_logits
from rlhf_fast.ops.losses import aggregate, bradley_terry_loss, ppo_policy_loss, value_loss
from rlhf_fast.ops.modules import (
    BradleyTerryLoss,
    DPOLoss,
    FusedLinearKL,
    FusedLinearLogprobs,
    FusedLinearPPOLoss,
    KTOLoss,
    ORPOLoss,
    SimPOLoss,
    ValueLoss,
)
from rlhf_fast.ops.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss

__all__ = [
    "BradleyTerryLoss",
    "DPOLoss",
    "FusedLinearKL",
    "FusedLinearLogprobs",
    "FusedLinearPPOLoss",
    "KTOLoss",
    "ORPOLoss",
    "SimPOLoss",
    "ValueLoss",
    "aggregate",
    "bradley_terry_loss",
    "dpo_loss",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "group_advantages",
    "kl_penalized_gae",
    "kl_penalty",
    "kto_loss",
    "logprobs_from_logits",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "simpo_loss",
    "use_backend",
    "value_loss",
]

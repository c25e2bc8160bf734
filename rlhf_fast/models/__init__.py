"""The single-copy role model: one frozen base, LoRA adapters policy / critic / reward, value and score heads.

    role_model.py   RoleModel: construction, roles, forwards (log-probs, values, scores, experience)
    generation.py   sampling with a KV cache, the policy merged into the base for the rollout
    decode_step.py  one decode step of a Llama-family model written out (generation's loop)
    lean_lora.py    the LoRA layers' plain forward in one addmm
    io.py           save / load: the only code that knows the on-disk format
    conventions.py  role names, LoraSettings, input checks and the token alignment
"""

from rlhf_fast.models.conventions import ADAPTERS, ROLES, LoraSettings
from rlhf_fast.models.role_model import PolicyForward, RoleModel

__all__ = ["ADAPTERS", "ROLES", "LoraSettings", "PolicyForward", "RoleModel"]

"""The single-copy role model: one frozen base, LoRA adapters policy / critic / reward, value and score heads."""

from rlhf_fast.models.role_model import ADAPTERS, ROLES, LoraSettings, PolicyForward, RoleModel

__all__ = ["ADAPTERS", "ROLES", "LoraSettings", "PolicyForward", "RoleModel"]

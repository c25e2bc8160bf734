"""Names and input conventions shared by the role model, generation and save/load.

Alignment of every per-token output (B, T): entry t belongs to token input_ids[:, t] and is computed from the
hidden state at t - 1; token_mask says where such an entry is defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlhf_fast.errors import ConfigError

ROLES = ("policy", "reference", "critic", "reward")
ADAPTERS = ("policy", "critic", "reward")
IGNORE_INDEX = -100


def reward_member_name(k: int) -> str:
    """The adapter of reward-ensemble member k: "reward" for member 0 (a single reward model is an ensemble of
    one), "reward_1", "reward_2", ... for the others (RoleModel.set_reward_members)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"reward member index must be an integer >= 0, got {k!r}")
    return "reward" if k == 0 else f"reward_{k}"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters shared by the three adapters (Hu et al. 2021: W + (alpha / r) * B @ A)."""

    r: int = field(default=16, metadata={"help": "LoRA rank of each adapter"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha: the update is (alpha / r) * B @ A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input (training mode only)"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt (comma-separated on the command line); none: every linear layer inside "
                "the decoder blocks (not the embeddings or lm_head)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r must be an integer >= 1, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must lie in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
            self.target_modules = list(self.target_modules) or None


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Shapes and dtypes at the public boundary: input_ids (B, T) integer, attention_mask (B, T), B, T >= 1."""
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("input_ids and attention_mask must be torch.Tensor")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where token t and its predecessor t - 1 are both real; column 0 is False."""
    m = attention_mask.bool()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] & m[:, :-1]
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so left-padded rows score as if unpadded (as transformers' generate does).
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def shift_right(x: torch.Tensor) -> torch.Tensor:
    # (B, T, ...) -> (B, T, ...) with x[:, t] moved to t + 1 and zeros at 0.
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def resolve_device(name: str) -> torch.device:
    """--device NAME -> torch.device: "auto" is cuda when available, else cpu. ConfigError for a name torch does not
    know or cuda asked for without a CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asked for, but no CUDA device is available")
    return dev

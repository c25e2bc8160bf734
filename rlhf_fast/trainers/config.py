"""The config dataclasses every trainer shares: the fields common to all runs, the optimiser and the one LoRA
config (rlhf_fast.models.LoraSettings). Each trainer's config extends TrainConfig.

Every field is declared with `option(default, help)`: the CLI is generated from these dataclasses and `--help`
shows the help strings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings

__all__ = ["ConfigError", "LoraSettings", "OptimConfig", "TrainConfig", "option"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices=None):
    """A dataclass field with help text (shown by `rlhf-fast <cmd> --help`)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- configs
@dataclass
class OptimConfig:
    """AdamW over the adapters and heads, with warm-up and a decay schedule."""

    lr: float = option(1e-4, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(0, "linear warm-up steps")
    lr_scheduler: str = option("constant", "schedule after warm-up", choices=("constant", "linear", "cosine"))
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError("warmup_steps and max_grad_norm must be >= 0")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")


@dataclass
class TrainConfig:
    """Fields every trainer has. SFTConfig, RMConfig and PPOConfig extend it."""

    model: str = option("", "local transformers model folder (weights and tokenizer)")
    data: str = option("", "training data, JSONL")
    out_dir: str = option("out", "output folder: final adapters/heads, checkpoints/, metrics.jsonl")
    seed: int = option(0, "random seed (data order, dropout, sampling)")
    device: str = option("auto", "auto, cpu or cuda[:n]")
    dtype: str = option("auto", "base model dtype (auto: as saved)", choices=("auto", "float32", "bfloat16",
                                                                           "float16"))
    max_length: int = option(512, "context length: prompt + response tokens")
    batch_size: int = option(8, "examples per optimiser step")
    max_steps: int = option(0, "optimiser steps (0: epochs x steps per epoch)")
    epochs: int = option(1, "passes over the data when max_steps is 0")
    log_every: int = option(1, "write metrics every N steps")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir/checkpoints")
    progress: bool = option(True, "show a progress bar with live metrics")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward to save memory")
    optim: OptimConfig = option(factory=OptimConfig, help="optimiser")
    lora: LoraSettings = option(factory=lambda: LoraSettings(r=8, alpha=16.0),
                                help="LoRA adapters (flags --lora_r, --lora_alpha, --lora_dropout, "
                                     "--lora_target_modules)")

    def validate(self) -> None:
        if self.max_length <= 1:
            raise ConfigError(f"max_length must be > 1, got {self.max_length}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("max_steps must be >= 0 and epochs > 0")
        if self.log_every <= 0 or self.checkpoint_every < 0 or self.keep_checkpoints <= 0:
            raise ConfigError("log_every and keep_checkpoints must be > 0, checkpoint_every >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        self.optim.validate()
        self.lora.validate()

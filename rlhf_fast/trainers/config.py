"""The config dataclasses every trainer shares: the fields common to all runs, the optimiser and the one LoRA
config (rlhf_fast.models.LoraSettings). Each trainer's config extends TrainConfig.

Every field is declared with `option(default, help)`: the CLI is generated from these dataclasses and `--help`
shows the help strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings

__all__ = ["ConfigError", "LoraSettings", "OptimConfig", "TrainConfig", "check_finite", "option",
           "quiet_libraries", "quiet_unless_progress"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices=None):
    """A dataclass field with help text (shown by `rlhf-fast <cmd> --help`)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_finite(cfg, prefix: str = "") -> None:
    """ConfigError for any float field of the dataclass `cfg` (nested ones included) that is inf or nan: such a
    value (`--lr inf`, `--kl_coef 1e400`, which parses to inf) passes every range check written as a
    comparison and then poisons training. Names are the CLI's: nested fields keep their group's prefix where the
    CLI adds one (lora_alpha), else their own name (lr)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            check_finite(v, "lora_" if f.name == "lora" else "")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {v}")


def check_out_dir(path: str) -> None:
    """out_dir must be a folder or creatable as one: not empty, not an existing file, no file on its way."""
    if not path:
        raise ConfigError("out_dir must name a folder, got an empty string")
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ConfigError(f"out_dir {path!r} is a file, not a folder")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ConfigError(f"out_dir {path!r} cannot be created: {p!r} is a file")


# ----------------------------------------------------------------------------------------- configs
@dataclass
class OptimConfig:
    """AdamW over the adapters and heads, with warm-up and a decay schedule."""

    optimizer: str = option("adamw", "adamw, or sgd (plain SGD: lr and weight_decay; the betas and eps are unused)",
                            choices=("adamw", "sgd"))
    lr: float = option(1e-4, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(0, "linear warm-up steps")
    lr_scheduler: str = option("constant", "schedule after warm-up", choices=("constant", "linear", "cosine"))
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")

    def validate(self) -> None:
        check_finite(self)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"warmup_steps and max_grad_norm must be >= 0, got {self.warmup_steps}, "
                              f"{self.max_grad_norm}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")


@dataclass
class TrainConfig:
    """Fields every trainer has. SFTConfig, RMConfig and PPOConfig extend it."""

    model: str = option("", "local transformers model folder (weights and tokenizer)")
    data: str = option("", "training data, JSONL")
    out_dir: str = option("out", "output folder: final adapters/heads, checkpoints/, metrics.jsonl")
    seed: int = option(0, "random seed (data order, dropout, sampling), in [0, 2**32)")
    device: str = option("auto", "auto, cpu or cuda[:n]")
    dtype: str = option("auto", "base model dtype (auto: as saved)", choices=("auto", "float32", "bfloat16",
                                                                           "float16"))
    max_length: int = option(512, "context length: prompt + response tokens")
    batch_size: int = option(8, "examples per optimiser step")
    max_steps: int = option(0, "optimiser steps (0: epochs x steps per epoch)")
    epochs: int = option(1, "passes over the data when max_steps is 0")
    log_every: int = option(1, "write metrics every N steps")
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: off; checkpoint_minutes still "
                                      "checkpoints every 10 minutes by default, and the end is always saved)")
    checkpoint_minutes: float = option(10.0, "also checkpoint when this many minutes have passed since the last "
                                             "checkpoint (0: off)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir/checkpoints")
    overwrite: bool = option(False, "start afresh in an out_dir that holds another run: delete its checkpoints "
                                    "and logs")
    progress: bool = option(True, "show a progress bar with live metrics (off: also no progress bars, logs or "
                                  "deprecation warnings from transformers and peft)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward to save memory")
    distributed: str = option("ddp", "under torchrun (WORLD_SIZE > 1): ddp replicates the base and all-reduces the "
                                     "adapters' gradients; fsdp2 also shards the decoder blocks' frozen base weights "
                                     "over the processes (fully_shard; adapters whole). Needs torchrun "
                                     "(docs/distributed.md)", choices=("ddp", "fsdp2"))
    dist_timeout_minutes: float = option(10.0, "under torchrun: a collective that waits longer than this (a process "
                                               "died or hangs) ends the run with an error")
    optim: OptimConfig = option(factory=OptimConfig, help="optimiser")
    lora: LoraSettings = option(factory=lambda: LoraSettings(r=8, alpha=16.0),
                                help="LoRA adapters (flags --lora_r, --lora_alpha, --lora_dropout, "
                                     "--lora_target_modules)")

    def validate(self) -> None:
        """ConfigError for an option out of range (every float must also be finite) or an out_dir that cannot
        be a folder; called first by every trainer, so nothing is written for a bad config."""
        check_finite(self)
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.max_length <= 1:
            raise ConfigError(f"max_length must be > 1, got {self.max_length}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("max_steps must be >= 0 and epochs > 0")
        if self.log_every <= 0 or self.checkpoint_every < 0 or self.keep_checkpoints <= 0:
            raise ConfigError("log_every and keep_checkpoints must be > 0, checkpoint_every >= 0")
        if self.checkpoint_minutes < 0:
            raise ConfigError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if self.distributed not in ("ddp", "fsdp2"):
            raise ConfigError(f"distributed must be ddp or fsdp2, got {self.distributed!r}")
        if not self.dist_timeout_minutes > 0:
            raise ConfigError(f"dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        self.optim.validate()
        self.lora.validate()
        check_out_dir(self.out_dir)


@dataclass
class RolloutOptions:
    """Where a sampling trainer's rollouts come from (PPO, GRPO, online DPO, RAFT): a mix-in of their configs."""

    rollout: str = option("native", "rollout backend: native (the KV-cached loop on the trainer's own model) or vllm "
                                    "(a colocated vLLM engine that loads the base once and gets the policy LoRA in "
                                    "place after each update; `make install-vllm`)", choices=("native", "vllm"))
    vllm_gpu_memory_utilization: float = option(0.3, "--rollout vllm on a GPU: the share of GPU memory vLLM takes for "
                                                     "its copy of the base and its KV cache")
    vllm_sleep: bool = option(False, "--rollout vllm on a GPU: offload vLLM's weights and free its KV cache between "
                                     "rollouts (vLLM sleep mode), so the update has the GPU memory")

    def validate(self) -> None:
        super().validate()
        if self.rollout not in ("native", "vllm"):
            raise ConfigError(f"rollout must be native or vllm, got {self.rollout!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must lie in (0, 1], got {self.vllm_gpu_memory_utilization}")


@dataclass
class RolloutCorrection:
    """Off-policy correction for a rollout engine with other numerics (--rollout vllm): PPO and GRPO, whose
    configs also mix in RolloutOptions (listed after this one)."""

    rollout_is_correction: str = option("tis", "--rollout vllm: tis weighs each token's policy-gradient term by "
                                               "min(exp(logp_trainer - logp_vllm), rollout_is_cap) (truncated "
                                               "importance sampling, as TRL and verl); none only logs the log-prob "
                                               "differences", choices=("tis", "none"))
    rollout_is_cap: float = option(2.0, "--rollout vllm: the cap of the importance weights (> 0)")

    def validate(self) -> None:
        super().validate()
        if self.rollout_is_correction not in ("tis", "none"):
            raise ConfigError(f"rollout_is_correction must be tis or none, got {self.rollout_is_correction!r}")
        if not self.rollout_is_cap > 0:
            raise ConfigError(f"rollout_is_cap must be > 0, got {self.rollout_is_cap}")
        if self.rollout == "vllm":
            from rlhf_fast.rl.vllm_engine import logprobs_mode

            try:  # the sampling options under which vLLM cannot return the trainer's log-probs
                logprobs_mode(self.temperature, self.top_p, self.top_k)
            except ValueError as e:
                raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------- quiet
@contextlib.contextmanager
def quiet_libraries(quiet: bool = True):
    """With `quiet`: no progress bars ("Loading weights", "Writing model shards") or info/warning logs from
    transformers and huggingface_hub, and none of the deprecation FutureWarnings transformers and peft raise on
    each other's calls (nothing a user of rlhf-fast can act on). Errors, and warnings of ours (UserWarning),
    still show. The previous state is restored on exit."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            # raised by transformers' forward but attributed to torch's Module.__call__ (its stacklevel)
            warnings.filterwarnings("ignore", category=FutureWarning, message=r"`past_key_values` is deprecated")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def quiet_unless_progress(train):
    """Decorator of the train_* functions: quiet_libraries() for the whole run when cfg.progress is off."""

    @functools.wraps(train)
    def run(cfg, *args, **kwargs):
        with quiet_libraries(not cfg.progress):
            return train(cfg, *args, **kwargs)

    return run

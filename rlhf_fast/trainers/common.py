"""What the SFT, RM and PPO trainers share: config pieces, optimiser and schedule, KL controllers,
metrics logging, non-finite step skipping, data order, progress bars, model loading.

Every config field is declared with `option(default, help)`: the CLI is generated from these
dataclasses and `--help` shows the help strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


class ConfigError(ValueError):
    """An option out of range or inconsistent; the CLI turns it into exit code 2."""


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
class LoraConfig:
    """The LoRA adapters each trainer adds to the frozen base."""

    lora_r: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_target_modules: str = option("", "comma-separated module names to adapt (empty: every linear layer "
                                          "of the decoder blocks)")

    def validate(self) -> None:
        if self.lora_r <= 0:
            raise ConfigError(f"lora_r must be > 0, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    def targets(self) -> list[str] | None:
        names = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]
        return names or None


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
    lora: LoraConfig = option(factory=LoraConfig, help="LoRA adapters")

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------- model
def load_tokenizer(path: str):
    """The tokenizer of a local model folder; a ConfigError (exit 2) when there is none."""
    from transformers import AutoTokenizer

    if not path:
        raise ConfigError("--model is required: a local transformers model folder")
    if not os.path.isdir(path):
        raise ConfigError(f"model folder {path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if _tokenizer_class(path) in ("TokenizersBackend", "PreTrainedTokenizerFast") and \
                type(tok).__name__ not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            # transformers 5 picks the tokenizer class from config.json's model_type (e.g. Qwen2Tokenizer,
            # whose own pre-tokenizer drops the saved one); a folder that saved a plain tokenizers backend
            # must be read back as exactly that
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here (OSError, ValueError, TypeError)
        raise ConfigError(f"model folder {path!r} has no usable tokenizer: {e}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_tokenizer(cfg: TrainConfig, tokenizer, model, *, need: bool):
    """The tokenizer to use: the one given, the RoleModel's own, or cfg.model's (required when the model is
    loaded from cfg.model or when `need`, i.e. text data must be encoded)."""
    if tokenizer is not None:
        return tokenizer
    if getattr(model, "tokenizer", None) is not None:
        return model.tokenizer
    if model is None or need:
        if model is not None and not cfg.model:
            raise ConfigError("a tokenizer is needed to encode the text data: pass tokenizer= or --model")
        return load_tokenizer(cfg.model)
    return None


def _tokenizer_class(path: str) -> str | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_role_model(cfg: TrainConfig, device: torch.device, model=None, tokenizer=None):
    """A RoleModel on `device`: `model` itself when it is one, else RoleModel.from_pretrained of `model`
    (a transformers model object) or of the folder cfg.model."""
    from rlhf_fast.models import LoraSettings, RoleModel

    if isinstance(model, RoleModel):
        return model.to(device)
    src = model if model is not None else cfg.model
    lora = LoraSettings(r=cfg.lora.lora_r, alpha=cfg.lora.lora_alpha, dropout=cfg.lora.lora_dropout,
                        target_modules=cfg.lora.targets())
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        rm = RoleModel.from_pretrained(src, lora=lora, dtype=dtype, tokenizer=tokenizer,
                                       gradient_checkpointing=cfg.gradient_checkpointing)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {src!r}: {e}") from e
    return rm.to(device)


def trainable_named_parameters(model, roles: Iterable[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapters and heads of `roles`, in module order (the optimiser state and the
    checkpoints depend on a fixed order)."""
    ids = {id(p) for r in roles for p in model.role_parameters(r)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def pad_id(tokenizer, model=None) -> int:
    for src in (tokenizer, model):
        v = getattr(src, "pad_token_id", None)
        if v is not None:
            return int(v)
    return 0


def eos_id(tokenizer, model=None) -> int | None:
    for src in (tokenizer, model):
        v = getattr(src, "eos_token_id", None)
        if v is not None:
            return int(v)
    return None


def set_reward_offset(model, offset: float) -> None:
    """Fold the reward normalisation offset into the score head's bias: it is saved with the head and every
    later score (PPO's included) is normalised without anyone having to remember it."""
    with torch.no_grad():
        model.score_head.bias.add_(offset)


def load_reward(model, path: str) -> None:
    """Load only the reward adapter and the score head from a folder written by RoleModel.save (the RM
    stage's out_dir/model); the policy and critic adapters and the value head are left as they are."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = os.path.join(path, "adapters", "reward", "adapter_model.safetensors")
    heads = os.path.join(path, "heads.safetensors")
    if not (os.path.isfile(f) and os.path.isfile(heads)):
        raise ConfigError(f"reward model folder {path!r} lacks adapters/reward or heads.safetensors "
                          "(expected the out_dir/model folder written by `rlhf-fast rm`)")
    with torch.no_grad():
        res = set_peft_model_state_dict(model.peft, load_file(f), adapter_name="reward")
        missing = [k for k in res.missing_keys if ".reward." in k and "lora_" in k]
        if missing:
            raise ConfigError(f"reward adapter {f} does not fit this base: missing {missing[0]}")
        sd = {k.split(".", 1)[1]: v for k, v in load_file(heads).items() if k.startswith("score_head.")}
        model.score_head.load_state_dict(sd)


def resume_point(cfg: TrainConfig, root: str) -> str | None:
    """The checkpoint to resume from when cfg.resume (the latest complete one), else None."""
    if not cfg.resume:
        return None
    from rlhf_fast.checkpoint import latest_checkpoint

    latest = latest_checkpoint(root)
    if latest is None:
        warnings.warn(f"resume: no checkpoint in {root}; starting from step 0", stacklevel=3)
    return latest


# ----------------------------------------------------------------------------------------- optimiser
def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up, then constant, linear decay to 0 or cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        done = min(1.0, done)
        if cfg.lr_scheduler == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def apply_gradients(loss: torch.Tensor, params: list[torch.nn.Parameter], opt, sched,
                    max_grad_norm: float) -> tuple[bool, float]:
    """Clip and step unless the loss or the gradient norm is not finite; then the step is dropped.

    Returns (applied, grad_norm). The caller has already run loss.backward(). A skipped step also
    leaves the schedule where it was, so a run with one bad batch stays on the same lr curve.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    ok = bool(torch.isfinite(loss.detach()).all()) and bool(torch.isfinite(norm))
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return ok, float(norm)


# ----------------------------------------------------------------------------------------- KL control
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 ("Fine-tuning language models from human preferences", section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon),
    where KL is the measured mean KL per sequence and n_steps the number of sequences seen."""

    def __init__(self, kl_coef: float, target: float, horizon: float):
        self.value = float(kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std (Chan et al. parallel update) for score normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        bm, bv = float(x.mean()), float(x.var(unbiased=False))
        delta, tot = bm - self.mean, self.count + n
        self.mean += delta * n / tot
        self.var = (self.var * self.count + bv * n + delta**2 * self.count * n / tot) / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]


# ----------------------------------------------------------------------------------------- data order
class BatchSampler:
    """Shuffled index batches, epoch after epoch, from a seed; its position is part of a checkpoint
    so a resumed run sees the very same batches."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ConfigError("the data set is empty")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        out = self._perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._permutation()


# ----------------------------------------------------------------------------------------- metrics
def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().cpu())
    return float(v)


class MetricsLogger:
    """One JSON object per logged step in `path`, and TensorBoard scalars when tensorboard imports."""

    def __init__(self, path: str, resume_step: int | None = None, tensorboard_dir: str | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            # drop what was logged after the checkpoint we resume from: it will be logged again
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def show(bar, row: dict, keys: Iterable[str]) -> None:
    """Live metrics on the progress bar."""
    bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4g}" for k in keys if k in row}, refresh=False)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:
        return float("nan")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------- the run
class Run:
    """The bookkeeping every trainer loop shares, so each loop keeps only its own maths: AdamW and the
    schedule over the trainable `params` [(name, p)], the batch sampler, resuming from the latest checkpoint
    (when cfg.resume), config.json, the metrics log, atomic checkpoints and the progress bar.

    `stateful` objects (with state_dict / load_state_dict; None entries are dropped) are saved in every
    checkpoint beside the sampler and restored on resume, so a resumed run sees the same batches and the
    same controller state. `updates_per_step` optimiser updates are made per step (PPO: epochs x minibatches).
    """

    def __init__(self, cfg: TrainConfig, name: str, params: list, n_examples: int, *, updates_per_step: int = 1,
                 stateful: dict | None = None):
        from rlhf_fast import checkpoint as ckpt

        self.cfg, self.params, self._ckpt = cfg, params, ckpt
        self.opt = build_optimizer([p for _, p in params], cfg.optim)
        self.sampler = BatchSampler(n_examples, cfg.batch_size, cfg.seed)
        self.total = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        self.sched = build_scheduler(self.opt, cfg.optim, self.total * updates_per_step)
        self.stateful = {"sampler": self.sampler, **{k: v for k, v in (stateful or {}).items() if v is not None}}
        self.root = os.path.join(cfg.out_dir, "checkpoints")
        self.step, self.skipped, resumed = 0, 0, None
        latest = resume_point(cfg, self.root)
        if latest:
            state = ckpt.load_checkpoint(latest, params=params, optimizer=self.opt, scheduler=self.sched)
            self.step, self.skipped, resumed = state["step"], state["skipped_steps"], state["step"]
            for key, obj in self.stateful.items():
                obj.load_state_dict(state[key])
        os.makedirs(cfg.out_dir, exist_ok=True)
        ckpt.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), config_to_dict(cfg))
        self.log = MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"), resumed,
                                 os.path.join(cfg.out_dir, "tb"))
        self.bar = progress_bar(self.total, self.step, name, cfg.progress)
        self.row: dict = {}
        self.t0, self.tokens = time.perf_counter(), 0

    def apply(self, loss: torch.Tensor) -> float:
        """One optimiser update from the gradients already accumulated; a non-finite one is skipped and
        counted. Returns the gradient norm."""
        ok, gnorm = apply_gradients(loss, [p for _, p in self.params], self.opt, self.sched,
                                    self.cfg.optim.max_grad_norm)
        self.skipped += not ok
        return gnorm

    def logging_now(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.total

    def common_metrics(self, device: torch.device) -> dict:
        return {"lr": self.sched.get_last_lr()[0], "skipped_steps": self.skipped,
                "tokens/s": self.tokens / max(time.perf_counter() - self.t0, 1e-9),
                "peak_memory_mb": peak_memory_mb(device)}

    def log_row(self, metrics: dict, shown: Iterable[str], callback=None, model=None) -> dict:
        if callback is not None:
            metrics.update(callback(self.step, model) or {})
        self.row = self.log.log(self.step, metrics)
        show(self.bar, self.row, shown)
        return self.row

    def end_step(self) -> None:
        """Advance the bar; checkpoint every cfg.checkpoint_every steps (the final one is written by finish)."""
        self.bar.update(1)
        every = self.cfg.checkpoint_every
        if every and self.step % every == 0 and self.step < self.total:
            self.save()

    def save(self) -> None:
        state = {"skipped_steps": self.skipped, **{k: o.state_dict() for k, o in self.stateful.items()}}
        self._ckpt.save_checkpoint(self.root, self.step, params=self.params, optimizer=self.opt,
                                   scheduler=self.sched, keep=self.cfg.keep_checkpoints, state=state)

    def finish(self) -> None:
        """Close the bar and write the final checkpoint (the metrics log stays open for last rows)."""
        self.bar.close()
        self.save()

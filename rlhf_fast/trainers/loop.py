"""The step loop every trainer shares: `Run` owns the optimiser and schedule, non-finite step skipping, the
data order, resuming, checkpoints, the metrics log and the progress bar, so a trainer keeps only its maths:

    with Run(cfg, "sft", params, len(examples)) as run:
        for step in run:                          # 1, 2, ..., run.total (from the checkpoint on --resume)
            batch = ...[run.sampler.next()]
            loss = ...; loss.backward()
            run.apply(loss)                       # clip, step (or skip a non-finite update), zero the grads
            if run.logging_now():
                run.log_row({...}, shown=("loss",))
    # leaving the block without an error writes the final checkpoint

Also the small helpers around it: device, seeds, the tokenizer and RoleModel a config names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from rlhf_fast.models import RoleModel
from rlhf_fast.models.io import load_tokenizer
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers.config import ConfigError, OptimConfig, TrainConfig


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
        import numpy as np  # optional

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------- model
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


def load_role_model(cfg: TrainConfig, device: torch.device, model=None, tokenizer=None):
    """A RoleModel on `device`: `model` itself when it is one, else RoleModel.from_pretrained of `model`
    (a transformers model object) or of the folder cfg.model."""
    if isinstance(model, RoleModel):
        return model.to(device)
    src = model if model is not None else cfg.model
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        rm = RoleModel.from_pretrained(src, lora=cfg.lora, dtype=dtype, tokenizer=tokenizer,
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


def resume_point(cfg: TrainConfig, root: str) -> str | None:
    """The checkpoint to resume from when cfg.resume (the latest complete one), else None."""
    if not cfg.resume:
        return None
    latest = ckpt.latest_checkpoint(root)
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
        """Close TensorBoard; later rows (e.g. a final validation) still go to the JSON log."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
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


# ----------------------------------------------------------------------------------------- the run
class Run:
    """The bookkeeping every trainer loop shares (see the module docstring): AdamW and the schedule over the
    trainable `params` [(name, p)], the batch sampler, resuming from the latest checkpoint (when cfg.resume),
    config.json, the metrics log, atomic checkpoints and the progress bar.

    `stateful` objects (with state_dict / load_state_dict; None entries are dropped) are saved in every
    checkpoint beside the sampler and restored on resume, so a resumed run sees the same batches and the
    same controller state. `updates_per_step` optimiser updates are made per step (PPO: epochs x minibatches).
    """

    def __init__(self, cfg: TrainConfig, name: str, params: list, n_examples: int, *, updates_per_step: int = 1,
                 stateful: dict | None = None, callback=None, model=None):
        self.cfg, self.params, self.name = cfg, params, name
        self.callback, self.model = callback, model
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
        ckpt.atomic_write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        self.log = MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"), resumed,
                                 os.path.join(cfg.out_dir, "tb"))
        self.bar = progress_bar(self.total, self.step, name, cfg.progress)
        self.row: dict = {}
        self.t0, self.tokens = time.perf_counter(), 0

    # -- the loop ------------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        return self

    def __iter__(self) -> Iterator[int]:
        """Yields the number of the step about to be made (1-based); after each, advances the bar and writes a
        checkpoint every cfg.checkpoint_every steps (the final one is written when the `with` block ends)."""
        while self.step < self.total:
            self.step += 1
            yield self.step
            self.bar.update(1)
            every = self.cfg.checkpoint_every
            if every and self.step % every == 0 and self.step < self.total:
                self.save()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.bar.close()
        if exc_type is None:
            self.save()
        self.log.close()

    # -- inside a step -------------------------------------------------------------------------------------

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

    def log_row(self, metrics: dict, shown: Iterable[str]) -> dict:
        """Log one row (plus the callback's metrics) at the current step and show `shown` on the bar."""
        if self.callback is not None:
            metrics.update(self.callback(self.step, self.model) or {})
        self.row = self.log.log(self.step, metrics)
        show(self.bar, self.row, shown)
        return self.row

    def save(self) -> None:
        state = {"skipped_steps": self.skipped, **{k: o.state_dict() for k, o in self.stateful.items()}}
        ckpt.save_checkpoint(self.root, self.step, params=self.params, optimizer=self.opt,
                             scheduler=self.sched, keep=self.cfg.keep_checkpoints, state=state)

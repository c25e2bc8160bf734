"""The step loop every trainer shares: `Run` owns the optimiser and schedule, non-finite step skipping, the
data order, resuming, checkpoints, the metrics log and the progress bar, so a trainer keeps only its maths:

    with Run(cfg, "sft", params, len(examples)) as run:
        for step in run:                          # 1, 2, ..., run.total (from the checkpoint on --resume)
            batch = ...[run.sampler.next()]
            loss = ...; loss.backward()
            run.apply(loss)                       # clip, step (undo a non-finite update), zero the grads
            if run.logging_now():
                run.log_row({...}, shown=("loss",))
        run.finish()                              # the final checkpoint (else written when the block ends)
        model.save(...)                           # inside the block: the out_dir stays locked until it is written

Safety, all in Run: the out_dir is locked for the run's life (a second run into it is refused); a new run refuses
an out_dir that holds another run unless cfg.overwrite; checkpoint rotation only deletes this run's checkpoints;
--resume refuses changed options that would change the data order or the parameter shapes (RESUME_RULES) and
applies the others; an update that leaves non-finite weights is undone; a run that stops making updates raises
TrainingDiverged; checkpoints are written every cfg.checkpoint_every steps and every cfg.checkpoint_minutes.

Also the small helpers around it: device, seeds, the tokenizer and RoleModel a config names.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from rlhf_fast.models import RoleModel
from rlhf_fast.models.conventions import resolve_device  # noqa: F401  (L.resolve_device for the trainers)
from rlhf_fast.models.io import load_tokenizer
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers.config import ConfigError, OptimConfig, TrainConfig


class TrainingDiverged(RuntimeError):
    """The run stopped making updates: `diverged_after(total)` consecutive steps had every update skipped (a
    non-finite loss, gradient norm or updated weight). The `rlhf-fast` command reports it in one line, exit 1."""


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
        model = model.to(device)
        if getattr(cfg, "distributed", "ddp") == "fsdp2" and D.world() > 1 and model.lockstep is None:
            D.shard_base(model, device)
        return model
    src = model if model is not None else cfg.model
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        rm = RoleModel.from_pretrained(src, lora=cfg.lora, dtype=dtype, tokenizer=tokenizer,
                                       gradient_checkpointing=cfg.gradient_checkpointing)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {src!r}: {e}") from e
    rm = rm.to(device)
    if getattr(cfg, "distributed", "ddp") == "fsdp2" and D.world() > 1:
        D.shard_base(rm, device)  # the FSDP2 tier: each process holds its share of the blocks' base weights
    return rm


@contextlib.contextmanager
def rollout_engine(cfg, model, sampling=None):
    """The run's rollout engine for rl.rollout.sample(engine=...): None for --rollout native; for vllm an
    rl.vllm_engine.VLLMEngine serving `model` (its base as it is now), closed when the block ends. `sampling`: the
    run's rl.rollout.SamplingConfig when the rollouts must carry vLLM's log-probs (it fixes which ones)."""
    if cfg.rollout == "native":
        yield None
        return
    D.refuse("--rollout vllm (one colocated engine per process)")
    from rlhf_fast.rl.vllm_engine import VLLMEngine, vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"--rollout vllm: {reason}")
    engine = VLLMEngine(model, max_model_len=cfg.max_length, sampling=sampling, seed=cfg.seed,
                        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep=cfg.vllm_sleep)
    try:
        yield engine
    finally:
        engine.close()


def rollout_metrics(engine) -> dict:
    """What the metrics log records of a vLLM engine: adapter pushes so far and the last push's seconds."""
    if engine is None:
        return {}
    return {"rollout/adapter_syncs": engine.syncs, "rollout/adapter_sync_s": engine.sync_seconds}


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


# ----------------------------------------------------------------------------------------- optimiser
def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


# A weight past sqrt(float32 max) ~ 1.8e19 counts as non-finite: its square, or its product with another such
# weight (LoRA's B @ A, a norm's mean square), overflows. lr=1e30 moves LoRA weights to ~1e30 in one AdamW step
# whose loss and gradients are finite; the next forward is NaN (seen: SFT saved a NaN base, PPO crashed in
# torch.multinomial). Real weights of these models are O(1).
BLOWN_UP = math.sqrt(torch.finfo(torch.float32).max)


def _snapshot(params: list[torch.nn.Parameter], opt) -> tuple[list[torch.Tensor], dict]:
    # the trainable weights and their optimiser state: adapters and heads are small, a copy costs little
    weights = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return weights, state


def _restore(params: list[torch.nn.Parameter], opt, snap: tuple[list[torch.Tensor], dict]) -> None:
    weights, state = snap
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for p in params:
        if p in state:
            opt.state[p] = state[p]
        else:
            opt.state.pop(p, None)


def apply_gradients(loss: torch.Tensor, params: list[torch.nn.Parameter], opt, sched,
                    max_grad_norm: float) -> tuple[bool, float]:
    """Clip and step; undo the step when the loss, the gradient norm or an updated weight is not finite (or past
    BLOWN_UP): the weights and the optimiser state are put back as they were before it.

    Returns (applied, grad_norm). The caller has already run loss.backward(). A skipped step also leaves the
    schedule where it was, so a run with one bad batch stays on the same lr curve. One host synchronisation.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    snap = _snapshot(params, opt)
    opt.step()
    dev = norm.device
    worst = torch.zeros((), device=dev)  # the largest |weight| after the step; NaN propagates
    if params:  # _foreach_norm: one multi-tensor kernel, as clip_grad_norm_ itself uses
        maxes = torch._foreach_norm([p.detach() for p in params], float("inf"))
        worst = torch.stack([m.float().to(dev) for m in maxes]).max()
    ok_t = torch.isfinite(loss.detach()).all().to(dev) & torch.isfinite(norm) & (worst <= BLOWN_UP)
    ok, gnorm = torch.stack([ok_t.float(), norm.float()]).tolist()  # the one host synchronisation
    if ok:
        sched.step()
    else:
        _restore(params, opt, snap)
    opt.zero_grad(set_to_none=True)
    return bool(ok), gnorm


def diverged_after(total: int) -> int:
    """How many consecutive steps without an applied update stop a run of `total` steps: 3, or 1% of a long
    run, at most 100 (an occasional bad batch is skipped and counted; a streak means the run cannot go on)."""
    return max(3, min(100, total // 100))


# ----------------------------------------------------------------------------------------- data order
class BatchSampler:
    """Shuffled index batches, epoch after epoch, from a seed; its position is part of a checkpoint
    so a resumed run sees the very same batches.

    shard (rank, world): the batch is global; every process draws the same permutation and next() returns this
    process's contiguous slice of each global batch (batch_size / world indices), so the state is the same
    everywhere and a run means the same on 1 or N processes."""

    def __init__(self, n: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        if n <= 0:
            raise ConfigError("the data set is empty")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.rank, self.world = shard
        if self.batch_size % self.world:
            raise ConfigError(f"the global batch of {self.batch_size} examples (batch_size, at most the data set's "
                              f"{n}) cannot be split evenly over {self.world} processes")
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
        k = self.batch_size // self.world
        return out[self.rank * k:(self.rank + 1) * k]

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


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A partial last line (a kill while it was written) is dropped with a warning;
    any other line that is not a JSON object is a ConfigError naming the file and line."""
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i == len(lines) and not ln.endswith("\n"):
            warnings.warn(f"{path}:{i}: dropping a partial last line (the run was killed while writing it)",
                          stacklevel=3)
        else:
            raise ConfigError(f"{path}:{i}: not a JSON object; repair or delete the line to resume")
    return rows


class MetricsLogger:
    """One JSON object per logged step in `path`, and TensorBoard scalars when tensorboard imports."""

    def __init__(self, path: str, resume_step: int | None = None, tensorboard_dir: str | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            # drop what was logged after the checkpoint we resume from: it will be logged again
            keep = [json.dumps(row) + "\n" for row in read_metrics(path) if row.get("step", 0) <= resume_step]
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


class SilentLogger:
    """The metrics log of the processes other than rank 0 under torchrun: the row, nothing written."""

    def log(self, step: int, metrics: dict) -> dict:
        return {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}

    def close(self) -> None:
        pass


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


# ----------------------------------------------------------------------------------------- resuming
MATCH, CHANGE, IGNORE = "must match", "may change", "not compared"

# What --resume does with an option whose value differs from the config the checkpoint was trained with, by
# config field ("group.field" or the whole "group" for nested ones). MATCH: refused with a ConfigError naming
# the option and both values (it changes the data order or the parameter shapes, or the state a checkpoint
# holds); CHANGE: applied from the resumed step on and reported in a warning. A field this table does not name
# (a new option, a new trainer's) must match, to be safe.
RESUME_RULES: dict[str, str] = {
    "out_dir": IGNORE, "resume": IGNORE, "overwrite": IGNORE,
    # the parameters' shapes and values, the data and its order
    "model": MATCH, "lora": MATCH, "dtype": MATCH, "data": MATCH, "seed": MATCH, "batch_size": MATCH,
    "max_length": MATCH, "val_data": MATCH, "val_fraction": MATCH,  # rm: the validation split takes training data
    "reward_model": MATCH, "response_length": MATCH, "ppo_epochs": MATCH, "num_minibatches": MATCH,  # ppo
    "ptx_data": MATCH, "ptx_coef": MATCH, "ptx_batch_size": MATCH,  # ppo: the PTX sampler is checkpoint state
    "ensemble": MATCH,  # rm: the number of reward members is the checkpoint's parameter set
    "ensemble_reduce": CHANGE, "ensemble_penalty": CHANGE,  # ppo/grpo: how the members' scores become one reward
    # applied: the optimiser's hyper-parameters are re-set after its state is loaded, the schedule is rebuilt
    # from the current options (and the new max_steps / epochs), the KL controller's beta is set to kl_coef
    "optim": CHANGE, "kl_coef": CHANGE, "kl_target": CHANGE, "kl_horizon": CHANGE, "max_steps": CHANGE,
    "epochs": CHANGE, "log_every": CHANGE, "checkpoint_every": CHANGE, "checkpoint_minutes": CHANGE,
    "keep_checkpoints": CHANGE, "progress": CHANGE, "device": CHANGE, "gradient_checkpointing": CHANGE,
    "eval_every": CHANGE, "normalize": CHANGE, "merge": CHANGE,
    # the global batch is the same on any number of processes: a run may resume on another number of them
    "distributed": CHANGE, "dist_timeout_minutes": CHANGE,
    # where the samples come from: a run may resume on another rollout backend (the engine is rebuilt)
    "rollout": CHANGE, "vllm_gpu_memory_utilization": CHANGE, "vllm_sleep": CHANGE, "rollout_is_correction": CHANGE,
    "rollout_is_cap": CHANGE,
    "optim.optimizer": MATCH,  # the optimiser's state in the checkpoint is that of the one it was trained with
}


def resume_rule(key: str) -> str:
    """RESUME_RULES for a flattened config key ("optim.lr"): the field's own rule, its group's, else MATCH."""
    return RESUME_RULES.get(key) or RESUME_RULES.get(key.split(".")[0]) or MATCH


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_dict(cfg: TrainConfig) -> dict:
    """The config as JSON would give it back (tuples as lists), to compare with a saved one."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def option_name(key: str) -> str:
    """The command-line option of a flattened config key: optim.lr -> lr, lora.r -> lora_r (as cli.py names them)."""
    group, _, leaf = key.rpartition(".")
    return f"lora_{leaf}" if group == "lora" else leaf or key


def resume_differences(saved: dict, current: dict) -> tuple[dict, dict]:
    """(must-match differences, may-change differences) between a saved config and the current one, each
    {flattened key: (saved value, current value)}. Keys only one side has (another version) are not compared."""
    a, b = _flatten(saved), _flatten(current)
    bad, changed = {}, {}
    for k in sorted(a.keys() & b.keys()):
        if a[k] != b[k]:
            rule = resume_rule(k)
            if rule == MATCH:
                bad[k] = (a[k], b[k])
            elif rule == CHANGE:
                changed[k] = (a[k], b[k])
    return bad, changed


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def set_optimizer_options(opt: torch.optim.Optimizer, sched, cfg: OptimConfig) -> None:
    """Put cfg's lr, betas, eps and weight decay into the optimiser and the schedule after a checkpoint's state
    was loaded (load_state_dict restores the saved ones); the lr of the current step is recomputed from the
    schedule, which is built from the current options."""
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    for g, fn in zip(opt.param_groups, sched.lr_lambdas):
        g.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, initial_lr=cfg.lr)
        g["lr"] = cfg.lr * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


# ----------------------------------------------------------------------------------------- the run
class Run:
    """The bookkeeping every trainer loop shares (see the module docstring): AdamW and the schedule over the
    trainable `params` [(name, p)], the batch sampler, resuming from the latest checkpoint (when cfg.resume),
    config.json, the metrics log, atomic checkpoints and the progress bar.

    `stateful` objects (with state_dict / load_state_dict; None entries are dropped) are saved in every
    checkpoint beside the sampler and restored on resume, so a resumed run sees the same batches and the
    same controller state. `updates_per_step` optimiser updates are made per step (PPO: epochs x minibatches).

    The out_dir: locked (out_dir/.lock, fcntl.flock) from the constructor until the `with` block ends, so a
    second run into it fails with a ConfigError; leftovers of killed processes are removed under the lock. A run
    without cfg.resume refuses an out_dir that holds another run (checkpoints, logs or a saved model) unless
    cfg.overwrite, which deletes them first. Each run has an id (kept by a resumed run, in each checkpoint's
    run.json), and rotation to cfg.keep_checkpoints deletes only this run's checkpoints, oldest first.

    Resuming (cfg.resume): the latest checkpoint that reads whole is used; one that does not (a truncated file,
    a missing state.json) is skipped with a warning in favour of the previous one, and none readable is a
    ConfigError. The options are compared with the config saved in that checkpoint (RESUME_RULES). These must
    match: model, lora_*, dtype, data, seed, batch_size, max_length, and the trainers' data and shape options
    (val_data, val_fraction; reward_model, response_length, ppo_epochs, num_minibatches, ptx_*), and any
    option RESUME_RULES does not name. These may change and are applied, with a warning: the optimiser options
    (lr, betas, eps, weight_decay, warmup_steps, lr_scheduler, max_grad_norm), kl_coef (beta is set to it, for
    the fixed and the adaptive controller), kl_target, kl_horizon, max_steps, epochs, log_every,
    checkpoint_every, checkpoint_minutes, keep_checkpoints, progress, device, gradient_checkpointing,
    eval_every, normalize, merge.

    Checkpoints: every cfg.checkpoint_every steps and whenever cfg.checkpoint_minutes (0: off) have passed
    since the last one, and at the end. An update whose loss, gradient norm or resulting weights are not finite
    is undone (apply_gradients) and counted in skipped_steps; diverged_after(total) consecutive steps without
    an applied update raise TrainingDiverged.

    Under torchrun (distributed.py, the DDP tier): the initial trainable parameters are broadcast from rank 0, the
    sampler hands each process its slice of the global batch, apply() sums the gradients over the processes first,
    log_row() averages the metrics over them, and rank 0 alone locks the out_dir and writes the config, the log and
    the checkpoints (with every process's RNG state); every process restores the checkpoint on resume.
    """

    def __init__(self, cfg: TrainConfig, name: str, params: list, n_examples: int, *, updates_per_step: int = 1,
                 stateful: dict | None = None, callback=None, model=None):
        self.cfg, self.params, self.name = cfg, params, name
        self.callback, self.model = callback, model
        self.opt = build_optimizer([p for _, p in params], cfg.optim)
        self.sampler = BatchSampler(n_examples, cfg.batch_size, cfg.seed, shard=(D.rank(), D.world()))
        self.total = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        self.sched = build_scheduler(self.opt, cfg.optim, self.total * updates_per_step)
        self.stateful = {"sampler": self.sampler, **{k: v for k, v in (stateful or {}).items() if v is not None}}
        self.root = os.path.join(cfg.out_dir, "checkpoints")
        self.step, self.skipped = 0, 0
        self.run_id = uuid.uuid4().hex
        self.config = config_dict(cfg)
        overwrite = bool(getattr(cfg, "overwrite", False))  # TrainConfig.overwrite (read this way until it exists)
        if cfg.resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: continue the run in out_dir, or "
                              "delete it and start afresh")
        self._lock = None
        D.broadcast_params([p for _, p in params])  # under torchrun: rank 0's initial adapters everywhere
        try:
            # under torchrun rank 0 alone locks and writes the out_dir; an error there reaches every process
            D.on_main(lambda: self._prepare(overwrite), "preparing the out_dir")
            resumed = self._resume() if cfg.resume else None  # every process restores the checkpoint
            self.log = D.on_main(lambda: self._open_log(resumed), "opening the metrics log") or SilentLogger()
        except BaseException:
            self.close()
            raise
        self.bar = progress_bar(self.total, self.step, name, cfg.progress and D.is_main())
        self.row: dict = {}
        self.loss: torch.Tensor | None = None  # the last update's loss, summed over the processes under torchrun
        self.t0, self.tokens = time.perf_counter(), 0
        self.finished = False
        self._last_save = time.monotonic()
        self._attempted = self._applied = self._streak = 0

    def _prepare(self, overwrite: bool) -> None:
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        self._lock = ckpt.lock_out_dir(self.cfg.out_dir)
        ckpt.remove_leftovers(self.cfg.out_dir)
        if not self.cfg.resume:
            self._fresh(overwrite)

    def _open_log(self, resumed: int | None) -> MetricsLogger:
        ckpt.atomic_write_json(os.path.join(self.cfg.out_dir, "config.json"), self.config)
        return MetricsLogger(os.path.join(self.cfg.out_dir, "metrics.jsonl"), resumed,
                             os.path.join(self.cfg.out_dir, "tb"))

    def _fresh(self, overwrite: bool) -> None:
        found = ckpt.earlier_run(self.cfg.out_dir)
        if found and not overwrite:
            raise ConfigError(f"out_dir {self.cfg.out_dir!r} holds another run ({', '.join(found)}): pass --resume "
                              "to continue it, --overwrite to delete it and start afresh, or choose another "
                              "--out_dir")
        if found:
            ckpt.remove_run(self.cfg.out_dir)
            warnings.warn(f"overwrite: deleted the earlier run in {self.cfg.out_dir} ({', '.join(found)})",
                          stacklevel=6)  # _fresh <- _prepare <- lambda <- on_main <- Run <- trainer

    def _resume(self) -> int | None:
        found = ckpt.list_checkpoints(self.root)
        if not found:
            warnings.warn(f"resume: no checkpoint in {self.root}; starting from step 0", stacklevel=3)
            return None
        problems = []
        for path in reversed(found):
            try:
                data = ckpt.read_checkpoint(path)
                break
            except ckpt.CheckpointError as e:
                problems.append(str(e))
                warnings.warn(f"resume: skipping checkpoint {path}: {e}; trying the one before", stacklevel=3)
        else:
            raise ConfigError(f"resume: no readable checkpoint in {self.root} ({'; '.join(problems)}); pass "
                              "--overwrite to start afresh")
        changed = self._check_options(path, data)
        missing = [k for k in self.stateful if k not in data["state"]]
        if missing:
            raise ConfigError(f"resume: checkpoint {path} holds no {missing[0]} state (it was written by a run "
                              "with other options)")
        state = ckpt.restore_checkpoint(data, path, params=self.params, optimizer=self.opt, scheduler=self.sched)
        if D.world() > 1:  # each process's own RNG (its sampling stream), when saved by as many processes
            rngs = data.get("rng_ranks") or []
            if len(rngs) == D.world():
                ckpt.set_rng_state(rngs[D.rank()])
            else:
                D.seed_rank_streams(self.cfg.seed + state["step"])
        for key, obj in self.stateful.items():
            obj.load_state_dict(state[key])
        self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
        self.run_id = data["run"].get("run_id") or self.run_id  # a checkpoint from before run ids: a new one
        if any(k.startswith("optim.") or k in ("max_steps", "epochs") for k in changed):
            set_optimizer_options(self.opt, self.sched, self.cfg.optim)
        ctl = self.stateful.get("kl_controller")
        if "kl_coef" in changed and hasattr(ctl, "value"):
            ctl.value = float(self.cfg.kl_coef)
        if changed:
            warnings.warn(f"resume from {path}: applying changed options " + ", ".join(
                f"--{option_name(k)} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changed.items()), stacklevel=3)
        return self.step

    def _check_options(self, path: str, data: dict) -> dict:
        """ConfigError for must-match options that differ from the checkpoint's config; returns the others."""
        trainer = data["run"].get("trainer")
        if trainer and trainer != self.name:
            raise ConfigError(f"resume: {path} was written by `rlhf-fast {trainer}`, not `rlhf-fast {self.name}`")
        saved = data["config"]
        legacy = os.path.join(self.cfg.out_dir, "config.json")
        if saved is None and os.path.isfile(legacy):  # a checkpoint from before configs were saved in it
            try:
                with open(legacy) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = None
        if saved is None:
            warnings.warn(f"resume: {path} has no saved config; the options cannot be checked", stacklevel=4)
            return {}
        bad, changed = resume_differences(saved, self.config)
        if bad:
            raise ConfigError(f"resume: {path} was trained with other settings: " + "; ".join(
                f"--{option_name(k)} {_fmt(a)} there, {_fmt(b)} now" for k, (a, b) in bad.items())
                + ". These must match to resume (they change the data order or the parameter shapes): pass the "
                "checkpoint's values, or start afresh with --overwrite or another --out_dir")
        return changed

    # -- the loop ------------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        return self

    def __iter__(self) -> Iterator[int]:
        """Yields the number of the step about to be made (1-based); after each, advances the bar, stops the run
        when it has stopped making updates, and writes a checkpoint every cfg.checkpoint_every steps or when
        cfg.checkpoint_minutes have passed (the final one is written by finish() or when the `with` block ends)."""
        limit = diverged_after(self.total)
        while self.step < self.total:
            self.step += 1
            self._attempted = self._applied = 0
            yield self.step
            self.bar.update(1)
            if self._attempted and not self._applied:
                self._streak += 1
                if self._streak >= limit:
                    raise TrainingDiverged(
                        f"training diverged: no update applied in the last {limit} steps "
                        f"({self.step - limit + 1}-{self.step}): every loss, gradient norm or updated weight was "
                        f"not finite, and each update was undone. Lower --lr (now {self.cfg.optim.lr:g}) or check "
                        f"the data; latest checkpoint: {ckpt.latest_checkpoint(self.root) or 'none'}")
            elif self._applied:
                self._streak = 0
            if self.step < self.total and self._checkpoint_due():
                self.save()

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every
        minutes = float(getattr(self.cfg, "checkpoint_minutes", 10.0) or 0.0)  # TrainConfig.checkpoint_minutes
        due = bool(every and self.step % every == 0) or \
            (minutes > 0 and time.monotonic() - self._last_save >= 60.0 * minutes)
        return bool(D.all_reduce(float(due), "max")) if D.world() > 1 else due  # clocks differ: any process's

    def finish(self) -> None:
        """Write the final checkpoint now; the `with` block's end then writes none. Call it after the loop and
        before anything that changes the trainable parameters outside training (SFT's merge), then save the
        model inside the `with` block, so that the out_dir stays locked until the model is written."""
        self.save()
        self.finished = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.bar.close()
            if exc_type is None and not self.finished:
                self.finish()
            self.log.close()
        finally:
            self.close()

    def close(self) -> None:
        """Release the out_dir's lock (the `with` block's end does)."""
        fd, self._lock = getattr(self, "_lock", None), None
        ckpt.unlock_out_dir(fd)

    # -- inside a step -------------------------------------------------------------------------------------

    def apply(self, loss: torch.Tensor) -> float:
        """One optimiser update from the gradients already accumulated; a non-finite one is undone and
        counted. Returns the gradient norm."""
        params = [p for _, p in self.params]
        # under torchrun: the gradients (and losses) summed over the processes, so each makes the same update
        loss = D.reduce_gradients(params, loss)
        self.loss = loss.detach()
        ok, gnorm = apply_gradients(loss, params, self.opt, self.sched, self.cfg.optim.max_grad_norm)
        self._attempted += 1
        self._applied += ok
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
        metrics = D.reduce_metrics(metrics, summed=("tokens/s", "val/num_eos_tokens"))  # torchrun: over processes
        self.row = self.log.log(self.step, metrics)
        show(self.bar, self.row, shown)
        return self.row

    def save(self) -> None:
        state = {"skipped_steps": self.skipped, **{k: o.state_dict() for k, o in self.stateful.items()}}
        rngs = D.gather_objects(ckpt.rng_state()) if D.world() > 1 else None  # each process's sampling stream
        # rank 0 writes (every process holds the same parameters and state); the others wait for it
        D.on_main(lambda: ckpt.save_checkpoint(
            self.root, self.step, params=self.params, optimizer=self.opt, scheduler=self.sched,
            keep=self.cfg.keep_checkpoints, state=state, run_id=self.run_id, trainer=self.name, config=self.config,
            rank_rngs=rngs), f"writing checkpoint step {self.step}")
        self._last_save = time.monotonic()

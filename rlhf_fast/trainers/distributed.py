"""Data parallelism over the adapters (the DDP tier): every trainer under `torchrun`, exactly equivalent to one process.

    torchrun --nproc_per_node 8 -m rlhf_fast.cli ppo --batch_size 64 ...   (the same command as on one process)

torchrun launches the processes and sets WORLD_SIZE, RANK and LOCAL_RANK; init_from_env joins them into one
torch.distributed process group (NCCL on GPUs, gloo on the CPU), with a timeout on every collective so a lost
process ends the run instead of hanging it. No orchestration of our own: torchrun's c10d rendezvous, and
torch.distributed's broadcast / all_reduce / all_gather.

What is replicated and what is communicated: the frozen base is loaded by every process and never communicated;
only the gradients of the trainable adapters and heads are, in ONE flattened all-reduce per optimiser update
(reduce_gradients, called by loop.Run.apply before clipping), so every process takes the same step. This is the
sum DistributedDataParallel computes, without its hooks: DDP's hooks assume every parameter that requires a gradient
gets one in each backward, which a RoleModel with several adapters (of which a step trains some) breaks ("Expected to
have finished reduction", TRL PRs #436, #472, #982). A parameter without a gradient on one process counts as zeros.

Exactness: --batch_size (prompts per step for the RL trainers) stays the global batch. Every process draws the same
global permutation from the seed and takes its contiguous slice of each global batch (loop.BatchSampler), and
each trainer scales its local loss so that the SUM over processes of the local losses is the loss one process
computes on the global batch (share(): a token mean divides by the global token count, a per-pair mean by the
global pair count). Batch statistics (advantage whitening, the KL controller's KL, running score moments, group
scaling) use all-reduced sums or the gathered values, so every process computes what one process would.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from rlhf_fast.models.conventions import resolve_device
from rlhf_fast.trainers.config import ConfigError

TIERS = ("ddp", "fsdp2")


# ----------------------------------------------------------------------------------------- who am I
def env_world() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


# ----------------------------------------------------------------------------------------- start
def refuse(what: str) -> None:
    """ConfigError when launched on several processes: `what` has no data-parallel version yet."""
    if env_world() > 1:
        raise ConfigError(f"{what} does not run on several processes yet (WORLD_SIZE={env_world()}); run it on one "
                          "process (docs/distributed.md lists what each trainer supports)")


def init_from_env(cfg, divisible: Iterable[str] = ("batch_size",)) -> torch.device:
    """The device of this process; under torchrun (WORLD_SIZE > 1) also join the process group and check that
    every process has the same options. `divisible`: options counted per step (global batches), which must divide
    by the number of processes. Without torchrun: resolve_device(cfg.device), nothing else."""
    n, tier = env_world(), getattr(cfg, "distributed", "ddp")
    if tier not in TIERS:
        raise ConfigError(f"distributed must be one of {', '.join(TIERS)}, got {tier!r}")
    if tier == "fsdp2" and n <= 1:
        raise ConfigError("--distributed fsdp2 needs several processes: launch with torchrun "
                          "--nproc_per_node N (WORLD_SIZE is not set)")
    if n <= 1:
        return resolve_device(cfg.device)
    for name in divisible:
        v = getattr(cfg, name)
        if v % n:
            raise ConfigError(f"--{name} {v} is global (the whole step's batch): it must be divisible by the "
                              f"{n} processes (WORLD_SIZE), e.g. {max(n, v // n * n)}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = resolve_device(cfg.device)
    if not dist.is_initialized():
        minutes = float(getattr(cfg, "dist_timeout_minutes", 10.0))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=minutes))
        atexit.register(_destroy)
    check_same_config(cfg)
    return device


# ----------------------------------------------------------------------------------------- the FSDP2 tier
def shard_base(model, device: torch.device) -> None:
    """The FSDP2 tier: fully_shard each decoder block of `model` (a RoleModel) over the processes, so every process
    holds 1/world of the blocks' frozen base weights, all-gathered block by block in each forward and backward.

    The adapters inside the blocks are FSDP's ignored_params: they stay whole on every process, and their gradients
    (with the heads', which live outside the blocks) are summed by reduce_gradients exactly as in the DDP tier; so the
    optimiser, clipping, checkpoints and resume are those of one process. The embeddings, final norm and lm_head
    (outside the blocks) stay replicated, which is what lets the fused log-prob ops read lm_head.weight whole.
    After this call every process must run the same sequence of forwards (see lockstep()); generation keeps the
    processes in step (RoleModel.lockstep) and runs the policy LoRA live (no merge into sharded weights)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlhf_fast.models.role_model import _decoder_blocks

    mesh = init_device_mesh(device.type, (world(),))
    for block in _decoder_blocks(model.backbone):
        adapters = {p for n, p in block.named_parameters() if "lora_" in n}
        trainable = [n for n, p in block.named_parameters() if p.requires_grad and "lora_" not in n]
        if trainable:
            raise ConfigError(f"--distributed fsdp2 shards the frozen base only, but {trainable[0]} is trainable")
        fully_shard(block, mesh=mesh, ignored_params=adapters, reshard_after_forward=True)
    model.refresh_trainable()
    model.lockstep = lambda n_local: int(all_reduce(float(n_local), "max"))
    _STATE.sharded = True


def lockstep() -> bool:
    """True when every process must run the same forwards (the FSDP2 tier: each block's forward all-gathers)."""
    return active() and getattr(_STATE, "sharded", False)


class _State:
    sharded = False  # this process's model was sharded by shard_base


_STATE = _State()


def save_model(model, out: str, *, save_base: bool = False, also: Callable | None = None) -> None:
    """model.save(out) on rank 0 (and `also()` after it). Under FSDP2 every process first gathers what rank 0 writes
    from the sharded base (the fingerprint, and with save_base the whole base, kept on rank 0 only)."""
    from rlhf_fast.models import io

    gathered = None
    if lockstep():
        gathered = {"fingerprint": io.base_fingerprint(model)}
        if save_base:
            state = {}
            for name, t in io.base_state_dict(model).items():
                full = io.whole_tensor(t).detach()
                if is_main():
                    state[name] = full.cpu()
            gathered["base_state"] = state if is_main() else None

    def write():
        model.save(out, save_base=save_base, gathered=gathered)
        if also is not None:
            also()

    on_main(write, "saving the model")


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_same_config(cfg) -> None:
    """ConfigError on every process when any was started with other options than rank 0 (rank 0's config is
    broadcast; each process compares, and the differences are gathered so every process reports them)."""
    if not active():
        return
    mine = _flat(json.loads(json.dumps(dataclasses.asdict(cfg))))
    box = [mine]
    dist.broadcast_object_list(box, src=0)
    theirs = box[0]
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    here = [f"--{k.split('.')[-1]} {mine.get(k)} on rank {rank()}, {theirs.get(k)} on rank 0" for k in diff[:3]]
    everyone: list = [None] * world()
    dist.all_gather_object(everyone, here)
    bad = [s for part in everyone for s in part]
    if bad:
        raise ConfigError("the processes were started with different options (every process must get the same "
                          "command): " + "; ".join(bad))


def seed_rank_streams(seed: int) -> None:
    """Give every process but rank 0 its own sampling stream (rank 0 keeps the one-process stream). Called after the
    model is built, so the LoRA initialisation drew the same numbers everywhere."""
    if rank() > 0:
        torch.manual_seed((seed * 1_000_003 + 7919 * rank()) % 2**63)


# ----------------------------------------------------------------------------------------- collectives
def all_reduce(x, op: str = "sum") -> torch.Tensor:
    """A reduced copy of the tensor (or number) x over the processes (sum, max or min); x itself at world 1."""
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64)
    if not active():
        return t
    dev = t.device
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        t = t.cuda()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op])
    return t.to(dev)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """The processes' x (equal shapes) concatenated along dim 0 in rank order: the global batch's rows."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a gathered (global) tensor."""
    n = x.shape[0] // world()
    return x[rank() * n:(rank() + 1) * n]


def share(local) -> torch.Tensor:
    """local / (sum of local over the processes): the weight of this process's mean in the global mean. Exactly 1
    at world 1 (0 where nothing is counted anywhere)."""
    local = torch.as_tensor(local, dtype=torch.float32)
    return local / all_reduce(local).clamp(min=1e-30) if local.numel() else local


def agg_count(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """What an aggregation mode of ops.losses divides by, on these rows: valid tokens (token-mean), rows with a
    valid token (seq-mean-token-sum, seq-mean-token-mean), or rows (seq-mean-token-sum-norm, whose B x T also
    needs the global width T: see agg_share)."""
    m = mask != 0
    if agg == "token-mean":
        return m.sum().float()
    if agg == "seq-mean-token-sum-norm":
        return torch.tensor(float(m.shape[0]))
    return m.any(-1).sum().float()


def agg_share(mask: torch.Tensor, agg: str, width: int | None = None) -> torch.Tensor:
    """The factor that turns this process's `agg` loss on its rows (mask (b, T)) into its part of the loss one
    process computes on every process's rows (the parts sum to it). For seq-mean-token-sum-norm the local loss
    divides by b x T and the global one by (sum b) x width, width the padded width one process would have."""
    s = share(agg_count(mask, agg))
    if agg == "seq-mean-token-sum-norm" and width:
        s = s * (mask.shape[-1] / width)
    return s


def global_width(prompt_width: int, total_width: int) -> int:
    """The padded width one process gets for the global batch: the widest prompt plus the longest generation."""
    if not active():
        return total_width
    p = int(all_reduce(float(prompt_width), "max"))
    return p + int(all_reduce(float(total_width - prompt_width), "max"))


def minibatches(n_local: int, chunks: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """PPO / GRPO minibatches of the global rollout batch (n_local rows on each process, rank r holding global rows
    r*n_local ..): one permutation of the global rows, cut into min(chunks, rows) minibatches, each returned as the
    LOCAL row numbers of this process (possibly empty). The permutation is drawn from the global random stream as
    one process draws it (torch.randperm on `device`), so a run without torchrun is unchanged; under torchrun rank 0
    draws it (rank 0 keeps the one-process stream, seed_rank_streams) and broadcasts it to the others."""
    n = n_local * world()
    perm = torch.randperm(n, device=device)
    if active():
        box = perm.cuda() if dist.get_backend() == "nccl" and perm.device.type != "cuda" else perm
        dist.broadcast(box, src=0)
        perm = box.to(device)
    lo = rank() * n_local
    out = []
    for idx in perm.chunk(min(chunks, n)):
        out.append(idx[(idx >= lo) & (idx < lo + n_local)] - lo)
    return out


def reduce_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the gradients of `params` over the processes in one flattened all-reduce (a missing gradient counts
    as zeros everywhere), and the loss with them; returns the summed loss. A no-op at world 1."""
    if not active():
        return loss
    ref = params[0] if params else torch.zeros(())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [(loss.detach().float().reshape(1).to(ref.device) if loss is not None
                         else torch.zeros(1, device=ref.device))])
    dist.all_reduce(flat)
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).to(p.dtype)
        i += n
    return flat[-1] if loss is not None else None


def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values of `params` on every process (as DDP does at construction)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def on_main(fn: Callable, what: str):
    """fn() on rank 0 only, its result returned there (None elsewhere); its success or its error (a ConfigError of
    the same message on the others) reaches every process, so that none waits forever for one that failed."""
    if not active():
        return fn()
    box, err, out = [("ok", "")], None, None
    if is_main():
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 -- passed on to the other processes, then raised here
            err, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0][0] == "error":
        raise ConfigError(f"{what} failed on rank 0: {box[0][1]}")
    return out


def gather_objects(obj) -> list:
    """Every process's obj, in rank order ([obj] at world 1)."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def reduce_metrics(metrics: dict, summed: Iterable[str] = ()) -> dict:
    """The metrics (rank 0's keys) averaged over the processes (`summed` keys added up) in one all-reduce; the
    values every trainer logs already equal on all processes (loss, grad_norm, lr) stay as they are."""
    if not active():
        return metrics
    box = [sorted(metrics)]
    dist.broadcast_object_list(box, src=0)
    keys, summed = box[0], set(summed)
    vals = []
    for k in keys:
        try:
            v = metrics.get(k, float("nan"))
            vals.append(float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v))
        except (TypeError, ValueError):
            vals.append(float("nan"))
    t = all_reduce(torch.tensor(vals, dtype=torch.float64))
    n = world()
    return {k: float(t[i]) if k in summed else float(t[i]) / n for i, k in enumerate(keys)}

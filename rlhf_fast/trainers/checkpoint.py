"""Checkpoints that survive being killed at any moment.

A checkpoint is a folder `<root>/step-00000042/` holding the trainable parameters (adapters and heads),
the optimiser, the scheduler, every RNG state, a JSON of trainer state (KL controller, data position,
counters), the config it was trained with (config.json) and which run wrote it (run.json: a run id and the
trainer). It is written into a temporary folder beside it, each file flushed to disk, then renamed into place
in one step (rename is atomic on POSIX): a folder named step-* is always complete. A crash leaves at most a
`.tmp-*` folder, which the next save removes. Rotation deletes only checkpoints of the run that is saving.

Reading is separate from restoring (read_checkpoint, then restore_checkpoint): a checkpoint that cannot be
read whole (a truncated file, a missing state.json) raises CheckpointError before anything is changed, so the
caller can fall back to an earlier one.

The out_dir around them: `.lock` (an flock held by the run writing there), checkpoints/, config.json,
metrics.jsonl, tb/ and the final model/; lock_out_dir, earlier_run, remove_run and remove_leftovers (what a
killed process leaves) are the operations loop.Run performs on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import warnings

import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.models.io import remove_stale_temporaries

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_FILES = ("trainable.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read whole: a missing, truncated or corrupt file."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str, obj) -> None:
    """Write JSON to a temporary file, flush it, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temporary folder; on success it replaces `final` whole, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(final):
            old = f"{tmp}-old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def remove_temporaries(root: str) -> None:
    """Delete the `.tmp-*` folders of saves that were killed half-way."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def non_finite(params: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one host synchronisation for all of them)."""
    if not params:
        return []
    dev = params[0][1].device
    flags = torch.stack([torch.isfinite(p.detach()).all().to(dev) for _, p in params])
    return [n for (n, _), ok in zip(params, flags.tolist()) if not ok]


def save_checkpoint(root: str, step: int, *, params: list[tuple[str, torch.nn.Parameter]], optimizer,
                    scheduler, state: dict, keep: int = 2, run_id: str | None = None, trainer: str | None = None,
                    config: dict | None = None, rank_rngs: list | None = None) -> str:
    """Write `<root>/step-<step>` atomically, then delete this run's older checkpoints past the `keep` newest.

    params: the trainable (name, parameter) pairs; state: JSON-able trainer state; config: the run's config
    (JSON-able), saved beside it so a resume compares against what this checkpoint was trained with.
    rank_rngs: under torchrun, every process's RNG states in rank order (rng_ranks.pt; rng.pt is rank 0's).
    run_id / trainer go to run.json; rotation only ever deletes checkpoints with the same run_id (None
    matches checkpoints written without one), oldest step first, never one past `step` or this one.
    Refuses (ValueError) to write non-finite weights.
    """
    bad = non_finite(params)
    if bad:
        raise ValueError(f"refusing to write checkpoint step {step}: non-finite weights in {len(bad)} tensors, "
                         f"e.g. {bad[0]}")
    os.makedirs(root, exist_ok=True)
    remove_temporaries(root)
    final = os.path.join(root, f"step-{step:08d}")
    with atomic_dir(final) as tmp:
        _save({n: p.detach().cpu().clone() for n, p in params}, os.path.join(tmp, "trainable.pt"))
        _save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        _save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        _save(rng_state(), os.path.join(tmp, "rng.pt"))
        if rank_rngs is not None:
            _save(rank_rngs, os.path.join(tmp, "rng_ranks.pt"))
        for name, obj in (("state.json", {"step": step, **state}), ("run.json", {"run_id": run_id, "trainer": trainer}),
                          ("config.json", config)):
            if obj is not None:
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2, sort_keys=True)
    mine = [p for p in list_checkpoints(root) if checkpoint_step(p) <= step and read_run_info(p).get("run_id") == run_id]
    for old in mine[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def read_run_info(path: str) -> dict:
    """run.json of a checkpoint ({} when absent or unreadable: written before run ids, or not by this code)."""
    try:
        with open(os.path.join(path, "run.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint folders under root (complete unless a file was damaged afterwards), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint(path: str) -> dict:
    """Everything in checkpoint `path`, read into memory: {"trainable", "optimizer", "scheduler", "rng", "state",
    "config" (None when not saved), "run" (run.json, {} when not saved)}. Raises CheckpointError, naming the
    file, when one is missing or cannot be read (nothing is restored: see restore_checkpoint)."""
    out = {}
    for name in _FILES:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"checkpoint {path} has no {name}")
        try:
            if name.endswith(".json"):
                with open(f) as fh:
                    out[name[:-5]] = json.load(fh)
            else:  # rng.pt holds Python / numpy RNG tuples, which weights_only refuses
                out[name[:-3]] = torch.load(f, map_location="cpu", weights_only=name != "rng.pt")
        except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, UnpicklingError, ...
            raise CheckpointError(f"{f} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from e
    try:
        with open(os.path.join(path, "config.json")) as fh:
            out["config"] = json.load(fh)
    except FileNotFoundError:
        out["config"] = None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')} is unreadable: {e}") from e
    out["run"] = read_run_info(path)
    ranks = os.path.join(path, "rng_ranks.pt")  # written by runs on several processes only
    try:
        out["rng_ranks"] = torch.load(ranks, map_location="cpu", weights_only=False) if os.path.isfile(ranks) else None
    except Exception as e:  # noqa: BLE001 - as above
        raise CheckpointError(f"{ranks} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from e
    return out


def restore_checkpoint(data: dict, path: str, *, params: list[tuple[str, torch.nn.Parameter]], optimizer,
                       scheduler) -> dict:
    """Restore parameters, optimiser, scheduler and RNG states from read_checkpoint's `data`; return the trainer
    state. ConfigError when the saved parameters are not those of `params` (other names or shapes)."""
    saved = data["trainable"]
    names = [n for n, _ in params]
    if sorted(saved) != sorted(names):
        missing = sorted(set(names) - set(saved))[:3]
        extra = sorted(set(saved) - set(names))[:3]
        raise ConfigError(f"checkpoint {path} does not match the model's trainable parameters "
                          f"(missing {missing}, unexpected {extra})")
    for n, p in params:
        if tuple(saved[n].shape) != tuple(p.shape):
            raise ConfigError(f"checkpoint {path}: {n} has shape {tuple(saved[n].shape)}, the model's is "
                              f"{tuple(p.shape)}")
    with torch.no_grad():
        for n, p in params:
            p.copy_(saved[n])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    set_rng_state(data["rng"])
    return data["state"]


def load_checkpoint(path: str, *, params: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler) -> dict:
    """Restore parameters, optimiser, scheduler and RNG states from `path`; return the trainer state."""
    return restore_checkpoint(read_checkpoint(path), path, params=params, optimizer=optimizer, scheduler=scheduler)


# ----------------------------------------------------------------------------------------------- the out_dir
LOCK_FILE = ".lock"
_RUN_FILES = ("config.json", "metrics.jsonl", "model", "tb")  # besides checkpoints/: what a run leaves
_STALE_FILE = re.compile(r"^(config\.json|metrics\.jsonl)\.tmp(-\d+)?$")


def lock_out_dir(out_dir: str) -> int:
    """An exclusive flock on out_dir/.lock, as a file descriptor: held until unlock_out_dir or the process
    ends (the OS releases it when the process is killed). ConfigError when another run holds it."""
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise ConfigError(f"out_dir {out_dir!r} is in use by another run ({holder}, holding {path}): wait for "
                          "it to end, or choose another --out_dir") from None
    except OSError as e:  # a file system without locks (some network mounts): run, but say so
        warnings.warn(f"cannot lock {path} ({e}); nothing stops a second run into this out_dir", stacklevel=3)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def unlock_out_dir(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def earlier_run(out_dir: str) -> list[str]:
    """What an earlier run left in out_dir (checkpoints/, config.json, metrics.jsonl, model, tb)."""
    found = ["checkpoints/"] if list_checkpoints(os.path.join(out_dir, "checkpoints")) else []
    return found + [n for n in _RUN_FILES if os.path.exists(os.path.join(out_dir, n))]


def remove_run(out_dir: str) -> None:
    """Delete what earlier_run finds (cfg.overwrite)."""
    for name in ("checkpoints", *_RUN_FILES):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def remove_leftovers(out_dir: str) -> None:
    """What a killed process leaves: .model.tmp-* (a whole base copy for SFT), checkpoints/.tmp-*, and the
    temporary files of config.json and metrics.jsonl. Only under the out_dir's lock."""
    remove_stale_temporaries(out_dir)
    remove_temporaries(os.path.join(out_dir, "checkpoints"))
    for name in os.listdir(out_dir):
        if _STALE_FILE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))

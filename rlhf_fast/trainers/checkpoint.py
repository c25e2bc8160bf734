"""Checkpoints that survive being killed at any moment.

A checkpoint is a folder `<root>/step-00000042/` holding the trainable parameters (adapters and heads),
the optimiser, the scheduler, every RNG state, and a JSON of trainer state (KL controller, data
position, counters). It is written into a temporary folder beside it, each file flushed to disk, then
renamed into place in one step (rename is atomic on POSIX): a folder named step-* is always complete.
A crash leaves at most a `.tmp-*` folder, which the next save removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil

import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def save_checkpoint(root: str, step: int, *, params: list[tuple[str, torch.nn.Parameter]], optimizer,
                    scheduler, state: dict, keep: int = 2) -> str:
    """Write `<root>/step-<step>` atomically and keep only the `keep` most recent checkpoints.

    params: the trainable (name, parameter) pairs; state: JSON-able trainer state.
    """
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a save that was killed
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step:08d}")
    with atomic_dir(final) as tmp:
        _save({n: p.detach().cpu().clone() for n, p in params}, os.path.join(tmp, "trainable.pt"))
        _save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        _save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        _save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f, indent=2, sort_keys=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders under root, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str, *, params: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler) -> dict:
    """Restore parameters, optimiser, scheduler and RNG states from `path`; return the trainer state."""
    saved = torch.load(os.path.join(path, "trainable.pt"), map_location="cpu", weights_only=True)
    names = [n for n, _ in params]
    if sorted(saved) != sorted(names):
        missing = sorted(set(names) - set(saved))[:3]
        extra = sorted(set(saved) - set(names))[:3]
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters "
                         f"(missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, p in params:
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)

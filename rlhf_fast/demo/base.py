"""The demo's pre-trained base, shipped as a small file so `make demo` does not spend minutes pre-training.

Pre-training is not part of the product (the demo does it with a plain loop), and it was the longest stage of the
demo (about 240 s of a 2-core CPU). The files in rlhf_fast/demo/assets/ hold the base that stage produces for a
given seed, with a fingerprint of everything that made it: the architecture, the pre-training options, the
vocabulary and a sample of the pre-training text. The demo uses a file only when its fingerprint equals the one
of the run it is asked for; any change to the language or to those options makes it pre-train again (and say so).

Regenerate a file (the same command writes any seed's):

    rlhf-fast demo --pretrained never --pretrain_only true --seed 0 \\
        --save_pretrained rlhf_fast/demo/assets/base-seed0.safetensors
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from rlhf_fast.demo import task

ASSETS = Path(__file__).parent / "assets"
_ARCH = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "pretrain_steps", "pretrain_batch",
         "pretrain_lr", "seed")


def fingerprint(cfg) -> dict:
    """What determines the pre-trained base: the options in _ARCH, the vocabulary and the pre-training text."""
    sample = "\n".join(task.pretraining_text(256, seed=cfg.seed))
    return {**{k: getattr(cfg, k) for k in _ARCH}, "vocab": zlib.crc32(" ".join(task.VOCAB).encode()),
            "text": zlib.crc32(sample.encode())}


def shipped_path(seed: int) -> Path:
    return ASSETS / f"base-seed{seed}.safetensors"


def read_metadata(path: str | os.PathLike) -> dict:
    """{"fingerprint": dict, "pretrain_loss": float} of a saved base ({} when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"fingerprint": json.loads(meta["fingerprint"]), "pretrain_loss": float(meta["pretrain_loss"])}
    except (OSError, KeyError, ValueError):
        return {}


def load(path: str | os.PathLike, model: torch.nn.Module, cfg) -> str | None:
    """Load the base in `path` into `model` when its fingerprint is this run's. Returns None when loaded, else
    the reason it was not (missing file, other fingerprint: which fields differ)."""
    if not os.path.isfile(path):
        return f"no file {path}"
    saved, want = read_metadata(path).get("fingerprint"), fingerprint(cfg)
    if saved != want:
        diff = sorted(k for k in want if (saved or {}).get(k) != want[k])
        return f"{path} was pre-trained with other settings ({', '.join(diff) or 'unreadable metadata'})"
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        return f"{path} does not fit the model (missing {missing}, unexpected {unexpected})"
    return None


def save(path: str | os.PathLike, model: torch.nn.Module, cfg, pretrain_loss: float) -> None:
    """Write the base (tied weights once) with its fingerprint, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_model(model, tmp, metadata={"fingerprint": json.dumps(fingerprint(cfg)),
                                         "pretrain_loss": f"{pretrain_loss:.6f}"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Input checks shared by the public ops. They run before any kernel launch and name the argument."""

from __future__ import annotations

import torch

from rlhf_fast.ops._dispatch import checks_enabled

ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {x.dtype}")
    return x


def integer(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {x.dtype}")
    return x


def mask(name: str, x, shape: torch.Size) -> torch.Tensor:
    tensor(name, x)
    if x.is_complex():
        raise TypeError(f"{name} must be a float or bool 0/1 tensor, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def same_device(**xs: torch.Tensor | None) -> torch.device:
    devs = {name: x.device for name, x in xs.items() if x is not None}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        listing = ", ".join(f"{n} on {v}" for n, v in devs.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def unit_interval(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def estimator(value: str) -> int:
    if value not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {value!r}")
    return ESTIMATORS[value]


def agg(value: str) -> str:
    if value not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {value!r}")
    return value


def ratio_level(value: str) -> str:
    if value not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {value!r}")
    return value


def targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int, checks: bool | None) -> None:
    """Reads data (a host sync): on by default, off with checks=False or RLHF_FAST_CHECKS=0, and always off
    inside torch.compile'd code, where reading data would break the graph."""
    if torch.compiler.is_compiling() or not checks_enabled(checks) or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} out-of-range entries)"
        )


def compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """fp32 arithmetic, except float64 inputs stay float64 (so gradcheck sees exact gradients)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32

"""Options of SFT / RM / PPO / GRPO: every float refuses inf and nan, every numeric option its out-of-range values,
before anything is written; the edges of each range are accepted; progress=False silences the libraries."""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings

import pytest

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings
from rlhf_fast.trainers import (
    GRPOConfig,
    OptimConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    TrainConfig,
    train_grpo,
    train_ppo,
    train_rm,
    train_sft,
)
from rlhf_fast.trainers.config import quiet_libraries

STAGES = {"sft": (SFTConfig, train_sft), "rm": (RMConfig, train_rm), "ppo": (PPOConfig, train_ppo),
          "grpo": (GRPOConfig, train_grpo)}


def float_fields(cls, prefix="") -> list[str]:
    """Names (group.field for nested groups) of every field typed float or float | None."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += float_fields(t, f"{f.name}.")
        elif t is float or float in typing.get_args(t):
            out.append(prefix + f.name)
    return out


def make(stage: str, out, **fields):
    """A config of `stage` with `fields` set (optim.lr / lora.alpha for nested ones); building a LoraSettings
    with a bad value raises already, like the CLI does."""
    cls = STAGES[stage][0]
    top, nested = {}, {"optim": {}, "lora": {}}
    for k, v in fields.items():
        g, _, leaf = k.rpartition(".")
        (nested[g] if g else top)[leaf] = v
    return cls(model="unused", data="unused.jsonl", out_dir=str(out), optim=OptimConfig(**nested["optim"]),
               lora=LoraSettings(**({"r": 8, "alpha": 16.0} | nested["lora"])), **top)


FLOATS = [(stage, name) for stage, (cls, _) in STAGES.items() for name in float_fields(cls)]


def test_every_float_option_is_covered():
    names = {n for _, n in FLOATS}
    assert {"optim.lr", "optim.eps", "lora.alpha", "lora.dropout", "checkpoint_minutes", "kl_coef", "clip_low",
            "clip_high", "missing_eos_penalty", "val_fraction"} <= names


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("stage, name", FLOATS)
def test_non_finite_floats_are_refused_before_anything_is_written(stage, name, bad, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=name.rpartition(".")[2]):  # lora ones: LoraSettings' own range check
        STAGES[stage][1](make(stage, out, **{name: bad}))
    assert not out.exists()


@pytest.mark.parametrize("stage, field, value, needle", [
    ("sft", "optim.eps", 0.0, "eps must be > 0"),
    ("sft", "optim.eps", -1e-8, "eps must be > 0"),
    ("sft", "optim.lr", 0.0, "lr must be > 0"),
    ("sft", "optim.beta2", 1.0, "beta1 and beta2 must lie in"),
    ("sft", "optim.max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
    ("sft", "lora.alpha", -16.0, "alpha must be a finite number > 0"),
    ("sft", "lora.dropout", 1.0, "dropout must lie in"),
    ("sft", "lora.r", 0, "r must be an integer >= 1"),
    ("sft", "seed", -1, "seed must lie in"),
    ("sft", "seed", 2**32, "seed must lie in"),
    ("sft", "checkpoint_minutes", -1.0, "checkpoint_minutes must be >= 0"),
    ("sft", "checkpoint_every", -1, "checkpoint_every >= 0"),
    ("sft", "max_length", 1, "max_length must be > 1"),
    ("rm", "val_fraction", 1.0, "val_fraction must lie in"),
    ("rm", "eval_every", -1, "eval_every must be >= 0"),
    ("ppo", "missing_eos_penalty", -1.0, "missing_eos_penalty must be >= 0"),
    ("ppo", "clip_low", 1.0, "clip_low must be > 0 and < 1"),
    ("ppo", "clip_high", 0.0, "clip_high must be > 0"),
    ("ppo", "top_k", -1, "top_k must be >= 0"),
    ("ppo", "top_p", 0.0, "top_p must lie in"),
    ("ppo", "temperature", 0.0, "temperature must be > 0"),
    ("ppo", "kl_target", 0.0, "kl_target must be > 0"),
    ("ppo", "kl_horizon", -1.0, "kl_horizon must be > 0"),
    ("ppo", "vf_coef", -0.1, "vf_coef must be >= 0"),
    ("ppo", "entropy_coef", -0.1, "entropy_coef must be >= 0"),
    ("ppo", "score_clip", 0.0, "score_clip must be > 0"),
    ("ppo", "value_clip", -0.2, "value_clip must be > 0"),
    ("ppo", "ptx_coef", -1.0, "ptx_coef must be >= 0"),
    ("ppo", "ptx_batch_size", 0, "ptx_batch_size must be >= 1"),
    ("ppo", "ppo_epochs", 0, "ppo_epochs must be >= 1"),
])
def test_out_of_range_options_are_refused(stage, field, value, needle, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=needle):
        STAGES[stage][1](make(stage, out, **{field: value}))
    assert not out.exists()


@pytest.mark.parametrize("stage, field, value", [
    ("sft", "optim.eps", 1e-12), ("sft", "seed", 2**32 - 1), ("sft", "checkpoint_minutes", 0.0),
    ("ppo", "missing_eos_penalty", 0.0), ("ppo", "clip_low", 0.99), ("ppo", "clip_high", 5.0),
])
def test_edges_of_the_ranges_are_accepted(stage, field, value, tmp_path):
    make(stage, tmp_path / "o", **{field: value}).validate()


@pytest.mark.parametrize("kind", ["file", "under_a_file", "empty"])
def test_out_dir_that_cannot_be_a_folder(kind, tmp_path):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_a_file": tmp_path / "f" / "o", "empty": ""}[kind]
    with pytest.raises(ConfigError, match="out_dir"):
        SFTConfig(model="unused", data="d.jsonl", out_dir=str(out)).validate()
    assert (tmp_path / "f").read_text() == "x"


def test_run_safety_fields_for_the_loop():
    cfg = TrainConfig()
    assert cfg.overwrite is False and cfg.checkpoint_minutes == 10.0 and cfg.checkpoint_every == 0


def test_quiet_libraries_silences_transformers_and_peft_but_not_ours():
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries(True):
            assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            warnings.warn_explicit("`x` is deprecated", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
            warnings.warn_explicit("old peft thing", FutureWarning, "peft_model.py", 1, module="peft.peft_model")
            warnings.warn("a warning of ours", UserWarning, stacklevel=1)
        with quiet_libraries(False):
            warnings.warn_explicit("`y` is deprecated", FutureWarning, "modeling_utils.py", 2,
                                   module="transformers.modeling_utils")
    assert [str(w.message) for w in seen] == ["a warning of ours", "`y` is deprecated"]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before

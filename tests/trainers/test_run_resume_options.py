"""--resume with changed options: those that change the data order or the parameter shapes are refused (exit 2,
naming the option and both values), the others are applied (lr, kl_coef, max_steps, ...)."""

from __future__ import annotations

import json
import os

import pytest
from tiny_fixtures import build_tiny_model

from rlhf_fast import cli
from rlhf_fast.trainers import OptimConfig, PPOConfig, SFTConfig, train_ppo, train_sft
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import loop as L


def rows(out) -> list[dict]:
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_changed_options_that_must_match_are_refused(tiny_model, data_files, tmp_path, capsys):
    out = str(tmp_path / "o")
    sft = ["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", out, "--batch_size", "4",
           "--checkpoint_every", "1", "--no-progress", "--no-merge"]
    assert cli.main(sft + ["--max_steps", "2"]) == 0
    saved = open(os.path.join(out, "config.json")).read()
    other = build_tiny_model(tmp_path / "other-model", "llama", seed=1)
    cases = [(["--batch_size", "8"], "--batch_size 4 there, 8 now"),
             (["--seed", "3"], "--seed 0 there, 3 now"),
             (["--model", str(other)], f"--model {tiny_model} there, {other} now"),
             (["--lora_r", "4"], "--lora_r 8 there, 4 now"),
             (["--lora_target_modules", "q_proj,v_proj"], "--lora_target_modules none there, q_proj,v_proj now"),
             (["--max_length", "64"], "--max_length 512 there, 64 now")]
    for extra, needle in cases:
        capsys.readouterr()
        assert cli.main(sft + ["--max_steps", "3", "--resume"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "must match" in err and len(err.strip().splitlines()) == 1, err
    assert open(os.path.join(out, "config.json")).read() == saved  # refused before anything was written
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))] == [1, 2]


def test_changed_lr_is_applied(tiny_model, data_files, tmp_path):
    base = dict(model=tiny_model, data=data_files["sft"], out_dir=str(tmp_path), batch_size=8, max_steps=2,
                progress=False, merge=False)
    train_sft(SFTConfig(**base, optim=OptimConfig(lr=3e-3)))
    with pytest.warns(UserWarning, match=r"applying changed options --max_steps 2 -> 4, --lr 0.003 -> 0.01"):
        train_sft(SFTConfig(**(base | {"max_steps": 4, "resume": True}), optim=OptimConfig(lr=1e-2)))
    assert [r["lr"] for r in rows(tmp_path)] == [3e-3, 3e-3, 1e-2, 1e-2]
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 1e-2
    assert json.load(open(tmp_path / "checkpoints" / "step-00000004" / "config.json"))["optim"]["lr"] == 1e-2


def test_changed_kl_coef_is_applied(tiny_model, data_files, tmp_path):
    base = dict(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=4, max_steps=1,
                response_length=4, ppo_epochs=1, progress=False, optim=OptimConfig(lr=1e-2))

    def reward(seq, attn, resp):
        return resp.sum(1).float()

    train_ppo(PPOConfig(**base), reward_fn=reward)
    with pytest.warns(UserWarning, match=r"--kl_coef 0.05 -> 0.2"):
        train_ppo(PPOConfig(**(base | {"max_steps": 2, "resume": True, "kl_coef": 0.2})), reward_fn=reward)
    assert [r["objective/kl_coef"] for r in rows(tmp_path)] == [0.05, 0.2]


def test_resume_rules_default_to_must_match():
    assert L.resume_rule("optim.lr") == L.CHANGE and L.resume_rule("lora.r") == L.MATCH
    assert L.resume_rule("a_new_trainers_option") == L.MATCH  # unknown fields are refused when they differ
    bad, changed = L.resume_differences({"temperature": 1.0, "kl_coef": 0.1, "optim": {"lr": 1.0}},
                                        {"temperature": 0.7, "kl_coef": 0.2, "optim": {"lr": 2.0}})
    assert bad == {"temperature": (1.0, 0.7)} and changed == {"kl_coef": (0.1, 0.2), "optim.lr": (1.0, 2.0)}

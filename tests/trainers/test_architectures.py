"""The three stages through files on tiny Qwen2 (tied embeddings) and GPT-2 (Conv1D layers) models:
SFT with merge -> RM on the merged base -> PPO with the saved reward adapter."""

from __future__ import annotations

import pytest
import torch
from tiny_fixtures import build_tiny_model

from rlhf_fast.trainers import OptimConfig, PPOConfig, RMConfig, SFTConfig, train_ppo, train_rm, train_sft


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_pipeline_on_architecture(arch, data_files, tmp_path):
    model = str(build_tiny_model(tmp_path / "base", arch))
    common = dict(batch_size=4, max_steps=2, progress=False, optim=OptimConfig(lr=3e-3))
    sft = train_sft(SFTConfig(model=model, data=data_files["sft"], out_dir=str(tmp_path / "sft"), **common))
    base = str(tmp_path / "sft" / "model" / "base")
    rm = train_rm(RMConfig(model=base, data=data_files["pairs"], out_dir=str(tmp_path / "rm"), **common))
    ppo = train_ppo(PPOConfig(model=base, reward_model=rm["out"], data=data_files["prompts"],
                              out_dir=str(tmp_path / "ppo"), response_length=4, ppo_epochs=1, **common))
    assert sft["metrics"]["loss"] > 0 and rm["metrics"]["loss"] > 0
    assert ppo["metrics"]["skipped_steps"] == 0
    # PPO read the trained reward adapter and head, offset included
    for p, q in zip(rm["model"].role_parameters("reward"), ppo["model"].role_parameters("reward")):
        assert torch.equal(p, q)

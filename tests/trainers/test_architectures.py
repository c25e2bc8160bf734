"""The three stages through files on tiny Qwen2 (tied embeddings) and GPT-2 (Conv1D layers) models:
SFT with merge -> RM on the merged base -> PPO with the saved reward adapter. Per architecture: the fused
log-probs equal a float64 reference from materialised logits, the merged base saved by SFT is the trained SFT
policy and is PPO's KL reference, PPO reads the trained reward adapter and moves the policy away from it."""

from __future__ import annotations

import pytest
import torch
from tiny_fixtures import build_tiny_model, float64_twin, materialised, next_token_logprobs

from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import OptimConfig, PPOConfig, RMConfig, SFTConfig, train_ppo, train_rm, train_sft
from tests.tolerances import assert_close

PROBE = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [12, 13, 14, 15, 16, 17, 18]])  # one left-padded row
PROBE_MASK = (PROBE != 0).long()
PROBE_VALID = torch.zeros_like(PROBE_MASK)  # entry t is defined when tokens t - 1 and t are real
PROBE_VALID[:, 1:] = PROBE_MASK[:, 1:] * PROBE_MASK[:, :-1]


def policy_logprobs(model, role="policy"):
    with torch.no_grad():
        return model.logprobs(PROBE, PROBE_MASK, role)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_pipeline_on_architecture(arch, data_files, tmp_path):
    model = str(build_tiny_model(tmp_path / "base", arch))
    untrained = RoleModel.from_pretrained(model)
    # the fused path reads this architecture's head (tied to the embeddings in both) like transformers does
    twin = float64_twin(untrained, model)
    want = next_token_logprobs(materialised(twin, PROBE, PROBE_MASK, "policy")[0], PROBE) * PROBE_VALID
    assert_close(policy_logprobs(untrained), want, torch.float32)

    common = dict(batch_size=4, max_steps=2, progress=False, optim=OptimConfig(lr=3e-3))
    sft_policy = {}

    def record(step, m):  # the SFT policy after its last step, before the merge
        if step == common["max_steps"]:
            sft_policy["lp"] = policy_logprobs(m)

    train_sft(SFTConfig(model=model, data=data_files["sft"], out_dir=str(tmp_path / "sft"), **common),
              callback=record)
    assert not torch.allclose(sft_policy["lp"], policy_logprobs(untrained), atol=1e-3)  # SFT trained the policy
    base = str(tmp_path / "sft" / "model" / "base")
    merged = RoleModel.from_pretrained(base)
    assert_close(policy_logprobs(merged, "reference"), sft_policy["lp"], torch.float32)

    rm = train_rm(RMConfig(model=base, data=data_files["pairs"], out_dir=str(tmp_path / "rm"), **common))
    ppo = train_ppo(PPOConfig(model=base, reward_model=rm["out"], data=data_files["prompts"],
                              out_dir=str(tmp_path / "ppo"), response_length=4, ppo_epochs=1, **common))
    assert ppo["metrics"]["skipped_steps"] == 0
    # PPO read the trained reward adapter and head, offset included
    for p, q in zip(rm["model"].role_parameters("reward"), ppo["model"].role_parameters("reward"), strict=True):
        assert torch.equal(p, q)
    # its KL reference is the SFT model, and its policy moved away from it
    assert_close(policy_logprobs(ppo["model"], "reference"), sft_policy["lp"], torch.float32)
    assert not torch.allclose(policy_logprobs(ppo["model"]), sft_policy["lp"], atol=1e-4)

"""Reward-model ensembles end to end: `rm --ensemble 3` trains K members on one base in one run (bootstrap
resamples that differ, members that differ, per-member offsets and validation), resumes exactly, loads as one
folder; PPO and GRPO score with it under each reduce mode and log rewards/ensemble_std; bad options are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_rm import cfg as rm_cfg
from test_rm import token_rule_pairs

from rlhf_fast.models import RoleModel
from rlhf_fast.models.io import load_reward
from rlhf_fast.trainers import ConfigError, OptimConfig, PPOConfig, RMConfig, train_ppo, train_rm
from rlhf_fast.trainers.grpo import GRPOConfig, train_grpo
from rlhf_fast.trainers.rm import bootstrap_indices


@pytest.fixture(scope="module")
def ensemble_rm(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-ensemble")
    r = train_rm(rm_cfg(tiny_model, "", out, ensemble=3, max_steps=12, optim=OptimConfig(lr=1e-2)),
                 examples=token_rule_pairs(48, seed=0), val_examples=token_rule_pairs(20, seed=100))
    return r | {"dir": out}


def test_rm_ensemble_trains_three_different_members(ensemble_rm):
    r, out = ensemble_rm, ensemble_rm["dir"]
    model = r["model"]
    assert model.reward_members == 3
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < 0.5 * losses[0], losses
    for j in range(3):
        assert f"member_{j}/loss" in rows[0] and f"member_{j}/accuracy" in rows[0]
    final = rows[-1]
    for key in ("val/accuracy", "val/ensemble_accuracy", "val/member_0/accuracy", "val/member_2/accuracy",
                "reward_offset/member_1"):
        assert key in final, key
    # each member learned the rule on held-out pairs; so did their mean
    assert min(final[f"val/member_{j}/accuracy"] for j in range(3)) >= 0.8, final
    assert r["val"]["ensemble_accuracy"] >= 0.9 and len(r["val"]["members"]) == 3
    # the members differ: their weights and their scores
    a, b = (torch.cat([p.detach().flatten() for p in model.member_parameters(k)]) for k in (1, 2))
    assert (a - b).abs().max() > 1e-3
    # every member's offset centres its own validation scores
    norm = json.loads((out / "model" / "reward_normalization.json").read_text())
    assert norm["offsets"] == r["offset"] and len(set(norm["offsets"])) == 3
    assert norm["offsets"] == [-m["reward_mean"] for m in norm["validation"]["members"]]


def test_bootstrap_resamples_differ_and_repeat():
    a, b, a2 = bootstrap_indices(48, 0), bootstrap_indices(48, 1), bootstrap_indices(48, 0)
    assert a == a2 and a != b and len(a) == 48 and all(0 <= i < 48 for i in a)
    assert len(set(a)) < 48  # drawn with replacement: some pairs twice, some not at all (~63% distinct)


def test_ensemble_folder_loads_for_rl(ensemble_rm, tiny_model):
    ids = torch.tensor([[12, 13, 10, 14], [12, 13, 11, 14]])
    fresh = RoleModel.from_pretrained(tiny_model)
    load_reward(fresh, ensemble_rm["dir"] / "model")
    with torch.no_grad():
        assert torch.equal(fresh.ensemble_scores(ids, torch.ones_like(ids)),
                           ensemble_rm["model"].ensemble_scores(ids, torch.ones_like(ids)))
    assert fresh.reward_offsets == ensemble_rm["offset"]


def test_rm_ensemble_resume_matches_uninterrupted(tiny_model, data_files, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5, ensemble=2)
    a = train_rm(rm_cfg(tiny_model, data_files["pairs"], tmp_path / "a", **kw))
    out = tmp_path / "b"
    train_rm(rm_cfg(tiny_model, data_files["pairs"], out, **kw))
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    b = train_rm(rm_cfg(tiny_model, data_files["pairs"], out, resume=True, **kw))
    for k in range(2):
        for p, q in zip(a["model"].member_parameters(k), b["model"].member_parameters(k), strict=True):
            assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="ensemble"):  # another K is another set of parameters
        train_rm(rm_cfg(tiny_model, data_files["pairs"], out, resume=True, **(kw | {"ensemble": 3})))


def test_bad_ensemble_size(tiny_model, data_files, tmp_path):
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="ensemble must be an integer >= 1"):
            RMConfig(model=tiny_model, data=data_files["pairs"], out_dir=str(tmp_path), ensemble=bad).validate()


@pytest.mark.parametrize("reduce", ["mean", "min", "mean_minus_std"])
def test_ppo_with_an_ensemble(ensemble_rm, tiny_model, data_files, tmp_path, reduce):
    c = PPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=4, max_steps=2,
                  response_length=4, ppo_epochs=1, progress=False, reward_model=str(ensemble_rm["dir"] / "model"),
                  ensemble_reduce=reduce)
    rows = [r for r in map(json.loads, open(train_ppo(c)["out"].replace("model", "metrics.jsonl"))) if "step" in r]
    assert len(rows) == 2 and all(r["rewards/ensemble_std"] > 0 for r in rows), rows


@pytest.mark.parametrize("reduce", ["mean", "min", "mean_minus_std"])
def test_grpo_with_an_ensemble(ensemble_rm, tiny_model, data_files, tmp_path, reduce):
    c = GRPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=2,
                   num_generations=2, max_steps=2, max_completion_length=4, progress=False,
                   reward_funcs="reward_model", reward_model=str(ensemble_rm["dir"] / "model"),
                   ensemble_reduce=reduce)
    train_grpo(c)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["rewards/ensemble_std"] > 0 for r in rows), rows


def test_ensemble_reward_is_the_reduction_of_member_scores(ensemble_rm):
    """The reward PPO / GRPO optimise is the reduction of the members' scores (min, mean_minus_std <= mean)."""
    from rlhf_fast.rl.ensemble import EnsembleReward

    model, ids = ensemble_rm["model"], torch.tensor([[12, 13, 10, 14, 9], [12, 40, 11, 14, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        s = model.ensemble_scores(ids, mask)
        got = {r: EnsembleReward(model, r, 1.0)(ids, mask) for r in ("mean", "min", "mean_minus_std")}
    assert torch.equal(got["mean"], s.mean(0)) and torch.equal(got["min"], s.min(0).values)
    assert torch.all(got["min"] <= got["mean"]) and torch.all(got["mean_minus_std"] <= got["mean"])


def test_ensemble_options_without_a_reward_model_are_refused(tiny_model, data_files, tmp_path):
    with pytest.raises(ConfigError, match="need --reward_model"):
        PPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), reward_funcs="format",
                  ensemble_reduce="min").validate()
    with pytest.raises(ConfigError, match="need --reward_model"):
        GRPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), reward_funcs="format",
                   ensemble_penalty=0.5).validate()
    with pytest.raises(ConfigError, match="ensemble_penalty must be"):
        PPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), reward_model="x",
                  ensemble_penalty=-1.0).validate()


def test_single_reward_model_with_ensemble_options_warns(tiny_model, data_files, tmp_path):
    rm = train_rm(rm_cfg(tiny_model, data_files["pairs"], tmp_path / "rm", max_steps=2))
    c = PPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path / "ppo"), batch_size=4,
                  max_steps=1, response_length=4, ppo_epochs=1, progress=False, reward_model=rm["out"],
                  ensemble_reduce="min")
    with pytest.warns(UserWarning, match="the reward model has one member"):
        r = train_ppo(c)
    assert "rewards/ensemble_std" not in r["metrics"]

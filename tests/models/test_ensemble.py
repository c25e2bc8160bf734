"""Reward-model ensembles on one base: K members add only their adapters and heads (the base is shared, never
copied); ensemble_scores equals K separate single-reward RoleModels holding the same weights; an ensemble folder
saves and loads back exactly (RoleModel.load and load_reward), offsets per member included."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings, RoleModel
from rlhf_fast.models import io as model_io
from tests.tolerances import assert_close

LORA = LoraSettings(r=4, alpha=8.0)


def randomize_members(model: RoleModel, seed: int = 1, std: float = 0.3) -> None:
    """LoRA B starts at zero (every member = the base): give each member random adapter and head weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in range(model.reward_members):
            for p in model.member_parameters(k):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batch():
    ids = torch.randint(3, 90, (5, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    return ids, mask


def test_members_share_the_base(tiny_model_factory):
    model = RoleModel.from_pretrained(tiny_model_factory("llama"), lora=LORA)
    base_ptrs = {n: t.data_ptr() for n, t in model.base_state_dict().items()}
    n1 = sum(p.numel() for p in model.parameters())
    one_member = sum(p.numel() for p in model.member_parameters(0))
    model.set_reward_members(4)
    n4 = sum(p.numel() for p in model.parameters())
    assert n4 - n1 == 3 * one_member  # three more adapters + heads, nothing else
    assert {n: t.data_ptr() for n, t in model.base_state_dict().items()} == base_ptrs  # the same base tensors
    assert model.adapter_names[-3:] == ("reward_1", "reward_2", "reward_3")
    assert one_member < 0.2 * sum(t.numel() for t in model.base_state_dict().values())
    model.set_reward_members(2)
    assert model.reward_members == 2 and sum(p.numel() for p in model.parameters()) == n1 + one_member
    with pytest.raises(ConfigError, match="integer number of members >= 1"):
        model.set_reward_members(0)
    with pytest.raises(ValueError, match="reward member 5 does not exist"):
        model.scores(*batch(), member=5)


def test_reset_member_seeds_its_init(tiny_model_factory):
    model = RoleModel.from_pretrained(tiny_model_factory("llama"), lora=LORA)
    model.set_reward_members(3)
    state = torch.random.get_rng_state()
    for k, seed in enumerate((7, 8, 7)):
        model.reset_reward_member(k, seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    a, b, c = ([p.detach().clone() for p in model.member_parameters(k)] for k in range(3))
    assert all(torch.equal(x, z) for x, z in zip(a, c)) and not all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ensemble_scores_equal_separate_reward_models(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    model = RoleModel.from_pretrained(path, lora=LORA)
    model.set_reward_members(3)
    randomize_members(model)
    ids, mask = batch()
    with torch.no_grad():
        ens = model.ensemble_scores(ids, mask)  # (K, B)
    assert ens.shape == (3, 5) and ens.dtype == torch.float32
    assert (ens[0] - ens[1]).abs().max() > 1e-3  # the members differ
    for k in range(3):  # a separate single-reward model holding member k's weights in its "reward" adapter
        single = RoleModel.from_pretrained(path, lora=LORA)
        assert single.reward_members == 1
        with torch.no_grad():
            for dst, src in zip(single.member_parameters(0), model.member_parameters(k), strict=True):
                dst.copy_(src)
            expected = single.scores(ids, mask)
        assert_close(ens[k], expected)
        assert_close(model.scores(ids, mask, member=k).detach(), expected)


def test_ensemble_folder_saves_and_loads_exactly(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    model = RoleModel.from_pretrained(path, lora=LORA)
    model.set_reward_members(3)
    randomize_members(model)
    for k, off in enumerate((0.5, -1.0, 2.0)):
        model_io.set_reward_offset(model, off, k)
    model.trained_roles.add("reward")
    ids, mask = batch()
    with torch.no_grad():
        before = model.ensemble_scores(ids, mask)
    folder = model.save(tmp_path / "ens")
    settings = json.loads((folder / "role_model.json").read_text())
    assert settings["reward_ensemble"] == {"members": 3, "offsets": [0.5, -1.0, 2.0]}
    assert (folder / "adapters" / "reward_2" / "adapter_model.safetensors").is_file()

    loaded = RoleModel.load(folder, base=path)
    other = RoleModel.from_pretrained(path, lora=LoraSettings(r=8))  # another rank: the saved one is used
    model_io.load_reward(other, folder)
    with torch.no_grad():
        assert torch.equal(loaded.ensemble_scores(ids, mask), before)
        assert torch.equal(other.ensemble_scores(ids, mask), before)
    assert loaded.reward_members == other.reward_members == 3 and other.reward_offsets == [0.5, -1.0, 2.0]

    single = RoleModel.from_pretrained(path, lora=LORA)  # a single reward model's folder shrinks an ensemble
    single.trained_roles.add("reward")
    single.save(tmp_path / "one")
    assert "reward_ensemble" not in json.loads((tmp_path / "one" / "role_model.json").read_text())
    model_io.load_reward(other, tmp_path / "one")
    assert other.reward_members == 1 and other.adapter_names == ("policy", "critic", "reward")

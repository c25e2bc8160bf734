"""models.io end to end: a reward model comes into PPO with the LoRA settings it was trained with, and an
untrained reward adapter or one trained on another base is refused (through train_rm / train_ppo on tiny
models); broken model folders and RoleModel folders are one-line errors, not tracebacks from transformers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings, RoleModel
from rlhf_fast.models import io as model_io
from rlhf_fast.models.role_model import ModelLoadError
from rlhf_fast.trainers import OptimConfig, PPOConfig, RMConfig, SFTConfig, train_ppo, train_rm, train_sft
from rlhf_fast.trainers.loop import load_role_model
from tests import tiny as fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory):
    """The raw base, SFT on it (merged: its base is the SFT model), and an RM at r=4 on the SFT base."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("io-runs")
    raw = str(tiny_model_factory("llama"))
    data = fixtures.make_data(tmp)
    sft = train_sft(SFTConfig(model=raw, data=data["sft"], out_dir=str(tmp / "sft"), max_steps=1, batch_size=4,
                              progress=False))
    sft_base = os.path.join(sft["out"], "base")
    rm = train_rm(RMConfig(model=sft_base, data=data["pairs"], out_dir=str(tmp / "rm"), max_steps=3, batch_size=8,
                           progress=False, lora=LoraSettings(r=4, alpha=8.0), optim=OptimConfig(lr=1e-2)))
    return {"raw": raw, "data": data, "sft": sft["out"], "sft_base": sft_base, "rm": rm["out"]}


def ppo_cfg(runs, out, **kw) -> PPOConfig:
    base = dict(model=runs["sft_base"], data=runs["data"]["prompts"], reward_model=runs["rm"], out_dir=str(out),
                max_steps=1, batch_size=4, response_length=4, ppo_epochs=1, progress=False,
                lora=LoraSettings(r=8, alpha=16.0))
    return PPOConfig(**(base | kw))


def reward_ranks(model: RoleModel) -> set[int]:
    return {int(m.lora_A["reward"].weight.shape[0]) for m in model.peft.modules()
            if hasattr(m, "lora_A") and "reward" in m.lora_A}


def some_scores(model: RoleModel) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 10, 11, 1], [5, 30, 31, 1, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [4]])).long()
    with torch.no_grad():
        return model.scores(ids, mask)


def test_rm_at_r4_scores_the_same_in_ppo_at_r8(runs, tmp_path):
    rm_model = RoleModel.load(runs["rm"], base=runs["sft_base"])
    want = some_scores(rm_model)
    res = train_ppo(ppo_cfg(runs, tmp_path / "ppo"))
    model = res["model"]
    assert reward_ranks(model) == {4} and model.adapter_lora["reward"].r == 4
    assert model.adapter_lora["policy"].r == 8 and model.adapter_lora["critic"].r == 8
    torch.testing.assert_close(some_scores(model), want)  # PPO was scored by the RM as trained (normalised head)
    saved = json.load(open(os.path.join(res["out"], "role_model.json")))
    assert saved["adapter_lora"]["reward"]["r"] == 4 and saved["lora"]["r"] == 8
    again = RoleModel.load(res["out"], base=runs["sft_base"])  # the PPO folder reloads with both ranks
    assert reward_ranks(again) == {4}
    torch.testing.assert_close(some_scores(again), want)


def test_rm_trained_on_another_base_is_refused(runs, tmp_path):
    # the RM was trained on the SFT (merged) base; PPO on the raw base must not use it
    with pytest.raises(ConfigError, match="trained on another base"):
        train_ppo(ppo_cfg(runs, tmp_path / "ppo", model=runs["raw"]))
    assert not (tmp_path / "ppo").exists()


def test_sft_folder_is_not_a_reward_model(runs, tmp_path):
    with pytest.raises(ConfigError, match="holds no trained reward model"):
        train_ppo(ppo_cfg(runs, tmp_path / "ppo", reward_model=runs["sft"]))
    assert not (tmp_path / "ppo").exists()


def test_reward_model_folder_errors(runs, tmp_path):
    model = RoleModel.from_pretrained(runs["sft_base"])
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        model_io.load_reward(model, f)
    broken = tmp_path / "rm"
    shutil.copytree(runs["rm"], broken)
    settings = json.loads((broken / "role_model.json").read_text())
    (broken / "role_model.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "lora"}))
    with pytest.raises(ConfigError, match="no 'lora' settings"):
        model_io.load_reward(model, broken)
    settings["adapter_lora"]["reward"]["rank"] = 4  # a key LoraSettings does not know
    (broken / "role_model.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="LoRA settings this version cannot use"):
        model_io.load_reward(model, broken)


@pytest.fixture(scope="module")
def broken_models(tiny_model_factory, tmp_path_factory):
    good = str(tiny_model_factory("llama"))
    tmp = tmp_path_factory.mktemp("broken-models")
    out = {}
    for case in ("hidden_size", "truncated", "empty_weights"):
        path = tmp / case
        shutil.copytree(good, path)
        out[case] = str(path)
    cfg = json.loads((tmp / "hidden_size" / "config.json").read_text())
    (tmp / "hidden_size" / "config.json").write_text(json.dumps(cfg | {"hidden_size": 48}))
    w = tmp / "truncated" / "model.safetensors"
    with open(w, "r+b") as fh:
        fh.truncate(os.path.getsize(w) // 2)
    (tmp / "empty_weights" / "model.safetensors").write_bytes(b"")
    return out


@pytest.mark.parametrize("case, needle", [
    ("hidden_size", "weights do not match its config.json"),
    ("truncated", "safetensors weights are unreadable"),
    ("empty_weights", "safetensors weights are unreadable"),
])
def test_broken_model_folder_is_one_clear_error(broken_models, case, needle):
    with pytest.raises(ModelLoadError, match=needle) as e:
        RoleModel.from_pretrained(broken_models[case])
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    # the trainers' loader turns it into a ConfigError that names the folder (the CLI: one line, exit 2)
    with pytest.raises(ConfigError, match=f"cannot load model .*{case}.*{needle}"):
        load_role_model(SFTConfig(model=broken_models[case]), torch.device("cpu"))

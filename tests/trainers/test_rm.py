"""Reward model: on pairs ruled by one token the loss falls and the trained score orders held-out pairs, only
the reward adapter and score head move; K-way rankings weigh each prompt equally, the validation offset centres
the rewards, a resumed run matches."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_fixtures import moved, trainable_snapshot

from rlhf_fast.data.collate import collate_rankings
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import OptimConfig, RMConfig, train_rm
from rlhf_fast.trainers.rm import evaluate_rm, rm_loss


def cfg(tiny_model, data, out, **kw):
    base = dict(model=tiny_model, data=data, out_dir=str(out), batch_size=8, max_steps=10, progress=False,
                val_fraction=0.25, optim=OptimConfig(lr=3e-3))
    return RMConfig(**(base | kw))


def token_rule_pairs(n: int, seed: int, good: int = 10, bad: int = 11) -> list[dict]:
    """The chosen response holds token `good` (w7) somewhere among 3 random ones, the rejected one the same
    response with `bad` (w8) there instead: only the rule tells them apart."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(12, 60) for _ in range(rng.randrange(2, 4))]
        r, i = [rng.randrange(12, 60) for _ in range(3)], rng.randrange(4)
        out.append({"prompt_ids": prompt, "response_ids": [r[:i] + [good] + r[i:], r[:i] + [bad] + r[i:]],
                    "margin": None})
    return out


def test_trained_score_orders_held_out_pairs_and_only_reward_parts_move(tiny_model, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    before = trainable_snapshot(model)
    held_out = token_rule_pairs(20, seed=100)  # prompts and responses never trained on
    acc0 = evaluate_rm(model, held_out, 0, torch.device("cpu"))["accuracy"]
    assert acc0 < 0.8  # the untrained score does not already know the rule (0.6 here)
    r = train_rm(cfg(tiny_model, "", tmp_path, max_steps=12, optim=OptimConfig(lr=1e-2)), model=model,
                 examples=token_rule_pairs(48, seed=0), val_examples=held_out)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    losses = [x["loss"] for x in rows if "loss" in x]
    # seeds 0, 1, 2 (data, LoRA init, order): loss 0.6-0.75 -> < 0.05, held-out accuracy 0.45-0.6 -> 1.0
    assert losses[-1] < 0.5 * losses[0], losses
    assert r["val"]["pairs"] == 20 and r["val"]["accuracy"] >= 0.9, r["val"]
    for key in ("accuracy", "margin_mean", "reward_mean", "reward_std"):
        assert key in rows[0]
    reward = {n for n, p in model.named_parameters() if any(p is q for q in model.role_parameters("reward"))}
    changed = moved(before, model)
    assert changed and changed <= reward


def test_offset_centres_validation_rewards(tiny_model, data_files, tmp_path):
    r = train_rm(cfg(tiny_model, data_files["pairs"], tmp_path, max_steps=4))
    saved = json.load(open(os.path.join(r["out"], "reward_normalization.json")))
    assert saved["offset"] == pytest.approx(r["offset"]) and r["offset"] != 0
    reloaded = RoleModel.load(r["out"], base=tiny_model)  # the offset travels inside the score head
    from rlhf_fast.data.jsonl import encode_rankings, load_rankings
    from rlhf_fast.trainers.rm import split_validation

    examples = encode_rankings(load_rankings(data_files["pairs"]), reloaded.tokenizer, 512)
    _, val = split_validation(examples, 0.25, 0)
    assert evaluate_rm(reloaded, val, 0, torch.device("cpu"))["reward_mean"] == pytest.approx(0, abs=1e-4)


def test_rankings_weigh_each_prompt_equally(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)
    examples = [{"prompt_ids": [5, 6], "response_ids": [[7, 1], [8, 1], [9, 1]], "margin": None},
                {"prompt_ids": [5], "response_ids": [[10, 1], [11, 1]], "margin": 0.5}]
    batch = collate_rankings(examples, 0)
    loss, _ = rm_loss(model, batch)
    with torch.no_grad():
        s = model.scores(batch["input_ids"], batch["attention_mask"])
    # prompt 0: the C(3,2) = 3 pairs averaged; prompt 1: its single pair with margin; then the mean of the two
    p0 = -(F.logsigmoid(s[0] - s[1]) + F.logsigmoid(s[0] - s[2]) + F.logsigmoid(s[1] - s[2])) / 3
    p1 = -F.logsigmoid(s[3] - s[4] - 0.5)
    torch.testing.assert_close(loss.detach(), (p0 + p1) / 2)


def test_rankings_file_trains(tiny_model, data_files, tmp_path):
    r = train_rm(cfg(tiny_model, data_files["ranks"], tmp_path, max_steps=6, batch_size=4))
    assert r["val"]["pairs"] == 3 * round(24 * 0.25)  # every C(3, 2) pair of the 6 held-out prompts
    assert r["metrics"]["accuracy"] > 0.5


def test_resume_matches_uninterrupted(tiny_model, data_files, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5)
    a = train_rm(cfg(tiny_model, data_files["pairs"], tmp_path / "a", **kw))
    out = tmp_path / "b"
    train_rm(cfg(tiny_model, data_files["pairs"], out, **kw))
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    torch.manual_seed(7)
    b = train_rm(cfg(tiny_model, data_files["pairs"], out, resume=True, **kw))
    for p, q in zip(a["model"].role_parameters("reward"), b["model"].role_parameters("reward")):
        assert torch.equal(p, q)
    assert b["offset"] == a["offset"]

"""PPO with reward functions instead of a reward model (RLVR with a critic): the functions' rewards are the
scores PPO optimises, their columns come from the prompt file, and a missing column is refused up front."""

from __future__ import annotations

import json

import pytest
from tiny_fixtures import write_jsonl

from rlhf_fast.trainers import ConfigError, OptimConfig, PPOConfig, train_ppo


def marked(prompts, completions, bonus, **_):
    """1 per word of the completion that is in the example's `bonus` column, as a share of its words."""
    return [sum(w in b.split() for w in c.split()) / max(1, len(c.split())) for c, b in zip(completions, bonus)]


def test_reward_functions_are_the_scores(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"w{10 + i} w11", "bonus": " ".join(f"w{j}" for j in
                                                                                           range(3, 40))}
                                               for i in range(8)])
    cfg = PPOConfig(model=tiny_model, data=data, out_dir=str(tmp_path / "out"), batch_size=4, max_steps=2,
                    response_length=4, ppo_epochs=1, progress=False, reward_funcs="test_ppo_rewards:marked",
                    optim=OptimConfig(lr=1e-3))
    train_ppo(cfg)
    rows = [json.loads(ln) for ln in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 2
    for r in rows:
        assert r["objective/scores"] == pytest.approx(r["rewards/marked/mean"], abs=1e-6)
        assert 0.0 <= r["rewards/marked/mean"] <= 1.0


def test_missing_column_and_two_reward_sources_are_refused(tiny_model, data_files, tmp_path):
    base = dict(model=tiny_model, data=data_files["prompts"], batch_size=4, max_steps=1, progress=False)
    with pytest.raises(ConfigError, match="bonus"):
        train_ppo(PPOConfig(out_dir=str(tmp_path / "a"), reward_funcs="test_ppo_rewards:marked", **base))
    with pytest.raises(ConfigError, match="not both"):
        train_ppo(PPOConfig(out_dir=str(tmp_path / "b"), reward_funcs="format", reward_model=str(tmp_path), **base))
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b").exists()

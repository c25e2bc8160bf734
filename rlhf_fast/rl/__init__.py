"""What every RL algorithm shares: rollouts (n samples per prompt, scores), advantages, KL control.

    rollout.py     SamplingConfig, sample(), score()
    advantages.py  shape_scores(), ppo_advantages() (and the group advantages of the critic-free methods)
    kl_control.py  FixedKLController, AdaptiveKLController, RunningMoments
    rewards.py     reward functions for verifiable rewards (TRL's contract): built-ins accuracy, format, code
    ensemble.py    reduce_ensemble(): K reward members' scores -> one reward (mean, min, mean - lambda * std)
"""

from rlhf_fast.rl.advantages import ppo_advantages, shape_scores
from rlhf_fast.rl.kl_control import AdaptiveKLController, FixedKLController, RunningMoments
from rlhf_fast.rl.rewards import RewardFunctionError, RewardFunctions, load_reward_functions, reward_metrics
from rlhf_fast.rl.rollout import Rollout, SamplingConfig, sample, score

__all__ = ["AdaptiveKLController", "FixedKLController", "RewardFunctionError", "RewardFunctions", "Rollout",
           "RunningMoments", "SamplingConfig", "load_reward_functions", "ppo_advantages", "reward_metrics", "sample",
           "score", "shape_scores"]

"""The trainers: a config dataclass and one loop per algorithm, all over one RoleModel.

    SFTConfig, train_sft   supervised fine-tuning of the policy adapter (then merge it into the base)
    RMConfig,  train_rm    Bradley-Terry reward model on pairs or K-way rankings (reward adapter + head)
    PPOConfig, train_ppo   PPO of policy and critic adapters against the reward adapter
    GRPOConfig, train_grpo GRPO and its critic-free relatives (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++)
    DPOConfig, train_dpo   DPO / IPO / SimPO / ORPO on preference pairs, or online / iterative DPO
    KTOConfig, train_kto   KTO on unpaired desirable / undesirable completions
    RAFTConfig, train_raft RAFT: rounds of Best-of-N sampling, then SFT of the policy adapter on the picks

Each train_* takes the config and optionally in-memory objects (a RoleModel or transformers model, a
tokenizer, token-id examples, a per-step callback) and returns a dict with the model and final metrics.
Shared parts: config.py (TrainConfig, OptimConfig, LoraSettings), loop.py (Run: the step loop), checkpoint.py.
"""

from rlhf_fast.models import LoraSettings
from rlhf_fast.rl.kl_control import AdaptiveKLController, FixedKLController
from rlhf_fast.trainers.config import ConfigError, OptimConfig, TrainConfig
from rlhf_fast.trainers.dpo import DPOConfig, train_dpo
from rlhf_fast.trainers.grpo import GRPOConfig, train_grpo
from rlhf_fast.trainers.kto import KTOConfig, train_kto
from rlhf_fast.trainers.ppo import PPOConfig, train_ppo
from rlhf_fast.trainers.raft import RAFTConfig, train_raft
from rlhf_fast.trainers.rm import RMConfig, train_rm
from rlhf_fast.trainers.sft import SFTConfig, train_sft

__all__ = ["AdaptiveKLController", "ConfigError", "DPOConfig", "FixedKLController", "GRPOConfig", "KTOConfig",
           "LoraSettings", "OptimConfig", "PPOConfig", "RMConfig", "SFTConfig", "TrainConfig", "train_dpo", "train_grpo",
           "train_kto", "train_ppo", "train_rm", "train_sft"]
__all__ += ["RAFTConfig", "train_raft"]

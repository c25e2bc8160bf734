"""One trainer run for the distributed tests, alone or under torchrun:

    python tests/distributed/driver.py TRAINER '{"model": ..., "out_dir": ...}'
    torchrun --standalone --nproc_per_node 2 tests/distributed/driver.py TRAINER '{...}'

Each process writes its trainable parameters to out_dir/params-rank<r>.pt at the end. The RL trainers (ppo, grpo)
get FIXED rollouts: rollout.sample is replaced by a deterministic function of each prompt (responses of unequal
lengths, some without EOS), so that one process and several sample the same responses and the comparison is of
everything after sampling (scores, KL, whitening, moments, group advantages, loss normalisation, updates).
Each params file also records how many base elements the process holds sharded and whole ("held").
Options: "fixed_rollouts": false samples for real (each process its own stream); "lr_by_rank" makes rank r use lr * (1 + r) (to test the mismatched-options check); "stall_after" sleeps
after that step's log (to be killed after a checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

from rlhf_fast.rl import rollout  # noqa: E402
from rlhf_fast.trainers import (  # noqa: E402
    DPOConfig,
    GRPOConfig,
    OptimConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    train_dpo,
    train_grpo,
    train_ppo,
    train_rm,
    train_sft,
)
from rlhf_fast.trainers import distributed as D  # noqa: E402

TRAINERS = {"sft": (SFTConfig, train_sft), "rm": (RMConfig, train_rm), "dpo": (DPOConfig, train_dpo),
            "ppo": (PPOConfig, train_ppo), "grpo": (GRPOConfig, train_grpo)}


def fixed_sample(model, prompt_ids, prompt_mask, sampling, *, eos_token_id, generator=None, engine=None,
                 policy_logprobs=False):
    """n responses per prompt, a deterministic function of the prompt's tokens: lengths 1..max_new_tokens, two
    in three ending with EOS; right-padded to the longest, as RoleModel.generate returns them. No logits, so no
    log-probs even when asked (PPO then recomputes them)."""
    rows = []
    for i in range(prompt_ids.shape[0]):
        real = prompt_ids[i][prompt_mask[i] != 0].tolist()
        for j in range(sampling.n):
            h = sum(real) * 31 + 17 * j + 5 * len(real)
            toks = [3 + (h * (k + 7) + k * k) % 90 for k in range(1 + h % sampling.max_new_tokens)]
            if h % 3:
                toks[-1] = eos_token_id
            rows.append(toks)
    B, P, R = len(rows), prompt_ids.shape[1], max(len(t) for t in rows)
    seq = torch.zeros(B, P + R, dtype=prompt_ids.dtype)
    resp = torch.zeros(B, P + R, dtype=prompt_mask.dtype)
    seq[:, :P] = prompt_ids.repeat_interleave(sampling.n, 0).cpu()
    for i, t in enumerate(rows):
        seq[i, P:P + len(t)] = torch.tensor(t)
        resp[i, P:P + len(t)] = 1
    attn = torch.cat([prompt_mask.repeat_interleave(sampling.n, 0).cpu(), resp[:, P:]], 1)
    dev = prompt_ids.device
    has_eos = ((seq == eos_token_id) & (resp != 0)).any(1)
    return rollout.Rollout(seq.to(dev), attn.to(dev), resp.to(dev), has_eos.to(dev), sampling.n)


def ppo_reward(seq, attn, resp):  # share of response tokens in a quarter of the vocabulary
    return (torch.isin(seq, torch.arange(3, 27)) & (resp != 0)).sum(1).float() / resp.sum(1).clamp(min=1)


def grpo_reward(prompts, completions, **_):  # unequal rewards within a group
    return [float(len(c.split()) % 4) + 0.5 * c.count("w1") for c in completions]


def main() -> None:
    name, kw = sys.argv[1], json.loads(sys.argv[2])
    cls, train = TRAINERS[name]
    optim = OptimConfig(**kw.pop("optim", {}))
    if kw.pop("lr_by_rank", False):
        optim.lr *= 1 + int(os.environ.get("RANK", "0"))
    stall = kw.pop("stall_after", 0)

    fixed = kw.pop("fixed_rollouts", True)

    def callback(step, model):
        if stall and step > stall:  # the step-`stall` checkpoint is written: say who we are, then wait
            with open(os.path.join(kw["out_dir"], f"pid-rank{D.rank()}"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        return {}

    extra = {"callback": callback}
    if name in ("ppo", "grpo"):
        if fixed:
            rollout.sample = fixed_sample
        extra |= {"reward_fn": ppo_reward} if name == "ppo" else {"reward_funcs": [grpo_reward]}
    result = train(cls(**kw, optim=optim), **extra)
    params = {n: p.detach().cpu().clone() for n, p in result["model"].named_parameters() if p.requires_grad}
    from torch.distributed.tensor import DTensor

    held = {"sharded": 0, "sharded_local": 0, "whole": 0}  # base elements: sharded (all / this process's), whole
    for p in result["model"].parameters():
        if isinstance(p, DTensor):
            held["sharded"] += p.numel()
            held["sharded_local"] += p.to_local().numel()
        elif not p.requires_grad:
            held["whole"] += p.numel()
    torch.save({"params": params, "metrics": result["metrics"], "held": held},
               os.path.join(kw["out_dir"], f"params-rank{D.rank()}.pt"))


if __name__ == "__main__":
    main()

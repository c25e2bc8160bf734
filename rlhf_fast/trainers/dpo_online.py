"""Online and iterative DPO (dpo.py's --online and --ref_update_every): pairs sampled from the current policy and
labelled by reward functions or the reward model, and the reference that moves to the policy every N steps.

Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): each step samples two
completions per prompt, the higher-scored is chosen and the other rejected; a pair scored equal (or unscored by
every function) carries no preference and is skipped. Iterative DPO (Xiong et al. 2024, "Iterative preference
learning from human feedback"): every N steps the reference becomes the current policy.
"""

from __future__ import annotations

import os

import torch

from rlhf_fast.data.collate import collate_prompts
from rlhf_fast.errors import ConfigError
from rlhf_fast.rl import rewards as R
from rlhf_fast.rl import rollout


def build_rewards(cfg, model, given=None) -> R.RewardFunctions:
    """The reward functions that label the pairs: `given` (a RewardFunctions or a list of callables), else
    cfg.reward_funcs, where `reward_model` (also the default when only cfg.reward_model is set) scores with the
    model's reward adapter and score head, as grpo's."""
    if given is not None:
        if isinstance(given, R.RewardFunctions):
            return given
        return R.RewardFunctions(list(given), reward_timeout=cfg.reward_timeout)

    def reward_model(prompts, completions, rollout=None, **_):
        return model.scores(rollout.sequences, rollout.attention_mask).tolist()

    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights.strip() else None
    options = {"format_pattern": cfg.format_pattern} if cfg.format_pattern else {}
    return R.load_reward_functions(cfg.reward_funcs.strip() or "reward_model", functions={"reward_model": reward_model},
                                   reward_weights=weights, reward_timeout=cfg.reward_timeout, **options)


@torch.no_grad()
def sample_pairs(model, cfg, tokenizer, batch: list[dict], reward_funcs, eos_id, pad_id, device, engine=None):
    """Two samples of each prompt in `batch` ({"prompt_ids", "text", "columns"}), scored; returns (a DPO batch of
    the untied pairs as dpo.collate_pairs lays it out, or None when all tie; metrics). The rows already hold prompt +
    completion, so the loss mask is the rollout's response mask."""
    p = collate_prompts(batch, pad_id)
    sampling = rollout.SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                      top_p=cfg.top_p, top_k=cfg.top_k, n=2)
    ro = rollout.sample(model, p["prompt_ids"].to(device), p["prompt_mask"].to(device), sampling, eos_token_id=eos_id,
                        engine=engine)  # --rollout vllm: vLLM samples (engine from loop.rollout_engine)
    completions = R.completion_texts(tokenizer, ro.sequences, ro.response_mask)
    prompts = [e["text"] for e in batch for _ in range(2)]
    keys = sorted({k for e in batch for k in e["columns"]})
    columns = {k: [e["columns"].get(k) for e in batch for _ in range(2)] for k in keys}
    rewards, per_function = reward_funcs(prompts, completions, columns, rollout=ro)
    r = rewards.to(device).view(-1, 2)  # (B, 2): the two samples of each prompt
    untied = (r[:, 0] != r[:, 1]) & ~r.isnan().any(1)  # NaN: no function scored it
    first = (r[:, 0] > r[:, 1]).long()  # 1 where sample 0 wins
    rows = torch.arange(r.shape[0], device=device) * 2
    chosen, rejected = (rows + 1 - first)[untied], (rows + first)[untied]
    metrics = {"online/tied_pairs": int((~untied).sum()), "online/pairs": int(untied.sum()),
               "completions/mean_length": float(ro.response_mask.sum(1).float().mean()),
               **R.reward_metrics(rewards, per_function)}
    if not bool(untied.any()):
        return None, metrics
    idx = torch.cat([chosen, rejected])
    return {"input_ids": ro.sequences[idx], "attention_mask": ro.attention_mask[idx],
            "loss_mask": ro.response_mask[idx]}, metrics


class ReferenceUpdates:
    """Iterative DPO's moving reference: merge(step) folds the policy adapter into the base (the reference, adapters
    off, becomes the current policy: RoleModel.merge_policy_into_base), which re-initialises the adapter (B = 0:
    the policy still equals the new reference) and clears the adapter's AdamW state, so that its moments and bias
    correction restart with it instead of pushing the fresh adapter along the old one's directions.

    A checkpoint holds the adapters, not the base; so each merged adapter is also written to
    out_dir/reference_updates/step-N.pt and the checkpoint's state lists the steps: a resumed run replays them on
    the loaded base (load_state_dict), and ends where an uninterrupted one does."""

    def __init__(self, model, params: list, out_dir: str):
        self.model, self.params = model, params
        self.folder = os.path.join(out_dir, "reference_updates")
        self.steps: list[int] = []

    def _file(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step:08d}.pt")

    @torch.no_grad()
    def merge(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self._file(step)}.tmp-{os.getpid()}"
        torch.save({n: p.detach().cpu() for n, p in self.params}, tmp)
        os.replace(tmp, self._file(step))
        self.model.merge_policy_into_base()
        for _, p in self.params:
            optimizer.state.pop(p, None)  # AdamW re-creates it (step 0, zero moments) at the next update
        self.steps.append(step)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        keep = [p.detach().clone() for _, p in self.params]  # the checkpoint's adapter, restored before this
        devices = sorted({p.device.index or 0 for _, p in self.params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):  # the merge re-initialises lora_A from the RNG
            for step in state["steps"]:
                if not os.path.isfile(self._file(step)):
                    raise ConfigError(f"resume: {self._file(step)} (the reference update of step {step}) is "
                                      "missing; the base cannot be rebuilt")
                saved = torch.load(self._file(step), map_location="cpu")
                for n, p in self.params:
                    p.copy_(saved[n])
                self.model.merge_policy_into_base()
        for (_, p), k in zip(self.params, keep):
            p.copy_(k)
        self.steps = list(state["steps"])

"""GRPO and its critic-free relatives on one base: GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al.
2025), DAPO (Yu et al. 2025), GSPO (Zheng et al. 2025), RLOO (Ahmadian et al. 2024), REINFORCE++-baseline
(Hu et al. 2025). With verifiable rewards (RLVR: a checker, not a learned reward model) or a reward model.

Each step: B prompts -> G = num_generations samples each, in one batched rollout on the policy adapter ->
rewards from the reward functions (TRL's contract, rlhf_fast.rl.rewards) -> ops.group_advantages (the mean of
the prompt's group as the baseline; no critic) -> num_iterations passes over num_minibatches minibatches of
ops.fused_linear_ppo_loss (clipped surrogate straight from the hidden states, no (B, T, V) logits), with
beta * KL(pi || ref) in the loss when beta > 0, the reference being the same base with the adapters off (no
reference pass at all when beta = 0, the default, as TRL).

`loss_type` picks the defaults a paper uses; every one of them can still be set by its own flag:

    grpo          seq-mean-token-mean, std scaling per group
    dr_grpo       seq-mean-token-sum-norm (sum / (B x T)), no std scaling
    dapo          token-mean, clip_high 0.28, dynamic sampling, soft overlong punishment
    gspo          sequence-level importance ratio, clip 3e-4 / 4e-4
    rloo          leave-one-out baseline, no std scaling
    reinforce_pp  group-mean baseline, std of the whole batch
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from rlhf_fast.data import reasoning_gym as rg
from rlhf_fast.data.collate import collate_prompts
from rlhf_fast.data.jsonl import DataError, check_examples, load_prompt_examples
from rlhf_fast.models.io import load_reward
from rlhf_fast.ops import fused_linear_kl, fused_linear_ppo_loss, group_advantages
from rlhf_fast.rl import rewards as R
from rlhf_fast.rl import rollout
from rlhf_fast.rl.ensemble import REDUCTIONS, check_options, ensemble_reward
from rlhf_fast.rl.judge import DEFAULT_RATING_WORDS, bind_judges, judge_functions
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import (
    ConfigError,
    RolloutCorrection,
    RolloutOptions,
    TrainConfig,
    option,
    quiet_unless_progress,
)

PRESETS = {
    "grpo": dict(loss_agg="seq-mean-token-mean", scale_rewards="group", advantage_estimator="grpo"),
    "dr_grpo": dict(loss_agg="seq-mean-token-sum-norm", scale_rewards="none", advantage_estimator="grpo"),
    "dapo": dict(loss_agg="token-mean", scale_rewards="group", advantage_estimator="grpo", clip_high=0.28,
                 dynamic_sampling=True, overlong_buffer=-1),  # -1: a quarter of max_completion_length
    "gspo": dict(loss_agg="seq-mean-token-mean", scale_rewards="group", advantage_estimator="grpo",
                 ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "rloo": dict(loss_agg="seq-mean-token-mean", scale_rewards="none", advantage_estimator="rloo"),
    "reinforce_pp": dict(loss_agg="seq-mean-token-mean", scale_rewards="batch", advantage_estimator="grpo"),
}
_DEFAULTS = dict(clip_low=0.2, clip_high=None, ratio_level="token", dynamic_sampling=False, overlong_buffer=0)


@dataclass
class GRPOConfig(RolloutCorrection, RolloutOptions, TrainConfig):
    """GRPO-family RL of the policy adapter on {"prompt", ...columns} JSONL (batch_size: prompts per step)."""

    loss_type: str = option("grpo", "preset of the defaults below", choices=tuple(PRESETS))
    num_generations: int = option(8, "samples per prompt G (the group)")
    num_iterations: int = option(1, "passes over each rollout batch (mu; 1 = strictly on-policy)")
    num_minibatches: int = option(1, "minibatches per pass (split over the B x G samples)")
    micro_batch_size: int = option(0, "samples per forward/backward inside a minibatch, gradients accumulated "
                                      "to the same update (TRL's per_device_train_batch_size; less activation "
                                      "memory); 0: the whole minibatch at once")
    shared_prefix: bool = option(True, "run each prompt's columns through the backbone once per group in the "
                                       "training forwards (policy, old log-probs, reference; micro-batches keep "
                                       "a group's samples together): the same values up to float rounding for "
                                       "fewer backbone tokens (RoleModel.policy_forward)")
    max_completion_length: int = option(64, "new tokens generated per sample")
    temperature: float = option(1.0, "sampling temperature (the loss's log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling (0: off)")
    beta: float = option(0.0, "KL coefficient; 0 (as TRL): no reference pass at all")
    kl_estimator: str = option("k3", "KL in the loss: k3 (Schulman's estimator on the sampled tokens), k1, k2, "
                                     "abs, or full (the exact KL over the whole vocabulary)",
                               choices=("k1", "k2", "k3", "abs", "full"))
    clip_low: float | None = option(None, "clip range below 1 (TRL's epsilon); unset: the preset's (0.2)")
    clip_high: float | None = option(None, "clip range above 1 (TRL's epsilon_high, DAPO's clip-higher); "
                                           "unset: the preset's (clip_low)")
    advantage_estimator: str | None = option(None, "grpo (group mean) or rloo (leave-one-out); unset: preset's",
                                             choices=("grpo", "rloo"))
    scale_rewards: str | None = option(None, "divide advantages by the std of the group, the batch, or not; "
                                             "unset: preset's", choices=("group", "batch", "none"))
    loss_agg: str | None = option(None, "loss aggregation; unset: preset's",
                                  choices=("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                           "seq-mean-token-sum-norm"))
    ratio_level: str | None = option(None, "importance ratio per token, or per sequence (GSPO); unset: preset's",
                                     choices=("token", "sequence"))
    dynamic_sampling: bool | None = option(None, "DAPO: drop groups whose rewards are all equal and sample more "
                                                 "prompts; unset: preset's")
    max_resample_batches: int = option(3, "dynamic sampling: extra prompt batches sampled at most per step")
    overlong_buffer: int | None = option(None, "DAPO soft overlong punishment: the last N tokens before "
                                               "max_completion_length cost up to overlong_penalty (0: off; "
                                               "-1: a quarter of max_completion_length); unset: preset's")
    overlong_penalty: float = option(1.0, "the soft overlong punishment at max_completion_length")
    mask_truncated_completions: bool = option(False, "leave completions that hit max_completion_length "
                                                     "without EOS out of the loss")
    reward_funcs: str = option("", "comma-separated reward functions: accuracy, format, code, reward_model, judge, "
                                   "pkg.module:function (TRL's signature)")
    reward_weights: str = option("", "comma-separated weights, one per reward function (default 1 each)")
    reward_timeout: float = option(300.0, "seconds one reward function may take on one batch")
    format_pattern: str = option("", "regex of the `format` reward (default: a <think>/<answer> template)")
    reward_model: str = option("", "folder written by `rlhf-fast rm` (out_dir/model), for reward_model")
    judge: str = option("", "--reward_funcs judge: the judge LM's folder (equal to --model: the policy's own base, "
                            "adapters off, judges without a second copy); reward = its expected rating (rl/judge.py)")
    constitution: str = option("", "--reward_funcs judge: the principles, a text file with one per line")
    judge_template: str = option("", "--reward_funcs judge: rating template file (default: the shipped one)")
    judge_rating_words: str = option(DEFAULT_RATING_WORDS, "--reward_funcs judge: word=value,... each one token")
    ensemble_reduce: str | None = option(None, "reward_model from an ensemble (`rlhf-fast rm --ensemble K`): the "
                                               "members' mean, min, mean_minus_std (mean - ensemble_penalty x std, "
                                               "Coste et al. 2023) or mean_minus_var; unset: mean_minus_std",
                                         choices=REDUCTIONS)
    ensemble_penalty: float | None = option(None, "lambda of mean_minus_std / mean_minus_var (>= 0); unset: 1.0")
    std_eps: float = option(1e-4, "added to the std when scaling advantages")
    # --- reasoning-gym tasks instead of --data (rlhf_fast/data/reasoning_gym.py) ---
    dataset: str = option("", "reasoning_gym:NAME[?k=v&...] instead of --data: a procedural reasoning-gym task, "
                              "scored by the `accuracy` reward through the task's own checker")
    dataset_size: int = option(1000, "--dataset: training prompts (seed: --seed)")
    eval_size: int = option(200, "--dataset: held-out prompts (another seed, no training question), scored "
                                 "greedily at the end into out_dir/eval.json (0: none)")

    def resolved(self) -> dict:
        """The effective value of every preset-controlled option: the flag when set, else the preset's."""
        out = _DEFAULTS | PRESETS[self.loss_type]
        for k in out:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if out["clip_low"] is None:
            out["clip_low"] = 0.2
        if out["overlong_buffer"] == -1:
            out["overlong_buffer"] = self.max_completion_length // 4
        return out

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in PRESETS:
            raise ConfigError(f"loss_type must be one of {', '.join(PRESETS)}, got {self.loss_type!r}")
        r = self.resolved()
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        checks = [
            (self.num_generations >= 2, f"num_generations must be >= 2 (a group), got {self.num_generations}"),
            (self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}"),
            (1 <= self.num_minibatches <= self.batch_size * self.num_generations,
             f"num_minibatches must lie in [1, batch_size x num_generations], got {self.num_minibatches}"),
            (self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}"),
            (0 < self.max_completion_length < self.max_length,
             f"max_completion_length must lie in [1, max_length={self.max_length}), got {self.max_completion_length}"),
            (finite(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1 and self.top_k >= 0, "top_p must lie in (0, 1] and top_k be >= 0"),
            (finite(self.beta) and self.beta >= 0, f"beta must be a finite number >= 0, got {self.beta}"),
            (finite(r["clip_low"]) and r["clip_low"] > 0, f"clip_low must be > 0, got {r['clip_low']}"),
            (r["clip_high"] is None or (finite(r["clip_high"]) and r["clip_high"] > 0),
             f"clip_high must be > 0, got {r['clip_high']}"),
            (self.max_resample_batches >= 0, "max_resample_batches must be >= 0"),
            (0 <= r["overlong_buffer"] < self.max_completion_length or self.overlong_buffer == -1,
             f"overlong_buffer must lie in [0, max_completion_length) or be -1, got {self.overlong_buffer}"),
            (finite(self.overlong_penalty) and self.overlong_penalty >= 0, "overlong_penalty must be >= 0"),
            (finite(self.reward_timeout) and self.reward_timeout > 0, "reward_timeout must be > 0"),
            (finite(self.std_eps) and self.std_eps >= 0, f"std_eps must be >= 0, got {self.std_eps}"),
            (bool(self.reward_funcs.strip()), "--reward_funcs is required (e.g. accuracy,format)"),
            (not self.dataset or self.dataset.startswith(rg.PREFIX),
             f"--dataset must read {rg.PREFIX}NAME[?key=value&...], got {self.dataset!r}"),
            (not (self.dataset and self.data), "give --data or --dataset, not both"),
            (self.dataset_size >= 1 and self.eval_size >= 0, "dataset_size must be >= 1 and eval_size >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_options(self.ensemble_reduce, self.ensemble_penalty, has_reward_model=uses_reward_model(self))


def uses_reward_model(cfg: GRPOConfig) -> bool:
    return "reward_model" in [f.strip() for f in cfg.reward_funcs.split(",")]


# ----------------------------------------------------------------------------------------- rewards
def build_rewards(cfg: GRPOConfig, model, ensemble=None) -> R.RewardFunctions:
    """The reward functions of cfg.reward_funcs; `reward_model` scores with the model's reward adapter, or with
    `ensemble` (an rl.ensemble.EnsembleReward: the members' reduced score) when given."""

    def reward_model(prompts, completions, rollout=None, **_):
        if ensemble is not None:
            return ensemble(rollout.sequences, rollout.attention_mask).tolist()
        return model.scores(rollout.sequences, rollout.attention_mask).tolist()

    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights.strip() else None
    options = {"format_pattern": cfg.format_pattern} if cfg.format_pattern else {}
    if cfg.dataset:  # reasoning-gym: `accuracy` scores with the task's checker
        options["score_answer"] = rg.score_answer
    judge = judge_functions(cfg.reward_funcs, cfg.judge, cfg.constitution, cfg.judge_template, cfg.judge_rating_words)
    return R.load_reward_functions(cfg.reward_funcs, functions={"reward_model": reward_model, **judge},
                                   reward_weights=weights, reward_timeout=cfg.reward_timeout, **options)


def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_len - buffer, then falling
    linearly to -penalty at max_len. lengths (B,) -> (B,) fp32."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * over / buffer


def fill_unscored(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """A sample no reward function applies to (NaN) takes its group's mean of the others, so its advantage is
    0 and it leaves the group's baseline unchanged (TRL >= 1.16 keeps such samples out of the baseline)."""
    r = rewards.view(-1, G)
    mean = r.nanmean(1, keepdim=True).nan_to_num(0.0)
    return torch.where(r.isnan(), mean, r).view(-1)


# ----------------------------------------------------------------------------------------- one step
@torch.no_grad()
def sampling_config(cfg: GRPOConfig) -> rollout.SamplingConfig:
    return rollout.SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.num_generations)


def make_groups(model, cfg: GRPOConfig, tokenizer, batch: list[dict], rewards_fn, eos_id, pad_id, device,
                engine=None) -> dict:
    """Sample G completions per prompt of `batch` (example dicts: prompt_ids, text, columns), score them and
    compute the group advantages. Returns the rollout tensors, advantages (B*G,) and metrics; "rollout_logprobs"
    is vLLM's (B*G, T) log-probs with an engine (--rollout vllm), else None."""
    opts, G = cfg.resolved(), cfg.num_generations
    p = collate_prompts(batch, pad_id)
    ro = rollout.sample(model, p["prompt_ids"].to(device), p["prompt_mask"].to(device), sampling_config(cfg),
                        eos_token_id=eos_id, engine=engine)
    completions = R.completion_texts(tokenizer, ro.sequences, ro.response_mask)
    prompts = [e["text"] for e in batch for _ in range(G)]
    keys = sorted({k for e in batch for k in e["columns"]})
    columns = {k: [e["columns"].get(k) for e in batch for _ in range(G)] for k in keys}
    rewards, per_function = rewards_fn(prompts, completions, columns, rollout=ro)
    lengths = ro.response_mask.sum(1)  # (B*G,)
    rewards = fill_unscored(rewards.to(device), G) + overlong_shaping(
        lengths, cfg.max_completion_length, opts["overlong_buffer"], cfg.overlong_penalty).to(device)
    grouped = rewards.view(-1, G)
    zero_std = (grouped == grouped[:, :1]).all(1)  # (B,)
    # torchrun: a process holds whole groups; the batch scale (reinforce_pp) needs every process's rewards
    adv = D.local_rows(group_advantages(D.all_gather_cat(rewards), G, estimator=opts["advantage_estimator"],
                                        scale=opts["scale_rewards"], eps=cfg.std_eps))
    mask = ro.mask
    if cfg.mask_truncated_completions:
        mask = mask * ro.has_eos[:, None].float()
    return {"seq": ro.sequences, "attn": ro.attention_mask, "mask": mask, "adv": adv, "rewards": rewards,
            "per_function": {k: v.to(device) for k, v in per_function.items()}, "zero_std": zero_std,
            "lengths": lengths, "has_eos": ro.has_eos, "rollout_logprobs": ro.logprobs,
            "width": D.global_width(p["prompt_ids"].shape[1], ro.sequences.shape[1])}


def cat_groups(parts: list[dict]) -> dict:
    out = {}
    keys = ("seq", "attn", "mask") + (("rollout_logprobs",) if parts[0]["rollout_logprobs"] is not None else ())
    out["rollout_logprobs"] = None
    for k in keys:
        width = max(x[k].shape[1] for x in parts)
        out[k] = torch.cat([torch.nn.functional.pad(x[k], (0, width - x[k].shape[1])) for x in parts])
    for k in ("adv", "rewards", "zero_std", "lengths", "has_eos"):
        out[k] = torch.cat([x[k] for x in parts])
    out["per_function"] = {k: torch.cat([x["per_function"][k] for x in parts]) for k in parts[0]["per_function"]}
    return out


def micro_batches(mask: torch.Tensor, idx: torch.Tensor, size: int, agg: str) -> list[tuple[torch.Tensor, float]]:
    """Split the minibatch rows `idx` into micro-batches of `size` rows (0: one) with the share each one's loss
    takes, so that sum(share * loss(micro)) equals the minibatch's loss under `agg`: a token-mean weighs a
    micro-batch by its valid tokens, the seq-mean modes by its rows that have one, Dr. GRPO's sum / (B x T) by its
    rows (T is the same padded width)."""
    if size <= 0 or size >= idx.numel():
        return [(idx, 1.0)]
    parts = list(idx.split(size))
    m = mask != 0
    if agg == "token-mean":
        counts = [float(m[p].sum()) for p in parts]
    elif agg == "seq-mean-token-sum-norm":
        counts = [float(p.numel()) for p in parts]
    else:
        counts = [float(m[p].any(1).sum()) for p in parts]
    total = sum(counts)
    return [(p, c / total if total else 0.0) for p, c in zip(parts, counts)]


def grpo_minibatch_loss(model, cfg: GRPOConfig, b: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (+ beta * KL) on rows idx, from the policy's hidden states.

    Only the completion columns go through the lm head (the prompt's carry no loss); Dr. GRPO's sum / (B x T)
    keeps the whole padded width T, as its normaliser is defined on it."""
    opts = cfg.resolved()
    seq, attn, mask = b["seq"][idx], b["attn"][idx], b["mask"][idx]
    prefix = int(b.get("first_completion", 0)) if cfg.shared_prefix else 0  # a group's prompt columns, run once
    c = 0 if opts["loss_agg"] == "seq-mean-token-sum-norm" else int(b.get("first_completion", 0))
    # scored from column c on: the prefix pass's last layer then runs in full at the prompt's last column only
    f = model.policy_forward(seq, attn, shared_prefix=prefix, prefix_outputs=c < prefix)  # hidden (b, T, H)
    m = mask * f.mask
    hidden, targets, m = f.hidden[:, c:], f.targets[:, c:], m[:, c:]  # (b, T - c, H), (b, T - c)
    adv = b["adv"][idx] if b["adv"].dim() == 1 else b["adv"][idx][:, c:]
    in_loss_kl = cfg.beta > 0 and cfg.kl_estimator != "full"
    # None: strictly on-policy, the old log-probs are this forward's own, detached (ratio 1), from the loss's pass
    old = None if b["old"] is None else b["old"][idx][:, c:]
    pg, st = fused_linear_ppo_loss(hidden, f.weight, targets, old, adv, m, f.bias,
                                   ref_logprobs=b["ref"][idx][:, c:] if in_loss_kl else None,
                                   kl_coef=cfg.beta if in_loss_kl else 0.0, kl_estimator=cfg.kl_estimator
                                   if in_loss_kl else "k3", clip_low=opts["clip_low"], clip_high=opts["clip_high"],
                                   ratio_level=opts["ratio_level"], temperature=cfg.temperature,
                                   agg=opts["loss_agg"])
    stats = {"clip_ratio/region_mean": st["clipfrac"], "clip_ratio/low_mean": st["clipfrac_low"],
             "clip_ratio/high_mean": st["clipfrac_high"], "entropy": st["entropy"], "approx_kl": st["approx_kl"]}
    if in_loss_kl:
        stats["kl"] = st["kl"]
    if cfg.beta > 0 and cfg.kl_estimator == "full":
        with model.role("reference"), torch.no_grad():
            ref_hidden = model.policy_forward(seq, attn, shared_prefix=prefix, prefix_outputs=c < prefix).hidden
        kl = fused_linear_kl(hidden, ref_hidden[:, c:], f.weight, m, f.bias, temperature=cfg.temperature)
        kl_mean = (kl * m).sum() / m.sum().clamp(min=1)
        pg = pg + cfg.beta * kl_mean
        stats["kl"] = kl_mean.detach()
    return pg, stats


# ----------------------------------------------------------------------------------------- the loop
@quiet_unless_progress
def train_grpo(cfg: GRPOConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None,
               reward_funcs=None, callback=None) -> dict:
    """Run GRPO (or a relative, by cfg.loss_type). Returns {"model", "metrics": last logged row, "out", "eval":
    the held-out evaluation of cfg.dataset (data/reasoning_gym.py evaluate; None without one)}.

    examples: {"prompt_ids": list[int], "text": str, "columns": dict} instead of reading cfg.data / cfg.dataset.
    reward_funcs: an rlhf_fast.rl.RewardFunctions (or a list of callables with TRL's signature) instead of
        cfg.reward_funcs.
    callback(step, model) -> dict of extra metrics, called at every logged step.
    """
    if reward_funcs is not None and not cfg.reward_funcs:
        cfg.reward_funcs = "(given)"
    cfg.validate()
    opts, G = cfg.resolved(), cfg.num_generations
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=True)
    held_out = []
    if examples is None and cfg.dataset:
        examples, held_out = rg.load_reasoning_gym_splits(cfg.dataset, cfg.dataset_size, cfg.eval_size, cfg.seed,
                                                          tokenizer, cfg.max_length, cfg.max_completion_length)
    if examples is None:
        examples = load_prompt_examples(cfg.data, tokenizer, cfg.max_length, cfg.max_completion_length)
    check_examples(examples, ("prompt_ids", "text", "columns"), "GRPO prompts")
    too_long = [i for i, e in enumerate(examples) if len(e["prompt_ids"]) + cfg.max_completion_length > cfg.max_length]
    if too_long:
        raise DataError(f"prompt {too_long[0]}: with max_completion_length={cfg.max_completion_length} it exceeds "
                        f"max_length={cfg.max_length}")
    if opts["dynamic_sampling"]:
        D.refuse("grpo --dynamic_sampling (DAPO's resampling of flat groups)")
    device = D.init_from_env(cfg)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    D.seed_rank_streams(cfg.seed)  # torchrun: each process samples its own completions
    if cfg.reward_model:
        load_reward(model, cfg.reward_model)
    ensemble = ensemble_reward(model, cfg.ensemble_reduce, cfg.ensemble_penalty) if uses_reward_model(cfg) else None
    if reward_funcs is None:
        reward_funcs = build_rewards(cfg, model, ensemble)
    elif not isinstance(reward_funcs, R.RewardFunctions):
        reward_funcs = R.RewardFunctions(list(reward_funcs), reward_timeout=cfg.reward_timeout)
    bind_judges(reward_funcs, model, cfg.model, tokenizer)  # `judge`: the policy's base when --judge is --model
    reward_funcs.check_columns({k for e in examples for k in e["columns"]})
    pad_id, eos_id = L.pad_id(tokenizer, model), L.eos_id(tokenizer, model)
    model.eval()  # no dropout: the rollout's and the update's log-probs must agree

    params = L.trainable_named_parameters(model, ["policy"])
    updates = cfg.num_iterations * cfg.num_minibatches
    extra = L.BatchSampler(len(examples), cfg.batch_size, cfg.seed + 7) if opts["dynamic_sampling"] else None
    with L.Run(cfg, "grpo", params, len(examples), updates_per_step=updates, callback=callback, model=model,
               stateful={"resample_sampler": extra}) as run, \
            L.rollout_engine(cfg, model, sampling_config(cfg)) as engine:
        for _ in run:
            model.eval()
            parts = [make_groups(model, cfg, tokenizer, [examples[i] for i in run.sampler.next()], reward_funcs,
                                 eos_id, pad_id, device, engine)]
            frac_zero_std = parts[0]["zero_std"].float().mean()
            kept = None
            if opts["dynamic_sampling"]:  # DAPO: keep only groups that carry a learning signal
                keep = [~parts[0]["zero_std"]]
                for _ in range(cfg.max_resample_batches):
                    if int(sum(k.sum() for k in keep)) >= cfg.batch_size:
                        break
                    parts.append(make_groups(model, cfg, tokenizer, [examples[i] for i in extra.next()],
                                             reward_funcs, eos_id, pad_id, device, engine))
                    keep.append(~parts[-1]["zero_std"])
            b = cat_groups(parts)
            if opts["dynamic_sampling"]:
                groups = torch.cat(keep).nonzero().squeeze(-1)[:cfg.batch_size]
                kept = groups.numel()
                if groups.numel() == 0:
                    groups = torch.arange(cfg.batch_size, device=device)  # all flat: the loss is 0 anyway
                rows = (groups[:, None] * G + torch.arange(G, device=device)).reshape(-1)  # their samples
                b = {k: (v[groups] if k == "zero_std" else v[rows] if torch.is_tensor(v)
                         else None if v is None else {n: t[rows] for n, t in v.items()}) for k, v in b.items()}
            b["width"] = parts[0]["width"]  # the padded width one process would have (Dr. GRPO's T under torchrun)
            with torch.no_grad():
                # one update on the whole batch (num_iterations = num_minibatches = 1) is strictly on-policy: the
                # loss takes the old log-probs from its own forward instead of a separate pass (as TRL)
                on_policy = cfg.num_iterations == 1 and cfg.num_minibatches == 1
                # --rollout vllm: always the trainer's own old log-probs, to compare with vLLM's and weigh by
                vllm = b["rollout_logprobs"] is not None
                # the columns before the first completion token are prompt in every row: a group shares them
                b["first_completion"] = rollout.first_response_column(b["mask"])
                prefix = b["first_completion"] if cfg.shared_prefix else 0
                # old and reference log-probs are read on the completion columns only (0 before them)
                b["old"] = None if on_policy and not vllm else model.logprobs(
                    b["seq"], b["attn"], temperature=cfg.temperature, shared_prefix=prefix, start=prefix)
                rollout_stats = {}
                if vllm:
                    w, rollout_stats = rollout.importance_correction(
                        b["old"], b["rollout_logprobs"], b["mask"], mode=cfg.rollout_is_correction,
                        cap=cfg.rollout_is_cap)
                    if w is not None:  # per-token advantages: the fused loss takes (B, T) as well as (B,)
                        b["adv"] = (b["adv"][:, None] if b["adv"].dim() == 1 else b["adv"]) * w
                if cfg.beta > 0 and cfg.kl_estimator != "full":
                    b["ref"] = model.logprobs(b["seq"], b["attn"], role="reference", temperature=cfg.temperature,
                                              shared_prefix=prefix, start=prefix)
            N = b["seq"].shape[0]
            stats: dict[str, list] = {}
            for _ in range(cfg.num_iterations):
                # one permutation of the global batch (rank 0's under torchrun); this process's rows of each part
                for idx in D.minibatches(N, cfg.num_minibatches, device):
                    idx = idx.to(device)
                    # torchrun: this process's part of the minibatch's loss (exactly 1 on one process)
                    scale = D.agg_share(b["mask"][idx], opts["loss_agg"], b["width"])
                    loss, st = torch.zeros((), device=device), {}
                    if cfg.shared_prefix and 0 < cfg.micro_batch_size < idx.numel():
                        idx = idx.sort().values  # a group's samples in one micro-batch share their prompt's pass
                    for sub, share in micro_batches(b["mask"], idx, cfg.micro_batch_size, opts["loss_agg"]):
                        if sub.numel() == 0:  # the minibatch's rows are all on other processes
                            if not D.lockstep():
                                continue
                            # FSDP2: the others' forwards gather this process's shards: one row, weighted 0
                            sub, share = torch.zeros(1, dtype=torch.long, device=device), 0.0
                        part, st_part = grpo_minibatch_loss(model, cfg, b, sub)
                        (part * (share * scale)).backward()
                        loss = loss + part.detach() * (share * scale)
                        for k, v in st_part.items():  # statistics weighted as the loss is (on this process)
                            st[k] = st.get(k, 0.0) + v * share
                    st["grad_norm"] = run.apply(loss)
                    st["loss"] = run.loss
                    for k, v in st.items():
                        stats.setdefault(k, []).append(float(v))
            run.tokens += int(b["attn"].sum())
            if run.logging_now():
                metrics = {k: sum(v) / len(v) for k, v in stats.items()}
                metrics.update(R.reward_metrics(D.all_gather_cat(b["rewards"]),  # the global batch's
                                                {k: D.all_gather_cat(v) for k, v in b["per_function"].items()}))
                if ensemble is not None:
                    metrics["rewards/ensemble_std"] = ensemble.pop_std()  # across members, mean over the samples
                if kept is not None:
                    metrics["dynamic_sampling/kept_groups"] = kept  # groups with a learning signal, <= batch_size
                metrics.update({"frac_reward_zero_std": frac_zero_std,
                                "completions/mean_length": b["lengths"].float().mean(),
                                "completions/clipped_ratio": (~b["has_eos"]).float().mean(),
                                **rollout_stats, **L.rollout_metrics(engine), **run.common_metrics(device)})
                run.log_row(metrics, ("reward", "reward_std", "loss"))
        run.finish()  # the final checkpoint; the out_dir stays locked until the model is saved
        model.trained_roles.add("policy")
        out = os.path.join(cfg.out_dir, "model")
        D.save_model(model, out)
        evaluation = None
        # --dataset: greedy accuracy on the held-out questions (FSDP2: every process decodes, rank 0 reports)
        if held_out and (D.is_main() or D.lockstep()):
            evaluation = rg.evaluate(model, held_out, R.Accuracy(score_answer=rg.score_answer),
                                     max_new_tokens=cfg.max_completion_length, pad_id=pad_id, eos_id=eos_id,
                                     decode=lambda s, m: R.completion_texts(tokenizer, s, m))
            if D.is_main():
                with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
                    json.dump({"dataset": cfg.dataset, "step": run.step, **evaluation}, f, indent=2)
    return {"model": model, "metrics": run.row, "out": out, "eval": evaluation}

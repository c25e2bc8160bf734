"""PPO against a learned reward model, all four roles on one base (InstructGPT's recipe, Ouyang et al. 2022).

Each step: sample a batch of prompts; rollout with the policy adapter (RoleModel.generate); experience
forwards for reference log-probs, values and scores (the old log-probs come from the rollout; with one minibatch
the old values from the first update's critic forward); reward shaping and advantages in one pass
(ops.kl_penalized_gae: r_t = -beta * KL_t, plus the score on the last response token); then ppo_epochs
passes over num_minibatches minibatches with ops.fused_linear_ppo_loss (policy, no (B, T, V) logits) and
ops.value_loss (critic), plus an optional PTX term (next-token loss on pretraining text, InstructGPT's
fix for the alignment tax). beta is fixed or adapted towards a target KL (Ziegler et al. 2019).
Metric names follow TRL's PPO trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlhf_fast.data.collate import collate_prompts, collate_texts
from rlhf_fast.data.jsonl import (
    DataError,
    check_examples,
    encode_prompts,
    encode_texts,
    load_prompt_examples,
    load_prompts,
    load_texts,
)
from rlhf_fast.models.io import load_reward
from rlhf_fast.ops import fused_linear_ppo_loss, value_loss
from rlhf_fast.rl import advantages, kl_control, rollout
from rlhf_fast.rl.ensemble import REDUCTIONS, check_options, ensemble_reward
from rlhf_fast.rl.judge import DEFAULT_RATING_WORDS, bind_judges, judge_functions
from rlhf_fast.rl.rewards import load_reward_functions, text_reward_fn
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
from rlhf_fast.trainers.sft import sft_loss


@dataclass
class PPOConfig(RolloutCorrection, RolloutOptions, TrainConfig):
    """PPO of the policy and critic adapters against the reward adapter, on {"prompt"} JSONL."""

    reward_model: str = option("", "folder saved by `rlhf-fast rm` (out_dir/model): reward adapter, head, offset; "
                                   "it must have been trained on this --model (checked); its own LoRA settings are "
                                   "used, whatever --lora_* say")
    reward_funcs: str = option("", "reward functions instead of a reward model (RLVR with a critic): accuracy, "
                                   "format, code, judge or pkg.module:function (TRL's signature), comma-separated; "
                                   "the prompt file's other fields are their columns")
    judge: str = option("", "--reward_funcs judge: the judge LM's folder (equal to --model: the policy's own base, "
                            "adapters off, judges without a second copy); reward = its expected rating (rl/judge.py)")
    constitution: str = option("", "--reward_funcs judge: the principles, a text file with one per line")
    judge_template: str = option("", "--reward_funcs judge: rating template file (default: the shipped one)")
    judge_rating_words: str = option(DEFAULT_RATING_WORDS, "--reward_funcs judge: word=value,... each one token")
    reward_weights: str = option("", "comma-separated weights, one per reward function (default 1 each)")
    reward_timeout: float = option(300.0, "seconds one reward function may take on one batch")
    ensemble_reduce: str | None = option(None, "a reward-model ensemble (`rlhf-fast rm --ensemble K`): the reward is "
                                               "the members' mean, min, mean_minus_std (mean - ensemble_penalty x "
                                               "std, Coste et al. 2023) or mean_minus_var; unset: mean_minus_std",
                                         choices=REDUCTIONS)
    ensemble_penalty: float | None = option(None, "lambda of mean_minus_std / mean_minus_var (>= 0); unset: 1.0")
    # redeclared for their help: a PPO step is one rollout batch, then ppo_epochs x num_minibatches updates
    batch_size: int = option(8, "prompts per PPO step (the rollout batch); each step then makes ppo_epochs x "
                                "num_minibatches optimiser updates on it")
    max_steps: int = option(0, "PPO steps, i.e. rollout batches (0: epochs x steps per epoch)")
    epochs: int = option(1, "passes over the prompts when max_steps is 0")
    response_length: int = option(64, "new tokens generated per prompt")
    temperature: float = option(1.0, "sampling temperature (the PPO log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling (0: off)")
    ppo_epochs: int = option(4, "passes over each rollout batch")
    num_minibatches: int = option(1, "minibatches per pass")
    kl_coef: float = option(0.05, "KL penalty coefficient beta (initial value for the adaptive controller)")
    kl_controller: str = option("fixed", "fixed, or adaptive (Ziegler et al. 2019)", choices=("fixed", "adaptive"))
    kl_target: float = option(6.0, "adaptive controller: target KL per sequence")
    kl_horizon: float = option(10000.0, "adaptive controller: horizon, in sequences")
    kl_estimator: str = option("k1", "estimator of the per-token KL penalty in the reward, r_t = -kl_coef * KL_t "
                                     "(ops.kl_penalized_gae), and of objective/kl: k1 = log p - log p_ref, as TRL "
                                     "and InstructGPT; k2, k3 (Schulman 2020) or abs. The policy loss has no KL term "
                                     "here (ops.fused_linear_ppo_loss's own kl_estimator, default k3, is for "
                                     "GRPO-style in-loss KL and is unused by this trainer)",
                               choices=("k1", "k2", "k3", "abs"))
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    clip_low: float = option(0.2, "PPO clip range below 1: ratio >= 1 - clip_low (TRL's cliprange / epsilon)")
    clip_high: float | None = option(None, "PPO clip range above 1: ratio <= 1 + clip_high (TRL's epsilon_high; "
                                           "default: clip_low)")
    dual_clip: float | None = option(None, "dual-clip bound c > 1 for negative advantages (off when unset)")
    value_clip: float | None = option(0.2, "value clip range around the old values (unset: no clipping)")
    vf_coef: float = option(0.1, "value loss coefficient")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    old_logprobs: str = option("generation", "where the ratio's old log-probs come from: generation takes them "
                               "from the logits the native sampling loop drew each token from (no policy forward "
                               "in the experience step; equal to a recomputation up to float rounding, and only "
                               "with a float32 base: a 16-bit base is merged with rounding, so it and --rollout "
                               "vllm recompute); recompute runs the policy forward over the sequences",
                               choices=("generation", "recompute"))
    whiten_advantages: bool = option(True, "whiten advantages over the batch")
    normalize_scores: bool = option(False, "normalise scores by their running mean and std")
    score_clip: float | None = option(None, "clip scores to [-score_clip, score_clip] (after normalisation)")
    missing_eos_penalty: float | None = option(None, "subtract this (>= 0, as TRL's) from the score of responses "
                                                     "without EOS; unset: no penalty")
    loss_agg: str = option("token-mean", "loss aggregation", choices=("token-mean", "seq-mean-token-sum",
                                                                      "seq-mean-token-mean",
                                                                      "seq-mean-token-sum-norm"))
    ptx_data: str = option("", "pretraining text JSONL {\"text\"} for the PTX term")
    ptx_coef: float = option(0.0, "PTX coefficient (next-token loss on ptx_data)")
    ptx_batch_size: int = option(4, "texts per minibatch for the PTX term")

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}"),
            (0 < self.clip_low < 1, f"clip_low must be > 0 and < 1 (ratio >= 1 - clip_low), got {self.clip_low}"),
            (self.clip_high is None or self.clip_high > 0, f"clip_high must be > 0, got {self.clip_high}"),
            (self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1, got {self.dual_clip}"),
            (self.value_clip is None or self.value_clip > 0, f"value_clip must be > 0, got {self.value_clip}"),
            (0 <= self.lam <= 1, f"lam must lie in [0, 1], got {self.lam}"),
            (0 <= self.gamma <= 1, f"gamma must lie in [0, 1], got {self.gamma}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.response_length < self.max_length,
             f"response_length must lie in [1, max_length={self.max_length}), got {self.response_length}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (1 <= self.num_minibatches <= self.batch_size,
             f"num_minibatches must lie in [1, batch_size={self.batch_size}], got {self.num_minibatches}"),
            (self.kl_target > 0, f"kl_target must be > 0, got {self.kl_target}"),
            (self.kl_horizon > 0, f"kl_horizon must be > 0, got {self.kl_horizon}"),
            (self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}"),
            (self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}"),
            (self.score_clip is None or self.score_clip > 0, f"score_clip must be > 0, got {self.score_clip}"),
            (self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
             f"missing_eos_penalty must be >= 0 (it is subtracted from the score), got {self.missing_eos_penalty}"),
            (self.ptx_coef >= 0, f"ptx_coef must be >= 0, got {self.ptx_coef}"),
            (self.ptx_batch_size >= 1, f"ptx_batch_size must be >= 1, got {self.ptx_batch_size}"),
            (self.kl_controller in ("fixed", "adaptive"), f"kl_controller must be fixed or adaptive, got "
                                                           f"{self.kl_controller!r}"),
            (self.kl_estimator in ("k1", "k2", "k3", "abs"), f"unknown kl_estimator {self.kl_estimator!r}"),
            (self.old_logprobs in ("generation", "recompute"),
             f"old_logprobs must be generation or recompute, got {self.old_logprobs!r}"),
            (self.kl_controller != "adaptive" or self.kl_coef > 0, "kl_controller adaptive needs kl_coef > 0"),
            (self.reward_timeout > 0, f"reward_timeout must be > 0, got {self.reward_timeout}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_options(self.ensemble_reduce, self.ensemble_penalty, has_reward_model=not self.reward_funcs)


def kl_controller(cfg: PPOConfig):
    if cfg.kl_controller == "adaptive":
        return kl_control.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return kl_control.FixedKLController(cfg.kl_coef)


def sampling_config(cfg: PPOConfig) -> rollout.SamplingConfig:
    return rollout.SamplingConfig(max_new_tokens=cfg.response_length, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k)


@torch.no_grad()
def make_experience(model, cfg: PPOConfig, prompts: dict, eos_id: int | None, ctl, moments,
                    reward_fn=None, ensemble=None, engine=None, critic: bool = True) -> dict:
    """Generate, score and compute advantages for one batch of prompts (left-padded prompt_ids/prompt_mask).
    ensemble: an rl.ensemble.EnsembleReward whose reduced score replaces the reward head's (an extra forward per
    member: experience() already scored member 0, kept as it is for the single-model path).
    engine: the vLLM engine (--rollout vllm): it samples; the old log-probs are still the trainer's own, and with
    rollout_is_correction tis the advantages are weighted per token (rollout.importance_correction).
    critic=False: no critic forward here; "values", "adv", "returns" and "kl" stay None until
    complete_experience gets the old values (train_ppo: from the first update's critic forward, at the very weights
    this forward would have used)."""
    want = cfg.old_logprobs == "generation" and engine is None and model.lm_head.weight.dtype == torch.float32
    ro = rollout.sample(model, prompts["prompt_ids"], prompts["prompt_mask"], sampling_config(cfg),
                        eos_token_id=eos_id, engine=engine, policy_logprobs=want)
    from_generation = ro.policy_logprobs is not None  # a sampler that keeps none: recomputed below
    mask = ro.mask  # (B, T): generated tokens up to and including the first EOS
    # the lm head scores only the columns from the first response token on, here and in the loss (the prompt's
    # tokens carry no loss and no KL)
    first = rollout.first_response_column(mask)
    exp = model.experience(ro.sequences, ro.attention_mask, temperature=cfg.temperature, start=first,
                           policy_logprobs=ro.policy_logprobs, critic=critic)  # (B, T) each (log-probs 0 before
    #                                                                           `first`), (B,)
    raw = exp["scores"].float() if reward_fn is None else rollout.score(model, ro, reward_fn)  # (B,)
    if reward_fn is None and ensemble is not None:
        raw = ensemble(ro.sequences, ro.attention_mask)  # (B,) reduced over the K members
    raw = advantages.shape_scores(raw, ro.has_eos, missing_eos_penalty=cfg.missing_eos_penalty)
    distributed = D.world() > 1  # torchrun: score moments and whitening over the global batch
    scores = advantages.shape_scores(raw, ro.has_eos, moments=moments if cfg.normalize_scores else None,
                                     clip=cfg.score_clip, gather=D.all_gather_cat if distributed else None)
    lp, ref = exp["logprobs"].float(), exp["ref_logprobs"].float()
    b = {"seq": ro.sequences, "attn": ro.attention_mask, "mask": mask, "logprobs": lp, "ref_logprobs": ref,
         "first_response": first, "width": D.global_width(prompts["prompt_ids"].shape[1], ro.sequences.shape[1]),
         "rollout_stats": {"rollout/old_logprobs_from_generation": float(from_generation)},
         "engine_logprobs": ro.logprobs, "kl_coef": ctl.value, "scores": scores, "raw_scores": raw,
         "has_eos": ro.has_eos, "entropy": (-lp * mask).sum(1),
         "values": None, "adv": None, "returns": None, "kl": None}
    if critic:
        complete_experience(cfg, b, exp["values"].float())
    return b


def complete_experience(cfg: PPOConfig, b: dict, values: torch.Tensor) -> None:
    """The advantages of make_experience's batch b from the critic's old values (B, T), in place: GAE on
    r_t = -kl_coef * KL_t plus the score on the last response token, whitened over the (global) batch; the
    vLLM importance weights; b's "values", "adv", "returns" and "kl" (B,) set."""
    distributed = D.world() > 1
    lp, mask = b["logprobs"], b["mask"]
    a = advantages.ppo_advantages(lp, b["ref_logprobs"], values, b["scores"], mask, kl_coef=b["kl_coef"],
                                  gamma=cfg.gamma, lam=cfg.lam, estimator=cfg.kl_estimator,
                                  whiten=cfg.whiten_advantages, reduce=D.all_reduce if distributed else None)
    adv = a["advantages"]
    if b["engine_logprobs"] is not None:  # vLLM sampled: its log-probs against the trainer's (the ratio's old ones)
        w, is_stats = rollout.importance_correction(lp, b["engine_logprobs"], mask, mode=cfg.rollout_is_correction,
                                                    cap=cfg.rollout_is_cap)
        b["rollout_stats"].update(is_stats)
        adv = adv if w is None else adv * w
    b.update(values=values, adv=adv, returns=a["returns"], kl=a["kl"])


class MinibatchRows(NamedTuple):
    """Rows `idx` of the rollout batch as one process trains on them (minibatch_rows)."""

    seq: torch.Tensor    # (b, T)
    attn: torch.Tensor   # (b, T)
    mask: torch.Tensor   # (b, T) response tokens
    idx: torch.Tensor    # (b,) the rows of the rollout batch
    part: torch.Tensor | float  # this process's share of the minibatch's loss (D.agg_share; exactly 1 on one process)
    empty: bool          # FSDP2 with no rows here: one row weighted 0 (the others' forwards gather its shards)


def minibatch_rows(cfg: PPOConfig, b: dict, idx: torch.Tensor) -> MinibatchRows | None:
    """Rows `idx` of the rollout batch b, with this process's share of the minibatch's loss (one collective under
    torchrun: computed once per minibatch, for both loss terms). None when this process has no rows and runs no
    forward; under FSDP2 (lockstep) it runs them on one row weighted 0."""
    part = D.agg_share(b["mask"][idx], cfg.loss_agg, b.get("width"))
    if idx.numel():
        return MinibatchRows(b["seq"][idx], b["attn"][idx], b["mask"][idx], idx, part, False)
    if not D.lockstep():
        return None
    idx = torch.zeros(1, dtype=torch.long, device=idx.device)
    return MinibatchRows(b["seq"][idx], b["attn"][idx], b["mask"][idx], idx, 0.0, True)


def ppo_policy_loss(model, cfg: PPOConfig, b: dict, rows: MinibatchRows | None) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (minus entropy_coef x entropy) on `rows` of the rollout batch (minibatch_rows): this
    process's share of it, and its statistics. No rows here (None): 0 and no statistics."""
    if rows is None:
        return torch.zeros((), device=b["seq"].device), {}
    if b["adv"] is None:
        raise ValueError("the batch has no advantages yet (make_experience(critic=False)): run ppo_value_loss "
                         "first, its critic forward gives the old values")
    # only the columns from the first response token go through the lm head; seq-mean-token-sum-norm keeps the
    # whole width T, its normaliser
    c = 0 if cfg.loss_agg == "seq-mean-token-sum-norm" else b.get("first_response", 0)
    f = model.policy_forward(rows.seq, rows.attn)  # hidden (b, T, H) aligned with seq: hidden[:, t] scores token t
    pg, pst = fused_linear_ppo_loss(f.hidden[:, c:], f.weight, f.targets[:, c:], b["logprobs"][rows.idx][:, c:],
                                    b["adv"][rows.idx][:, c:], (rows.mask * f.mask)[:, c:], f.bias,
                                    entropy_coef=cfg.entropy_coef,
                                    clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                    temperature=cfg.temperature, agg=cfg.loss_agg)
    stats = {"policy/approxkl_avg": pst["approx_kl"], "policy/clipfrac_avg": pst["clipfrac"],
             "policy/entropy_avg": pst["entropy"], "loss/policy_avg": pg.detach(), "val/ratio": pst["ratio"]}
    return pg * rows.part, {} if rows.empty else stats


def ppo_value_loss(model, cfg: PPOConfig, b: dict, rows: MinibatchRows | None) -> tuple[torch.Tensor, dict]:
    """vf_coef x the clipped value loss on `rows` (this process's share), and its statistics.

    A batch from make_experience(critic=False) has no old values yet: `rows` must then be all of its rows, and
    this forward's values, detached, become them (complete_experience; the clip around them is then inactive, as
    in any first update of a step: the critic has not moved since the rollout)."""
    if rows is None:
        return torch.zeros((), device=b["seq"].device), {}
    values = model.values(rows.seq, rows.attn)  # (b, T)
    if b["values"] is None:
        if rows.empty or rows.idx.numel() != b["seq"].shape[0]:
            raise ValueError("the old values come from a critic forward over the whole rollout batch (one "
                             f"minibatch), got {rows.idx.numel()} of its {b['seq'].shape[0]} rows")
        old = torch.empty_like(values, dtype=torch.float32)
        old[rows.idx] = values.detach().float()
        complete_experience(cfg, b, old)
    vl, vst = value_loss(values, b["values"][rows.idx], b["returns"][rows.idx], rows.mask, clip=cfg.value_clip,
                         agg=cfg.loss_agg)
    stats = {"loss/value_avg": vl.detach(), "val/clipfrac_avg": vst["clipfrac"]}
    return cfg.vf_coef * vl * rows.part, {} if rows.empty else stats


def ppo_minibatch_loss(model, cfg: PPOConfig, b: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Policy + vf_coef * value loss on rows `idx` of the rollout batch (Schulman et al. 2017, eq. 9), as one
    graph: ppo_policy_loss + ppo_value_loss, their statistics merged.

    train_ppo runs the two terms' backwards one after the other instead (the policy's graph is freed before the
    critic's forward: the update holds one backbone's activations at a time, not two); the gradients are the same,
    since the two terms train disjoint parameters."""
    rows = minibatch_rows(cfg, b, idx)
    vl, vst = ppo_value_loss(model, cfg, b, rows)  # first: on a batch without old values it gives them
    pg, pst = ppo_policy_loss(model, cfg, b, rows)
    return pg + vl, pst | vst


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:
        loss.backward()


@quiet_unless_progress
def train_ppo(cfg: PPOConfig, *, model=None, tokenizer=None, prompts: list[dict] | None = None,
              ptx_examples: list[dict] | None = None, reward_fn=None, callback=None) -> dict:
    """Run PPO. Returns {"model", "metrics": last logged row, "out"}.

    model: a RoleModel whose reward adapter and head are trained (else cfg.model plus cfg.reward_model).
    prompts: token-id examples {"prompt_ids"} instead of reading cfg.data.
    ptx_examples: {"input_ids"} pretraining texts instead of reading cfg.ptx_data.
    reward_fn(sequences, attention_mask, response_mask) -> (B,) scores, replacing the reward head; the masks it
    gets are (B, T) 0/1 (response_mask: the generated tokens up to and including the first EOS).
    cfg.reward_model is loaded with the LoRA settings it was trained with (whatever cfg.lora says) and refused,
    as a ConfigError, when its reward adapter was never trained or it was trained on another base.
    callback(step, model) -> dict of extra metrics, called at every logged step.
    """
    cfg.validate()
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=prompts is None or bool(cfg.ptx_data))
    if prompts is None and cfg.reward_funcs:
        prompts = load_prompt_examples(cfg.data, tokenizer, cfg.max_length, cfg.response_length)
    elif prompts is None:
        prompts = encode_prompts(load_prompts(cfg.data), tokenizer, cfg.max_length, cfg.response_length, cfg.data)
    check_examples(prompts, ("prompt_ids",) + (("text", "columns") if cfg.reward_funcs else ()), "PPO prompts")
    too_long = [i for i, p in enumerate(prompts) if len(p["prompt_ids"]) + cfg.response_length > cfg.max_length]
    if too_long:
        raise DataError(f"prompt {too_long[0]} has {len(prompts[too_long[0]]['prompt_ids'])} tokens: with "
                        f"response_length={cfg.response_length} it exceeds max_length={cfg.max_length}")
    if ptx_examples is None and cfg.ptx_data:
        ptx_examples = encode_texts(load_texts(cfg.ptx_data), tokenizer, cfg.max_length)
    if cfg.ptx_coef > 0 and not ptx_examples:
        raise ConfigError("ptx_coef > 0 needs pretraining text (--ptx_data)")
    if model is None and not cfg.reward_model and reward_fn is None and not cfg.reward_funcs:
        raise ConfigError("--reward_model (the folder written by `rlhf-fast rm`, its out_dir/model) or "
                          "--reward_funcs is required")
    if cfg.reward_funcs and (cfg.reward_model or reward_fn is not None):
        raise ConfigError("give either --reward_funcs or a reward model / reward_fn, not both")
    funcs = None
    if cfg.reward_funcs:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights.strip() else None
        judge = judge_functions(cfg.reward_funcs, cfg.judge, cfg.constitution, cfg.judge_template,
                                cfg.judge_rating_words)
        funcs = load_reward_functions(cfg.reward_funcs, functions=judge, reward_weights=weights,
                                      reward_timeout=cfg.reward_timeout)
        funcs.check_columns({k for e in prompts for k in e["columns"]})
    device = D.init_from_env(cfg, ("batch_size", "ptx_batch_size") if cfg.ptx_coef > 0 else ("batch_size",))
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    D.seed_rank_streams(cfg.seed)  # torchrun: each process samples its own responses
    bind_judges(funcs, model, cfg.model, tokenizer)  # `judge`: the policy's base when --judge is --model
    if cfg.reward_model:
        load_reward(model, cfg.reward_model)
    ensemble = ensemble_reward(model, cfg.ensemble_reduce, cfg.ensemble_penalty) if not cfg.reward_funcs else None
    pad_id, eos_id = L.pad_id(tokenizer, model), L.eos_id(tokenizer, model)
    model.eval()  # no dropout in PPO: the rollout's and the update's log-probs must agree

    ctl, moments = kl_controller(cfg), kl_control.RunningMoments()
    ptx_sampler = L.BatchSampler(len(ptx_examples), cfg.ptx_batch_size, cfg.seed + 1, shard=(D.rank(), D.world())) \
        if cfg.ptx_coef > 0 else None
    updates = cfg.ppo_epochs * min(cfg.num_minibatches, cfg.batch_size, len(prompts))
    params = L.trainable_named_parameters(model, ["policy", "critic"])
    with L.Run(cfg, "ppo", params, len(prompts), updates_per_step=updates, callback=callback, model=model,
               stateful={"kl_controller": ctl, "score_moments": moments, "ptx_sampler": ptx_sampler}) as run, \
            L.rollout_engine(cfg, model, sampling_config(cfg)) as engine:
        for _ in run:
            model.eval()  # again each step: a callback may have switched modes
            examples = [prompts[i] for i in run.sampler.next()]
            batch = {k: v.to(device) for k, v in collate_prompts(examples, pad_id).items()}
            rfn = reward_fn if funcs is None else text_reward_fn(funcs, tokenizer, examples)
            # one minibatch: the first update's critic forward, over the whole batch at the rollout's weights, gives
            # the old values, and the experience step skips that forward
            b = make_experience(model, cfg, batch, eos_id, ctl, moments, rfn, ensemble, engine,
                                critic=cfg.num_minibatches > 1)
            beta = ctl.value
            B = b["seq"].shape[0]
            stats: dict[str, list] = {}
            for _ in range(cfg.ppo_epochs):
                # one permutation of the global batch (rank 0's under torchrun); this process's rows of each part
                for idx in D.minibatches(B, cfg.num_minibatches, device):
                    idx = idx.to(device)
                    # each term's backward before the next forward: one graph alive at a time (ppo_minibatch_loss);
                    # the critic's first, as its forward may complete the experience
                    rows = minibatch_rows(cfg, b, idx)
                    vl, vst = ppo_value_loss(model, cfg, b, rows)
                    _backward(vl)
                    pg, st = ppo_policy_loss(model, cfg, b, rows)
                    _backward(pg)
                    loss, st = pg.detach() + vl.detach(), st | vst
                    if ptx_sampler is not None:
                        tb = collate_texts([ptx_examples[i] for i in ptx_sampler.next()], pad_id)
                        ptx, _ = sft_loss(model, {k: v.to(device) for k, v in tb.items()})
                        _backward(cfg.ptx_coef * ptx)
                        loss = loss + cfg.ptx_coef * ptx.detach()
                        st["loss/ptx_avg"] = D.all_reduce(ptx.detach())  # the global mean (ptx is a share)
                    st["grad_norm"] = run.apply(loss)
                    for k, v in st.items():
                        stats.setdefault(k, []).append(float(v))
            kl_all = D.all_gather_cat(b["kl"])  # torchrun: the KL of the global batch
            ctl.update(float(kl_all.mean()), kl_all.numel())
            run.tokens += int(b["attn"].sum())
            if run.logging_now():
                non_score = -beta * b["kl"]
                metrics = {k: sum(v) / len(v) for k, v in stats.items()}
                metrics.update({
                    "objective/kl": b["kl"].mean(), "objective/entropy": b["entropy"].mean(),
                    "objective/non_score_reward": non_score.mean(), "objective/scores": b["raw_scores"].mean(),
                    "objective/rlhf_reward": (b["scores"] + non_score).mean(), "objective/kl_coef": beta,
                    "val/num_eos_tokens": b["has_eos"].sum(), "val/response_length": b["mask"].sum(1).mean(),
                    **b["rollout_stats"], **L.rollout_metrics(engine), **run.common_metrics(device)})
                if funcs is not None:
                    metrics.update({f"rewards/{k}/mean": float(v.nanmean()) for k, v in rfn.last.items()})
                if ensemble is not None:
                    metrics["rewards/ensemble_std"] = ensemble.pop_std()  # across members, mean over the samples
                run.log_row(metrics, ("objective/scores", "objective/kl", "loss/policy_avg"))
        run.finish()  # the final checkpoint; out_dir stays locked until the model is saved
        model.trained_roles |= {"policy", "critic"}
        out = os.path.join(cfg.out_dir, "model")
        D.save_model(model, out)
    return {"model": model, "metrics": run.row, "out": out}

"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for generative foundation
model alignment"), the rejection-sampling fine-tuning of Llama 2 (Touvron et al. 2023, section 3.2.3).

Each of `rounds` rounds:
    1. Best-of-N on the current policy adapter (rlhf_fast.rl.best_of_n): N samples per prompt in one batched
       generate (the prompt prefilled once, its KV cache shared by its N samples), scored by the reward model or
       the reward functions; the best (or the top k) of each prompt kept -> out_dir/round_{k}/picks.jsonl.
    2. SFT of the policy adapter on the picks (trainers/sft.py's train_sft: its loss, loop, checkpoints), the
       sampled tokens themselves as the targets -> out_dir/round_{k}/sft/ (its metrics and adapters).
The next round samples from the fine-tuned policy. Metrics per round in out_dir/metrics.jsonl: raft/best_score_mean
(mean over prompts of the kept score), raft/score_mean (mean over every sample), sft/loss. The final adapters in
out_dir/model, as the other trainers save them (the base is not merged: the reference stays the base).

Each round's SFT starts a fresh AdamW (RAFT fine-tunes stage by stage). --resume is not supported: rerun with
--overwrite.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass

from rlhf_fast.data.jsonl import check_examples, load_prompt_examples, write_jsonl_atomic
from rlhf_fast.models.io import load_reward
from rlhf_fast.rl import rewards as R
from rlhf_fast.rl.best_of_n import best_of_n
from rlhf_fast.rl.rollout import SamplingConfig
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import ConfigError, RolloutOptions, TrainConfig, option, quiet_unless_progress
from rlhf_fast.trainers.sft import SFTConfig, train_sft


@dataclass
class RAFTConfig(RolloutOptions, TrainConfig):
    """RAFT / rejection-sampling fine-tuning of the policy adapter on {"prompt", ...columns} JSONL: rounds of
    Best-of-N then SFT on the picks (batch_size, max_steps, epochs: of each round's SFT)."""

    rounds: int = option(2, "rounds of Best-of-N sampling then SFT on the picks")
    n: int = option(8, "samples per prompt N in each round's Best-of-N")
    keep: str = option("best", "picks per prompt: the best sample, or the top_k best", choices=("best", "top-k"))
    top_k: int = option(1, "picks per prompt with --keep top-k")
    prompts_per_round: int = option(0, "prompts sampled (without replacement) per round; 0: every prompt")
    max_completion_length: int = option(64, "new tokens generated per sample")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    top_k_sampling: int = option(0, "top-k sampling (0: off)")
    generation_batch_size: int = option(8, "prompts per generate call (x n sequences decode together)")
    reward_model: str = option("", "folder written by `rlhf-fast rm` (out_dir/model) that scores the samples")
    reward_funcs: str = option("", "instead of --reward_model: comma-separated reward functions (accuracy, "
                                   "format, code, pkg.module:function)")
    reward_weights: str = option("", "comma-separated weights, one per reward function (default 1 each)")

    def validate(self) -> None:
        super().validate()
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        checks = [
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.n >= 1, f"n (samples per prompt) must be >= 1, got {self.n}"),
            (self.keep in ("best", "top-k"), f"keep must be best or top-k, got {self.keep!r}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.prompts_per_round >= 0, f"prompts_per_round must be >= 0, got {self.prompts_per_round}"),
            (0 < self.max_completion_length < self.max_length,
             f"max_completion_length must lie in [1, max_length={self.max_length}), got {self.max_completion_length}"),
            (finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1 and self.top_k_sampling >= 0, "top_p must lie in (0, 1] and top_k_sampling be >= 0"),
            (self.generation_batch_size >= 1, "generation_batch_size must be >= 1"),
            (bool(self.reward_model) != bool(self.reward_funcs.strip()),
             "give exactly one of --reward_model DIR or --reward_funcs NAMES"),
            (not self.resume, "raft does not resume; rerun with --overwrite"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def sft_config(cfg: RAFTConfig, k: int) -> SFTConfig:
    """Round k's SFT: the run's own options (optimiser, LoRA, batch, steps), into out_dir/round_{k}/sft, no merge."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return SFTConfig(**shared | dict(out_dir=os.path.join(cfg.out_dir, f"round_{k}", "sft"), seed=cfg.seed + k,
                                     data="", model="", resume=False, merge=False))


@quiet_unless_progress
def train_raft(cfg: RAFTConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None,
               reward_funcs=None) -> dict:
    """Run RAFT. Returns {"model", "metrics": the last round's row, "out": saved model folder, "rounds": every
    round's row}.

    examples: {"prompt_ids", "text", "columns"} instead of reading cfg.data.
    reward_funcs: an rlhf_fast.rl.RewardFunctions (or a list of callables with TRL's signature) instead of
        cfg.reward_funcs / cfg.reward_model.
    """
    if reward_funcs is not None and not cfg.reward_funcs:
        cfg.reward_funcs = "(given)"
    cfg.validate()
    D.refuse("raft (its Best-of-N rounds are not split over processes yet)")
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=True)
    if examples is None:
        examples = load_prompt_examples(cfg.data, tokenizer, cfg.max_length, cfg.max_completion_length)
    check_examples(examples, ("prompt_ids", "text", "columns"), "RAFT prompts")
    if os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")) and not cfg.overwrite:
        raise ConfigError(f"out_dir {cfg.out_dir!r} holds another run; pass --overwrite to start afresh")
    device = L.resolve_device(cfg.device)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    if cfg.reward_model:
        load_reward(model, cfg.reward_model)
    elif reward_funcs is None:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights.strip() else None
        reward_funcs = R.load_reward_functions(cfg.reward_funcs, reward_weights=weights)
    elif not isinstance(reward_funcs, R.RewardFunctions):
        reward_funcs = R.RewardFunctions(list(reward_funcs))
    keys = sorted({k for e in examples for k in e["columns"]})
    if reward_funcs is not None:
        reward_funcs.check_columns(keys)
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k_sampling)
    log = L.MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))
    order = random.Random(cfg.seed)
    rounds = []
    with L.rollout_engine(cfg, model) as engine:  # --rollout vllm: one engine for every round
        for k in range(cfg.rounds):
            rounds.append(_round(cfg, k, model, tokenizer, examples, keys, reward_funcs, sampling, order, log, engine))
    log.close()
    model.trained_roles.add("policy")
    model.eval()
    out = os.path.join(cfg.out_dir, "model")
    model.save(out, save_base=False)
    return {"model": model, "metrics": rounds[-1], "out": out, "rounds": rounds}


def _round(cfg: RAFTConfig, k: int, model, tokenizer, examples, keys, reward_funcs, sampling, order, log,
           engine) -> dict:
    """One RAFT round: Best-of-N on the current policy, then SFT on the picks; returns its logged row."""
    # 1. Best-of-N on the current policy
    batch = examples
    if 0 < cfg.prompts_per_round < len(examples):
        batch = [examples[i] for i in sorted(order.sample(range(len(examples)), cfg.prompts_per_round))]
    samples = best_of_n(model, [e["text"] for e in batch], cfg.n, reward_funcs=reward_funcs, tokenizer=tokenizer,
                        sampling=sampling, keep="all", batch_size=cfg.generation_batch_size,
                        seed=cfg.seed * 1000 + k, progress=cfg.progress, return_ids=True,
                        columns={c: [e["columns"].get(c) for e in batch] for c in keys}, engine=engine)
    kept = 1 if cfg.keep == "best" else cfg.top_k
    picks = [r for r in samples if r["rank"] < kept]  # every sample comes back ranked, best first
    write_jsonl_atomic(os.path.join(cfg.out_dir, f"round_{k}", "picks.jsonl"),
                       [{c: v for c, v in r.items() if c not in ("prompt_ids", "completion_ids")} for r in picks])
    # 2. SFT of the policy adapter on the picks: the sampled tokens (up to and including EOS) are the targets
    data = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in picks
            if r["score"] is not None and r["completion_ids"]]
    if not data:
        raise ConfigError(f"round {k}: no sample could be scored; nothing to fine-tune on")
    sft = train_sft(sft_config(cfg, k), model=model, tokenizer=tokenizer, examples=data)
    return log.log(k + 1, {"round": k, **round_metrics(samples, picks), **L.rollout_metrics(engine),
                           "sft/loss": sft["metrics"].get("loss", float("nan")), "sft/examples": len(data)})


def round_metrics(samples: list[dict], picks: list[dict]) -> dict:
    """raft/best_score_mean: mean over prompts of the best sample's score; raft/score_mean: mean over every sample;
    raft/pick_score_mean: over the picks (= best with keep=best); unscorable samples left out. completions/
    mean_length: of the picks, in tokens."""
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    scored = lambda rows: [r["score"] for r in rows if r["score"] is not None]  # noqa: E731
    return {"raft/best_score_mean": mean(scored([r for r in samples if r["rank"] == 0])),
            "raft/score_mean": mean(scored(samples)), "raft/pick_score_mean": mean(scored(picks)),
            "completions/mean_length": mean([len(r["completion_ids"]) for r in picks])}

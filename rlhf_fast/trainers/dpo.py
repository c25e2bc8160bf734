"""Direct preference optimisation of the policy adapter, offline on preference pairs or online on its own samples.

    rlhf-fast dpo --model out/sft/model/base --data prefs.jsonl --out_dir out/dpo [--loss_type sigmoid]
    rlhf-fast dpo --model ... --data prompts.jsonl --online --reward_model out/rm/model
    rlhf-fast dpo --model ... --data prompts.jsonl --online --reward_funcs accuracy --ref_update_every 50

The policy is base + LoRA "policy", the reference pi_ref the same base with the adapters off (one model copy).
Data: {"prompt", "chosen", "rejected"} or {"prompt", "responses": [best, ..., worst]} JSONL, as `rlhf-fast rm`
reads it: a ranking gives all its C(K, 2) pairs, pairs of two identical responses are dropped (with a warning),
a "margin" field is ignored; batch_size counts pairs. Each step runs chosen and rejected of the batch in ONE
forward of the policy; the log-probs come from ops.fused_linear_logprobs (no (B, T, V) logits) and are summed
over the response tokens (sigmoid, hinge, robust) or averaged (ipo, simpo, orpo). With h = log pi/pi_ref:

    sigmoid  -log sig(beta (h_w - h_l)), cDPO label smoothing eps         Rafailov et al. 2023 (DPO)
    robust   the unbiased noisy-label loss, eps < 0.5                     Chowdhury et al. 2024 (rDPO)
    hinge    relu(1 - beta (h_w - h_l))                                   SLiC (Zhao et al. 2023)
    ipo      (h_w - h_l - 1 / (2 beta))^2, length-averaged log-probs      Azar et al. 2023 (IPO)
    simpo    -log sig(beta (avg logp_w - avg logp_l) - gamma), no ref     Meng et al. 2024 (SimPO; beta 2.0)
    orpo     NLL_w - beta log sig(log odds_w - log odds_l), no ref        Hong et al. 2024 (ORPO)

(the formulas live in rlhf_fast.ops.preference). simpo and orpo run no reference pass at all; the others run
it per batch (no_grad, adapters off) or once before training with --precompute_ref_logprobs, cached in
out_dir/ref_logprobs.pt under a key of the data and the base's fingerprint (a stale cache is recomputed; a
resumed run reuses it). Dropout is off throughout (as TRL's disable_dropout default).

--online (online DPO, Guo et al. 2024): --data holds prompts ({"prompt", ...columns}, as grpo); each step samples
two completions per prompt from the current policy, scores them with --reward_funcs (TRL's contract, as grpo) or
--reward_model (the reward adapter of `rlhf-fast rm`), makes the higher-scored one chosen, skips ties (logged as
online/tied_pairs; a step whose pairs all tie makes no update) and takes a DPO step on the pairs.
--ref_update_every N (iterative DPO, Xiong et al. 2024): every N steps the policy adapter is merged into the base
(the reference moves to the current policy) and restarts from zero, with its AdamW moments cleared; the final
model is then saved with its base. Not with a reward model: the reward adapter sits on the same base, and
merging would change it too. The sampling and the updates: dpo_online.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass

import torch

from rlhf_fast.data.collate import collate_sft
from rlhf_fast.data.jsonl import (
    DataError,
    check_examples,
    drop_tied_pairs,
    encode_rankings,
    fit_context,
    load_prompt_examples,
    load_rankings,
)
from rlhf_fast.models.conventions import IGNORE_INDEX, token_mask
from rlhf_fast.models.io import base_fingerprint, load_reward
from rlhf_fast.ops import dpo_loss, fused_linear_logprobs, orpo_loss, simpo_loss
from rlhf_fast.rl.rollout import first_response_column
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import dpo_online as O
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import ConfigError, RolloutOptions, TrainConfig, option, quiet_unless_progress

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
AVERAGED = ("ipo", "simpo", "orpo")  # length-averaged log-probs (TRL's convention for each)
SMOOTHED = {"sigmoid": 0.5, "simpo": 0.5, "robust": 0.5}  # loss types that take label_smoothing: its bound


@dataclass
class DPOConfig(RolloutOptions, TrainConfig):
    """DPO and its relatives on preference JSONL ({"prompt", "chosen", "rejected"} or rankings), or online."""

    batch_size: int = option(8, "preference pairs per step (a K-way ranking gives C(K, 2) pairs); --online: "
                                "prompts per step, two samples each")
    loss_type: str = option("sigmoid", "the preference loss (see the module docstring)", choices=LOSS_TYPES)
    beta: float | None = option(None, "temperature of the implicit reward; unset: 0.1 (simpo: 2.0)")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (cDPO / rDPO; sigmoid, simpo: "
                                         "[0, 0.5], robust: [0, 0.5))")
    gamma: float = option(0.5, "simpo: target reward margin (TRL's simpo_gamma)")
    precompute_ref_logprobs: bool = option(False, "compute the reference log-probs once before training, cached "
                                                  "in out_dir/ref_logprobs.pt (not for simpo, orpo, --online)")
    online: bool = option(False, "online DPO: --data holds prompts; pairs are sampled from the policy and "
                                 "labelled by --reward_funcs / --reward_model")
    max_completion_length: int = option(64, "--online: new tokens sampled per completion")
    temperature: float = option(1.0, "--online: sampling temperature")
    top_p: float = option(1.0, "--online: nucleus sampling")
    top_k: int = option(0, "--online: top-k sampling (0: off)")
    reward_funcs: str = option("", "--online: comma-separated reward functions (as grpo: accuracy, format, "
                                   "code, reward_model, pkg.module:function)")
    reward_weights: str = option("", "--online: comma-separated weights, one per reward function")
    reward_timeout: float = option(300.0, "--online: seconds one reward function may take on one batch")
    format_pattern: str = option("", "--online: regex of the `format` reward")
    reward_model: str = option("", "--online: folder written by `rlhf-fast rm` (out_dir/model); alone it "
                                   "means --reward_funcs reward_model")
    ref_update_every: int = option(0, "iterative DPO: every N steps merge the policy into the base, so the "
                                      "reference moves, and restart the adapter from zero (0: never)")
    shared_prefix: bool = option(True, "run a pair's prompt through the backbone once for its chosen and "
                                       "rejected rows (policy and reference passes): the same values up to float "
                                       "rounding for fewer backbone tokens (RoleModel.policy_forward)")

    micro_batch_size: int = option(0, "pairs per forward/backward inside a batch, the gradients accumulated: the "
                                      "same update (up to float rounding) with the activations of this many pairs "
                                      "alive at a time (0: the whole batch at once)")

    def resolved(self) -> dict:
        """The effective beta: the flag when set, else the loss type's default."""
        return {"beta": self.beta if self.beta is not None else (2.0 if self.loss_type == "simpo" else 0.1)}

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        beta, lt, eps = self.resolved()["beta"], self.loss_type, self.label_smoothing
        uses_rm = "reward_model" in [f.strip() for f in self.reward_funcs.split(",")]
        bound = SMOOTHED.get(lt, 0.0)
        checks = [
            (beta > 0, f"beta must be > 0, got {beta}"),
            (eps == 0 or lt in SMOOTHED, f"label_smoothing applies to sigmoid, simpo and robust, not {lt}"),
            (0 <= eps <= bound and not (lt == "robust" and eps >= 0.5),
             f"label_smoothing must lie in [0, 0.5{')' if lt == 'robust' else ']'} for {lt}, got {eps}"),
            (self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}"),
            (self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}"),
            (not (self.online and self.micro_batch_size),
             "--micro_batch_size splits the offline batches; --online's sampled pairs vary in number per step"),
            (not (self.precompute_ref_logprobs and lt in REFERENCE_FREE),
             f"--precompute_ref_logprobs is not needed: {lt} runs no reference pass"),
            (not (self.precompute_ref_logprobs and self.online),
             "--precompute_ref_logprobs does not apply to --online (its pairs are sampled during training)"),
            (not self.online or bool(self.reward_funcs.strip() or self.reward_model),
             "--online needs --reward_model DIR or --reward_funcs to label the sampled pairs"),
            (self.online or not (self.reward_funcs or self.reward_model),
             "--reward_funcs / --reward_model label sampled pairs: they need --online"),
            (not self.online or 0 < self.max_completion_length < self.max_length,
             f"max_completion_length must lie in [1, max_length={self.max_length}), got {self.max_completion_length}"),
            (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0,
             "temperature must be > 0, top_p in (0, 1], top_k >= 0"),
            (self.reward_timeout > 0, "reward_timeout must be > 0"),
            (self.rollout == "native" or self.online, "--rollout vllm samples the pairs of --online: it needs --online"),
            (self.rollout == "native" or not self.ref_update_every,
             "--rollout vllm does not combine with --ref_update_every yet: each reference update changes the base that "
             "vLLM loaded once"),
            (self.ref_update_every >= 0, f"ref_update_every must be >= 0, got {self.ref_update_every}"),
            (not self.ref_update_every or lt not in REFERENCE_FREE, f"--ref_update_every: {lt} has no reference"),
            (not (self.ref_update_every and self.precompute_ref_logprobs),
             "--ref_update_every moves the reference: it excludes --precompute_ref_logprobs"),
            (not uses_rm or bool(self.reward_model), "reward function reward_model needs --reward_model DIR"),
            (not (self.ref_update_every and (uses_rm or self.reward_model)),
             "--ref_update_every merges the policy into the base the reward adapter shares, which would change the "
             "reward model too: use --reward_funcs without reward_model"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


# ----------------------------------------------------------------------------------------- data
def preference_pairs(examples: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Rankings {"prompt_ids", "response_ids": [best, ..., worst]} -> pairs {"prompt_ids", "chosen_ids",
    "rejected_ids"} (every ordered pair of each ranking), without the ties (drop_tied_pairs, warned)."""
    examples = fit_context(examples, max_length, "DPO examples")
    kept, dropped, total = drop_tied_pairs(examples, "DPO examples")
    if dropped:
        warnings.warn(f"DPO examples: dropped {dropped} of {total} pairs whose two responses are identical",
                      stacklevel=3)
    return [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["response_ids"][i], "rejected_ids": e["response_ids"][j]}
            for e in kept for i, j in itertools.combinations(range(len(e["response_ids"])), 2)], dropped


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, loss_mask (2B, T): the B chosen rows, then the B rejected rows; loss_mask is 1
    on the response tokens only."""
    rows = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[k]} for k in ("chosen_ids", "rejected_ids")
            for p in pairs]
    return collate_sft(rows, pad_id)


# ----------------------------------------------------------------------------------------- the loss
def policy_logps(model, batch: dict, shared_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the policy's response log-probs (N,) and the number of response tokens (N,), from one
    forward over every row of the batch (chosen and rejected together). The lm head scores the columns from the
    first response token on (those before are prompt in every row). shared_prefix: rows with the same prompt
    (a pair's chosen and rejected) run those columns once (RoleModel.policy_forward)."""
    c = first_response_column(batch["loss_mask"])
    f = model.policy_forward(batch["input_ids"], batch["attention_mask"], shared_prefix=c if shared_prefix else 0,
                             prefix_outputs=False)  # hidden (N, T, H), aligned with ids; read from column c on
    targets = f.targets.masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX)[:, c:]  # (N, T - c): responses only
    lp = fused_linear_logprobs(f.hidden[:, c:], f.weight, targets, f.bias)  # (N, T - c), 0 where ignored
    return lp.sum(1), (targets != IGNORE_INDEX).sum(1)


@torch.no_grad()
def reference_logps(model, batch: dict, shared_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """policy_logps of the reference (the base, adapters off), without gradients."""
    c = first_response_column(batch["loss_mask"])
    lp = model.logprobs(batch["input_ids"], batch["attention_mask"], role="reference", start=c,
                        shared_prefix=c if shared_prefix else 0)  # (N, T)
    m = (batch["loss_mask"] != 0) & token_mask(batch["attention_mask"])  # (N, T)
    return (lp * m).sum(1), m.sum(1)


def dpo_batch_loss(model, cfg: DPOConfig, batch: dict, ref: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The preference loss of a collate_pairs batch (2B rows, chosen first) and TRL's metrics.

    ref: the reference's (sum, count) per row (2B,) each, e.g. precomputed; None: a reference pass here (none at
    all for simpo and orpo). Sums are divided by the token counts for ipo, simpo and orpo."""
    beta, lt = cfg.resolved()["beta"], cfg.loss_type
    s, n = policy_logps(model, batch, cfg.shared_prefix)
    logps = s / n.clamp(min=1) if lt in AVERAGED else s  # (2B,)
    chosen, rejected = logps.chunk(2)
    if lt == "simpo":
        loss, stats = simpo_loss(chosen, rejected, beta=beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
    elif lt == "orpo":  # the NLL term: mean token NLL of the chosen response, -avg log-prob
        # log odds need p < 1: an fp32 average log-prob that rounds to 0 (a certain response) would be refused
        c, r = chosen.clamp(max=-1e-6), rejected.clamp(max=-1e-6)
        loss, stats = orpo_loss(c, r, -chosen, beta=beta)
    else:
        rs, rn = reference_logps(model, batch, cfg.shared_prefix) if ref is None else ref
        ref_logps = rs / rn.clamp(min=1) if lt in AVERAGED else rs
        ref_c, ref_r = ref_logps.to(logps.dtype).chunk(2)
        loss, stats = dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta, loss_type=lt,
                               label_smoothing=cfg.label_smoothing)
    stats = dict(stats, **{"logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()})
    return loss, stats


def pair_parts(batch: dict, ref: tuple | None, size: int):
    """Split a collate_pairs batch (2B rows: the B chosen, then the B rejected) into parts of at most `size` pairs,
    each laid out the same way, with the columns no row of the part attends cut off the end; yields (part, its
    rows of ref or None, its share of the batch's pairs). size 0 or >= B: the batch itself, share 1."""
    n = batch["input_ids"].shape[0] // 2
    if not 0 < size < n:
        yield batch, ref, 1.0
        return
    for a in range(0, n, size):
        b = min(n, a + size)
        rows = torch.cat([torch.arange(a, b), torch.arange(n + a, n + b)]).to(batch["input_ids"].device)
        part = {k: v[rows] for k, v in batch.items()}
        width = int(part["attention_mask"].any(0).nonzero().max()) + 1  # right padding every row of it shares
        part = {k: v[:, :width] for k, v in part.items()}
        yield part, (None if ref is None else (ref[0][rows], ref[1][rows])), (b - a) / n


# ----------------------------------------------------------------------------------------- reference cache
def cached_reference(model, pairs: list[dict], path: str, pad_id: int, batch_size: int, device,
                     shared_prefix: bool = True) -> torch.Tensor:
    """The reference's (sum, count) of every pair's chosen and rejected response: (N, 2, 2) float64, [pair,
    chosen|rejected, sum|count]. Read from `path` when its key (sha256 of the pairs' token ids, the base's
    fingerprint and dtype) matches, else computed in batches and written there atomically."""
    h = hashlib.sha256(json.dumps([[p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]] for p in pairs]).encode())
    h.update(f"{base_fingerprint(model)} {model.lm_head.weight.dtype}".encode())
    key = h.hexdigest()
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu")
            if saved.get("key") == key:
                return saved["ref"]
        except Exception as e:  # noqa: BLE001 -- an unreadable cache is recomputed, whatever broke it
            warnings.warn(f"{path}: unreadable ({e}); recomputing the reference log-probs", stacklevel=2)
    out = torch.zeros(len(pairs), 2, 2, dtype=torch.float64)
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + batch_size], pad_id).items()}
        s, n = reference_logps(model, b, shared_prefix)
        out[i:i + batch_size] = torch.stack([s.double().cpu(), n.double().cpu()], -1).view(2, -1, 2).transpose(0, 1)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"key": key, "ref": out}, tmp)
    os.replace(tmp, path)
    return out


def batch_reference(cache: torch.Tensor, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) (2B,) of the batch's rows (chosen first) from the (N, 2, 2) cache."""
    rows = cache[idx].transpose(0, 1).reshape(-1, 2).to(device)  # (2B, 2)
    return rows[:, 0].float(), rows[:, 1]


# ----------------------------------------------------------------------------------------- the loop
@quiet_unless_progress
def train_dpo(cfg: DPOConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None, callback=None,
              reward_funcs=None) -> dict:
    """Run DPO (offline, or online with cfg.online). Returns {"model", "metrics": last logged row, "out"}.

    examples: token-id rankings {"prompt_ids", "response_ids": [best, ..., worst]} (a pair is K = 2) instead of
        reading cfg.data; with cfg.online, prompts {"prompt_ids", "text", "columns"} as grpo takes them.
    reward_funcs: --online: an rlhf_fast.rl.RewardFunctions or a list of callables (TRL's signature) instead
        of cfg.reward_funcs.
    callback(step, model) -> dict of extra metrics, called at every logged step.
    Every check (options, data, model folder) runs before anything is written to cfg.out_dir.
    """
    if reward_funcs is not None and not cfg.reward_funcs:
        cfg.reward_funcs = "(given)"
    cfg.validate()
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=examples is None or cfg.online)
    dropped = 0
    if cfg.online:
        if examples is None:
            examples = load_prompt_examples(cfg.data, tokenizer, cfg.max_length, cfg.max_completion_length)
        check_examples(examples, ("prompt_ids", "text", "columns"), "online DPO prompts")
        too_long = [i for i, e in enumerate(examples)
                    if len(e["prompt_ids"]) + cfg.max_completion_length > cfg.max_length]
        if too_long:
            raise DataError(f"prompt {too_long[0]}: with max_completion_length={cfg.max_completion_length} it "
                            f"exceeds max_length={cfg.max_length}")
    else:
        if examples is None:
            examples = encode_rankings(load_rankings(cfg.data), tokenizer, cfg.max_length, cfg.data)
        check_examples(examples, ("prompt_ids", "response_ids"), "DPO examples")
        examples, dropped = preference_pairs(examples, cfg.max_length)
    if cfg.online or cfg.ref_update_every:
        D.refuse("dpo --online / --ref_update_every")
    device = D.init_from_env(cfg)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    if cfg.reward_model:
        load_reward(model, cfg.reward_model)
    if cfg.online:
        reward_funcs = O.build_rewards(cfg, model, reward_funcs)
        reward_funcs.check_columns({k for e in examples for k in e["columns"]})
    pad_id, eos_id = L.pad_id(tokenizer, model), L.eos_id(tokenizer, model)
    model.eval()  # no dropout (TRL's disable_dropout): the policy and reference passes see the same network

    params = L.trainable_named_parameters(model, ["policy"])
    updates = O.ReferenceUpdates(model, params, cfg.out_dir) if cfg.ref_update_every else None
    with L.Run(cfg, "dpo", params, len(examples), callback=callback, model=model,
               stateful={"reference_updates": updates}) as run, \
            L.rollout_engine(cfg, model) as engine:  # --rollout vllm (validate: only with --online)
        cache = None
        if cfg.precompute_ref_logprobs:
            cache = cached_reference(model, examples, os.path.join(cfg.out_dir, "ref_logprobs.pt"), pad_id,
                                     cfg.batch_size, device, cfg.shared_prefix)
        for step in run:
            idx = run.sampler.next()
            extra = {}
            if cfg.online:
                batch, extra = O.sample_pairs(model, cfg, tokenizer, [examples[i] for i in idx], reward_funcs,
                                              eos_id, pad_id, device, engine)
            else:
                batch = {k: v.to(device) for k, v in collate_pairs([examples[i] for i in idx], pad_id).items()}
            stats = {}
            if batch is not None:  # None: every sampled pair was a tie, nothing to learn from this step
                ref = batch_reference(cache, idx, device) if cache is not None else None
                if ref is None and cfg.loss_type not in REFERENCE_FREE and \
                        0 < cfg.micro_batch_size < batch["input_ids"].shape[0] // 2:
                    # the reference's no-grad pass keeps no activations: one pass over the whole batch, before the
                    # policy's parts (fewer, larger matrix products; its peak passes before theirs begins)
                    ref = reference_logps(model, batch, cfg.shared_prefix)
                loss = torch.zeros((), device=device)
                for part, part_ref, share in pair_parts(batch, ref, cfg.micro_batch_size):
                    part_loss, part_stats = dpo_batch_loss(model, cfg, part, part_ref)
                    # torchrun: this process's share of the mean over the global pairs; a part's, of its batch's
                    part_loss = part_loss * (D.share(len(idx)) * share)
                    part_loss.backward()
                    loss = loss + part_loss.detach()
                    for k, v in part_stats.items():  # the batch's means, weighted by the parts' pairs
                        stats[k] = stats.get(k, 0.0) + v * share
                stats.update(grad_norm=run.apply(loss), loss=run.loss)
                run.tokens += int(batch["attention_mask"].sum())
            if updates is not None and step % cfg.ref_update_every == 0:
                updates.merge(step, run.opt)
            if run.logging_now():
                metrics = {k: float(v) for k, v in stats.items()} | extra | L.rollout_metrics(engine)
                if not cfg.online:
                    metrics["data/dropped_pairs"] = dropped
                run.log_row(metrics | run.common_metrics(device), ("loss", "rewards/accuracies", "rewards/margins"))
        run.finish()  # the final checkpoint; the out_dir stays locked until the model is saved
        model.trained_roles.add("policy")
        out = os.path.join(cfg.out_dir, "model")
        # after a reference update the base itself was trained: save it, the adapters alone would lose it
        D.save_model(model, out, save_base=bool(updates and updates.steps))
    return {"model": model, "metrics": run.row, "out": out}

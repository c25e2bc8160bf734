"""`rlhf-fast demo --out DIR`: the whole InstructGPT recipe on a synthetic language, in minutes on a CPU.

Stages (each through the product: rlhf_fast.trainers on one RoleModel; only the base pre-training is a
plain loop here, since pre-training is not part of the product):
  1. tokenizer + tiny Llama, pre-trained in-process on the language (rlhf_fast.demo.task)
  2. SFT on demonstrations (train_sft; the policy LoRA is merged so the base becomes the SFT reference)
  3. pairs of SFT samples labeled by the noisy Bradley-Terry labeler -> reward model (train_rm)
  4. Best-of-N from the SFT model, picked by the reward model (gold score and KL against N; demo/best_of_n.py)
  5. PPO against the reward model with the KL penalty (train_ppo), and again with the KL penalty off;
     DPO on the same pairs; GRPO on the counting task with a checker as the reward
  6. evaluation by the gold labeler on held-out prompts; report.json, report.md and plots

The gold preference is read only by task.Labeler (the labels) and task.gold_scores (evaluation:
the monitoring curves and the final table). Nothing the trainers see is computed from it except the labels.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from rlhf_fast.demo import ai_labeler, base, best_of_n, task
from rlhf_fast.demo.report import plots, write_markdown

RESPONSE_LENGTH = 16
COUNT_LENGTH = 3  # new tokens of a counting answer: the number word and <eos> (and room for a wrong longer one)


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of the demo. Defaults: the full demo (502-520 s wall on a 2-core CPU, docs/demo.md)."""

    out: str = "demo_out"
    seed: int = 0
    # base model (tiny Llama)
    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 256
    num_heads: int = 4
    # with the rating-rich text of task.pretraining_text, the bases' reward models reach 0.84-0.88 held-out accuracy;
    # 2500 steps of the earlier text left seed 1's at 0.56 (docs/demo.md). Shipped per seed: not paid by `make demo`
    # (about 400 s of CPU per seed to regenerate)
    pretrain_steps: int = 6000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # "auto": the shipped pre-trained base of this seed (rlhf_fast/demo/assets, see demo/base.py) when it was made
    # with exactly these settings, else pre-train; "never": always pre-train; or the path of such a file
    pretrained: str = "auto"
    save_pretrained: str = ""       # write the pre-trained base to this file (demo/base.py)
    pretrain_only: bool = False     # stop after pre-training (with save_pretrained: regenerate a shipped base)
    # SFT (its own, larger LoRA: it is merged into the base and not held afterwards)
    sft_examples: int = 4000
    sft_epochs: int = 3
    sft_lora_r: int = 8
    sft_lr: float = 3e-3
    # the three role adapters held during RLHF: rank 1 on every linear keeps params.total <= 1.05 x base
    lora_r: int = 1
    lora_alpha: float = 4.0
    # labeled pairs and the reward model
    # 12000 (was 8000; 2026-12-06, 3 seeds): reward models at 0.84-0.90 held-out, and PPO's win rate on seed 1 0.721
    # where 8000 gave 0.691 (the same seed 1 PPO at kl_coef 0.1, lr 5e-3, 200 steps, 8 epochs or 4 minibatches
    # stayed at 0.65-0.69: its reward model was the limit)
    pair_prompts: int = 12000
    val_pair_prompts: int = 600
    labeler_beta: float = 0.3
    # the hurried labeler (task.Labeler): each repeated mention of a prompt topic adds this to its utility, where
    # the gold takes 1 off: the reward model's flaw that PPO without the KL penalty can exploit
    labeler_mention_bonus: float = 0.0
    rm_epochs: int = 8
    rm_lr: float = 3e-3             # 5e-3 x 4 epochs: held-out accuracy 0.68; 1e-2 diverged (0.51)
    rm_batch: int = 64
    # PPO
    ppo_steps: int = 120
    # the no-KL run goes on longer: over-optimisation takes time to show. At 240 steps (2026-12-07, seeds 0-2) it
    # hacked the reward model clearly on seed 2 only: on seeds 0 and 1 the policy first collapses (proxy and gold
    # fall together) and only later climbs the reward model's score in degenerate text; at 480 steps its best-proxy
    # point lies there on both (held-out proxy 3.21 / 0.78 against the SFT model's -0.44 / -0.17, gold -10.0 / -11.1
    # against 2.32 / 2.33; docs/demo.md)
    no_kl_steps: int = 480
    # ... and takes larger steps: on these bases 240 steps at ppo_lr without the penalty did not hack the reward
    # model (seeds 0 and 1: gold 3.30 / 2.65 above SFT's 2.40 / 2.27 at 13 nats), nor 400 steps at 7e-3 (gold 2.41 /
    # 2.79, 9-16 nats: the policy settles); at 1e-2 the gold collapses on every seed (docs/demo.md).
    no_kl_lr: float = 1e-2
    # The control run: the KL penalty on at no_kl_lr, from the same state, for control_steps (the no-KL run's first
    # 240 steps are where its gold falls: the curves compare the two there; 480 would add about 170 s of CPU)
    control_steps: int = 240
    # PPO prompts (train split, after the labeled pairs' prompts): the PPO runs draw their batches from this pool
    # (64 x 360, the pool of 120 + 240 steps; the 480-step no-KL run goes round it a second time)
    ppo_prompts: int = 23040
    ppo_batch: int = 64
    ppo_lr: float = 3e-3
    ppo_epochs: int = 4
    ppo_minibatches: int = 2
    kl_coef: float = 0.2
    # the KL runs' controller: "adaptive" (Ziegler et al. 2019: the coefficient, from kl_coef, moves so the policy's
    # KL to SFT tracks kl_target nats; horizon in sequences, 640 = 10 steps of 64) or "fixed" (kl_coef throughout).
    # A fixed 0.2 left each seed at its own KL: 2026-12-07, seeds 0-2, win rates 0.83 / 0.66 / 0.48 at 2.4 / 1.5 /
    # 7.2 nats (seed 2 over-optimised its reward model). Adaptive, seeds 0-2 (docs/demo.md): target 2.5 nats 0.850 /
    # 0.695 / 0.777 at 3.0 / 2.5 / 2.7 nats (rlhf-fast demo, commit 9834349); target 3 on the same reward models
    # 0.807 / 0.719 / 0.730 at 4.1 / 3.8 / 3.5 nats. On the AMD EPYC machine's reward models (2026-12-07) target 3
    # gave 0.822 / 0.672 / 0.789 at 3.1 / 3.1 / 3.8 nats, and target 3.5 (one-off PPO runs from the same reward
    # models) 0.881 / 0.725 / 0.795 at 4.3 / 4.0 / 3.7 nats; with the merged LoRA forward's rounding (commit 4718dbe)
    # target 3.5 gave 0.855 / 0.695 / 0.773 at 4.1 / 3.6 / 4.2 nats (rlhf-fast demo) and target 4 (one-off PPO runs
    # from those reward models) 0.813 / 0.758 / 0.791 at 5.2 / 4.6 / 3.7 nats
    kl_controller: str = "adaptive"
    kl_target: float = 4.0
    kl_horizon: float = 640.0
    eval_every: int = 10
    monitor_prompts: int = 128
    # which checkpoint of each PPO run is evaluated and reported: "best_proxy" (the eval point after step 0 with the
    # highest proxy reward on the monitor prompts: what a practitioner who sees only the reward model keeps; it
    # reads no gold) or "last". A collapsed policy's proxy swings from point to point: on 2026-12-06 seed 1's no-KL
    # run ended at a low point, below SFT on the proxy as well as on gold, though above it at 7 of its last 12 points.
    ppo_keep: str = "best_proxy"
    # the no-KL run's checkpoint: "best_proxy_late", the highest proxy among the eval points of the run's last
    # quarter (steps >= 3/4 of no_kl_steps; it reads no gold either): where the unpenalised run ends up, picked as
    # ppo_keep picks. History: with "best_proxy" over the whole run, at the oneDNN GEMMs' rounding (commit f1ef26d)
    # seed 0's no-KL run kept step 30, its proxy peak before it collapsed (held-out gold 3.01 against SFT's 2.32),
    # and its proxy never came back above that peak while its gold fell to -10.7. On the curves of the earlier 3-seed
    # runs (commits 725f77a, 4156cae, f3e873f) the last-quarter rule keeps a point with proxy above SFT's and gold
    # below it on every seed, as it does for that seed 0; the last point alone would not (three seeds there end
    # below SFT's proxy). The 3-seed run at 4815817 is the first with it (docs/demo.md).
    no_kl_keep: str = "best_proxy_late"
    # DPO (sigmoid) on the reward model's own labeled pairs, from the same SFT model; one run per beta. On the bases
    # before the number words (docs/demo.md) beta 0.3 drifted to 9-10 nats at gold win rates 0.49-0.63 on seeds 0-2;
    # beta 0.6 gave 0.67 / 0.66 (seeds 0 / 1) at 1.8 / 3.5 nats and beta 1.0 0.69 / 0.71 at 0.7 / 1.0 nats
    dpo_betas: str = "1.0"
    dpo_epochs: int = 2
    # seeds 0-2, earlier bases: 1e-3 0.730 / 0.668 / 0.619, 2e-3 0.715 / 0.674 / 0.656; with the merged LoRA forward
    # (2026-12-07, AMD EPYC): 2e-3 0.764 / 0.594 / 0.662 (rlhf-fast demo), 1e-3 0.705 / 0.670 / 0.645 (one-off)
    dpo_lr: float = 1e-3
    dpo_batch: int = 64
    dpo_lora_r: int = 1
    # the counting task (RL with a verifiable reward): its own SFT on sloppy demonstrations from the SFT model (a
    # rank-16 LoRA merged into a copy), then GRPO with the checker task.count_accuracy as the only reward. Held-out
    # sampled accuracy on seeds 0-2: 0.51 / 0.62 / 0.57 after the SFT, 0.99 / 0.98 / 0.99 after 200 GRPO steps (on
    # bases that never saw the number words it plateaued near 0.5-0.66: docs/demo.md)
    count_sft_examples: int = 3000
    count_sft_epochs: int = 4
    count_sft_lora_r: int = 16
    grpo_steps: int = 200
    grpo_prompts: int = 16          # prompts per step
    grpo_generations: int = 8       # samples per prompt (the group)
    grpo_lr: float = 3e-3
    grpo_lora_r: int = 4
    count_eval_prompts: int = 256
    # Best-of-N from the SFT model against the reward model: bon_samples per held-out prompt give the gold score
    # and KL of every N in bon_ns exactly on their empirical distribution (demo/best_of_n.py)
    bon_samples: int = 32
    bon_ns: str = "1,2,4,8,16,32"
    # `--all` adds the longer stages (about 20 more minutes): an AI labeler (the pre-trained base, asked for the
    # user's rating) relabels the pairs -> a reward model on its labels -> PPO on it; and a reward-model ensemble
    # (ensemble_members adapters on the base, ensemble_rm_epochs each) -> PPO without KL on its conservative reward
    all_stages: bool = False
    ensemble_members: int = 4
    ensemble_rm_epochs: int = 4
    ensemble_reduce: str = "mean_minus_std"
    ensemble_penalty: float = 1.0
    # final evaluation
    eval_prompts: int = 256
    progress: bool = True
    # 1 thread: the matrices are tiny, and on a busy 2-core machine two OpenMP threads ran the pre-training
    # step 10x slower than one (2.04 vs 0.21 s/step, load average 5); on an idle one they tie.
    threads: int = 1
    # processes: with 2, the no-KL run (the longest stage) runs in a second process beside the KL run, the control,
    # DPO and GRPO. It reads only files and its own seeds, so the figures are the same with 1 (tests/test_demo.py);
    # the wall time is not (on 2 cores, seed 0: docs/demo.md)
    workers: int = 2

    @classmethod
    def tiny(cls, **kw) -> DemoConfig:
        """A miniature for tests: same stages, toy sizes (well under a minute)."""
        small = dict(hidden_size=128, num_layers=1, pretrain_steps=30, pretrain_batch=16,
                     sft_examples=64, sft_epochs=1, lora_r=1, pair_prompts=96, val_pair_prompts=48, rm_epochs=1,
                     rm_batch=16, ppo_steps=3, no_kl_steps=3, control_steps=3, ppo_prompts=96, ppo_batch=16, ppo_epochs=1, ppo_minibatches=1, eval_every=2,
                     monitor_prompts=16, eval_prompts=200, progress=False, pretrained="never",
                     count_sft_examples=32, count_sft_epochs=1, dpo_batch=16, dpo_epochs=1, grpo_steps=2, grpo_prompts=4, grpo_generations=4,
                     count_eval_prompts=200, bon_samples=8, bon_ns="1,2,8")
        small.update(kw)
        return cls(**small)


# ----------------------------------------------------------------------------------------- stage 1
def build_base(cfg: DemoConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_heads, max_position_embeddings=64,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(mcfg)


def pretrain(cfg: DemoConfig, model, tokenizer) -> float:
    """Next-token pre-training of the whole base on the language's text; returns the last loss."""
    from tqdm.auto import tqdm

    docs = task.pretraining_text(cfg.pretrain_steps * cfg.pretrain_batch, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.98))
    warm = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / cfg.pretrain_steps))
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not cfg.progress, dynamic_ncols=True)
    for s in bar:
        enc = tokenizer(docs[s * cfg.pretrain_batch:(s + 1) * cfg.pretrain_batch], padding=True,
                        return_tensors="pt", add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if s % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return float(loss.detach())


def pretrained_base(cfg: DemoConfig, tokenizer) -> tuple[object, float]:
    """The pre-trained base: the shipped file when cfg.pretrained allows and its fingerprint matches, else
    pre-trained here (and written to cfg.save_pretrained when set). Returns (model, last loss or None)."""
    lm = build_base(cfg, tokenizer)
    if cfg.pretrained != "never":
        path = base.shipped_path(cfg.seed) if cfg.pretrained == "auto" else cfg.pretrained
        why = base.load(path, lm, cfg)
        if why is None:
            print(f"demo: pre-trained base from {path} (pre-train it here with --pretrained never)", file=sys.stderr)
            return lm.eval(), base.read_metadata(path)["pretrain_loss"]
        if cfg.pretrained != "auto":
            print(f"rlhf-fast demo: --pretrained: {why}", file=sys.stderr)
            raise SystemExit(2)
        print(f"demo: pre-training the base ({why})", file=sys.stderr)
    loss = pretrain(cfg, lm, tokenizer)
    if cfg.save_pretrained:
        base.save(cfg.save_pretrained, lm, cfg, loss)
    return lm, loss


# ----------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, seed: int, batch: int = 128) -> dict:
    """One response per prompt from the policy (temperature 1), as text ending in <eos> when it finished,
    with the RM score and the per-sequence KL to the reference (k1 on the sample, summed over tokens)."""
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.data.jsonl import encode_prompt

    g = torch.Generator().manual_seed(seed)
    texts, scores, kls = [], [], []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch):
        enc = [{"prompt_ids": encode_prompt(tokenizer, p)} for p in prompts[i:i + batch]]
        b = collate_prompts(enc, pad)
        out = model.generate(b["prompt_ids"], b["prompt_mask"], max_new_tokens=RESPONSE_LENGTH, temperature=1.0,
                             eos_token_id=tokenizer.eos_token_id, generator=g)
        seq, attn, resp = out["sequences"], out["attention_mask"], out["response_mask"]  # (B, T)
        exp = model.experience(seq, attn)
        kls += ((exp["logprobs"] - exp["ref_logprobs"]) * resp).sum(1).tolist()
        scores += exp["scores"].tolist()
        for row, m in zip(seq, resp):
            texts.append(tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False))
    return {"responses": texts, "scores": scores, "kl": kls}


def evaluate(model, tokenizer, prompts: list[str], *, seed: int) -> dict:
    """Gold (evaluation only), proxy reward and KL of the policy's samples on `prompts`."""
    s = sample(model, tokenizer, prompts, seed=seed)
    gold = task.gold_scores(prompts, s["responses"])
    n = len(prompts)
    return {"gold": gold, "gold_score": sum(gold) / n, "proxy_reward": sum(s["scores"]) / n,
            "kl": sum(s["kl"]) / n, "responses": s["responses"]}


# ----------------------------------------------------------------------------------------- stages 2-4
def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def label_pairs(model, tokenizer, prompts: list[str], labeler: task.Labeler, seed: int) -> list[dict]:
    """Two SFT samples per prompt, compared by the noisy labeler; ties in gold are declined."""
    a = sample(model, tokenizer, prompts, seed=seed)["responses"]
    b = sample(model, tokenizer, prompts, seed=seed + 1)["responses"]
    rows = []
    for p, x, y in zip(prompts, a, b):
        # The preference format stores finished responses (the loader appends <eos>): a pair with an
        # unfinished sample is not shown to the labeler (PPO's missing_eos_penalty covers those).
        if task.EOS not in x.split() or task.EOS not in y.split() or not _strip_eos(x) or not _strip_eos(y):
            continue
        lab = labeler.label(p, x, y)
        if lab is not None:
            rows.append({"prompt": p, "chosen": _strip_eos(lab[0]), "rejected": _strip_eos(lab[1])})
    return rows


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x.strip()]


def _strip_eos(text: str) -> str:
    return text.split(task.EOS)[0].strip()


def _ppo_config(cfg: DemoConfig, work: str, name: str, kl_coef: float, steps: int, lr: float | None = None):
    from rlhf_fast.trainers import LoraSettings, OptimConfig, PPOConfig

    return PPOConfig(data=os.path.join(work, "data", "prompts.jsonl"), out_dir=os.path.join(work, name), overwrite=True,
                     seed=cfg.seed, max_length=40, batch_size=cfg.ppo_batch, max_steps=steps,
                     response_length=RESPONSE_LENGTH, ppo_epochs=cfg.ppo_epochs,
                     num_minibatches=cfg.ppo_minibatches, kl_coef=kl_coef, missing_eos_penalty=1.0,
                     # the controller steers a penalty: the no-KL run (kl_coef 0) has none to steer
                     kl_controller=cfg.kl_controller if kl_coef > 0 else "fixed", kl_target=cfg.kl_target,
                     kl_horizon=cfg.kl_horizon,
                     progress=cfg.progress, optim=OptimConfig(lr=cfg.ppo_lr if lr is None else lr),
                     lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))


def kl_label(cfg: DemoConfig) -> str:
    """How the KL runs' penalty is set, for tables and plot legends."""
    if cfg.kl_controller == "adaptive":
        return f"adaptive KL (target {cfg.kl_target:g} nats, from kl_coef {cfg.kl_coef:g})"
    return f"kl_coef={cfg.kl_coef:g}"


def run_ppo(cfg: DemoConfig, work: str, name: str, model, tokenizer, kl_coef: float, steps: int,
            monitor: list[str], evaluate_fn=None, lr: float | None = None, keep: str | None = None,
            **ppo_options) -> tuple[object, list[dict]]:
    """PPO from `model` (RM trained, fresh policy/critic) at learning rate `lr` (default cfg.ppo_lr); every eval_every
    steps the policy is evaluated on the monitor prompts for the curves: gold, proxy, KL and whatever else
    evaluate_fn(model, prompts, seed) returns as a number (default: evaluate). ppo_options: further PPOConfig fields
    (e.g. the ensemble's reduction).

    The model returned holds the checkpoint `keep` (default cfg.ppo_keep) names: "best_proxy", the eval point after
    step 0 with the highest proxy reward on the monitor prompts (its policy adapter restored; the curve point gets
    "kept": True); "best_proxy_late", the same among the eval points at steps >= steps - steps // 4 (the run's last
    quarter); or "last". The choice reads only the proxy, never the gold: the checkpoint a practitioner who sees
    only the reward model would keep. The caller evaluates it on the held-out prompts, which the choice never saw."""
    from rlhf_fast.trainers import train_ppo

    keep = cfg.ppo_keep if keep is None else keep
    _check_ppo_keep(keep)
    first = max(1, steps - steps // 4) if keep == "best_proxy_late" else 1  # the first step a kept point may have
    evaluate_fn = evaluate_fn or (lambda m, prompts, seed: evaluate(m, tokenizer, prompts, seed=seed))
    curve: list[dict] = []
    best: dict = {"proxy": -math.inf, "index": None, "state": None}

    def point(step, m) -> dict:
        e = evaluate_fn(m, monitor, cfg.seed + 7)
        curve.append({"step": step} | {k: v for k, v in e.items() if isinstance(v, float)})
        if step >= first and e["proxy_reward"] > best["proxy"]:
            best.update(proxy=e["proxy_reward"], index=len(curve) - 1,
                        state=[p.detach().clone() for p in m.role_parameters("policy")])
        return e

    def callback(step, m):
        if step % cfg.eval_every and step != steps:
            return {}
        e = point(step, m)
        return {f"eval/{k}": e[k] for k in ("gold_score", "proxy_reward", "kl")}

    point(0, model)
    pcfg = dataclasses.replace(_ppo_config(cfg, work, name, kl_coef, steps, lr), **ppo_options)
    model = train_ppo(pcfg, model=model, tokenizer=tokenizer, callback=callback)["model"]
    kept = len(curve) - 1 if keep == "last" or best["index"] is None else best["index"]
    if kept != len(curve) - 1:
        with torch.no_grad():
            for p, saved in zip(model.role_parameters("policy"), best["state"]):
                p.copy_(saved)
    curve[kept]["kept"] = True
    return model, curve


def from_rm(rm_dir: str, sft_base: str, tokenizer):
    """The reward-model stage's saved state (`rm_dir`'s adapters and heads on the SFT base `sft_base`), in eval
    mode: where the no-KL run and its control start."""
    from rlhf_fast.models import RoleModel

    model = RoleModel.load(rm_dir, base=sft_base)
    model.tokenizer = tokenizer
    return model.eval()


def no_kl_stage(cfg: DemoConfig, work: str, sft_base: str, rm_dir: str, monitor: list[str], heldout: list[str], *,
                child: bool = False) -> dict:
    """The no-KL run: PPO without the penalty at no_kl_lr for no_kl_steps, from the reward-model stage's saved state
    (`rm_dir`'s adapters on the SFT base `sft_base`), then its kept checkpoint evaluated on `heldout`.

    It reads only files and seeds of its own (train_ppo seeds itself, evaluation draws from its own generators), so
    it gives the same figures in this process or, `child` (cfg.workers > 1), in a spawned one beside the other
    stages. Returns {"curve", "eval", "wall_seconds", "cpu_seconds"}."""
    t, cpu = time.perf_counter(), time.process_time()
    if child:  # a fresh interpreter: the parent's thread setting; its progress bars would interleave with the parent's
        torch.set_num_threads(max(1, cfg.threads))
        cfg = dataclasses.replace(cfg, progress=False)
    tok = task.build_tokenizer()
    model, curve = run_ppo(cfg, work, "ppo_no_kl", from_rm(rm_dir, sft_base, tok), tok, 0.0, cfg.no_kl_steps, monitor,
                           lr=cfg.no_kl_lr, keep=cfg.no_kl_keep)
    e = evaluate(model, tok, heldout, seed=cfg.seed + 1000)
    return {"curve": curve, "eval": e, "wall_seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu}


def _no_kl_child(conn, *args) -> None:
    try:
        result = ("ok", no_kl_stage(*args, child=True))
    except BaseException:  # the parent re-raises it with this traceback
        result = ("error", traceback.format_exc())
    conn.send(result)
    conn.close()


def _start_no_kl_process(args: tuple):
    """no_kl_stage(*args) in a spawned daemon process (it ends with this one); returns what _join_no_kl_process takes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_no_kl_child, args=(send, *args), daemon=True, name="rlhf-fast-demo-no-kl")
    proc.start()
    send.close()  # this process's copy: recv() then sees EOF if the child dies without sending
    return proc, recv


def _join_no_kl_process(proc, recv) -> dict:
    try:
        status, value = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the no-KL run's process ended without a result (exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"the no-KL run failed in its process:\n{value}")
    return value


PPO_KEEP = ("best_proxy", "best_proxy_late", "last")


def _check_ppo_keep(keep: str, name: str = "ppo_keep") -> None:
    if keep not in PPO_KEEP:
        raise ValueError(f"{name} must be one of {', '.join(PPO_KEEP)}, got {keep!r}")


def kept_step(curve: list[dict]) -> int:
    """The step of the checkpoint run_ppo kept (the point marked "kept")."""
    return next(p["step"] for p in curve if p.get("kept"))


@torch.no_grad()
def count_accuracy(model, tokenizer, examples: list[dict], *, temperature: float, seed: int) -> float:
    """Share of `examples` ({"prompt", "answer"}) whose sampled (temperature > 0) or greedy (0) answer the checker
    task.count_accuracy accepts."""
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.data.jsonl import encode_prompt
    from rlhf_fast.rl.rewards import completion_texts

    g = torch.Generator().manual_seed(seed)
    right = 0.0
    for i in range(0, len(examples), 128):
        rows = examples[i:i + 128]
        b = collate_prompts([{"prompt_ids": encode_prompt(tokenizer, e["prompt"])} for e in rows],
                            tokenizer.pad_token_id)
        out = model.generate(b["prompt_ids"], b["prompt_mask"], max_new_tokens=COUNT_LENGTH, temperature=temperature,
                             eos_token_id=tokenizer.eos_token_id, generator=g)
        texts = completion_texts(tokenizer, out["sequences"], out["response_mask"])
        right += sum(task.count_accuracy([e["prompt"] for e in rows], texts, [e["answer"] for e in rows]))
    return right / len(examples)


def run_dpo(cfg: DemoConfig, work: str, sft_base: str, tokenizer, pref_path: str, rm_dir: str, heldout: list[str],
            sft_gold: list[float]) -> list[dict]:
    """DPO (sigmoid) from the SFT model on the pairs the reward model learned from, for each beta in cfg.dpo_betas;
    gold score, win rate against SFT and KL on the held-out prompts, as PPO is evaluated."""
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.models.io import load_reward
    from rlhf_fast.trainers import DPOConfig, OptimConfig, train_dpo

    out = []
    for beta in [float(b) for b in cfg.dpo_betas.split(",") if b.strip()]:
        lora = LoraSettings(r=cfg.dpo_lora_r, alpha=cfg.lora_alpha * cfg.dpo_lora_r / cfg.lora_r)
        # the adapter's random init from a seed of its own, not from whatever the stages before left in the global
        # generator: the stage then gives the same figures when the stages before it change, or when run alone
        torch.manual_seed(cfg.seed + 4000)
        model = RoleModel.from_pretrained(sft_base, lora=lora, tokenizer=tokenizer)
        load_reward(model, rm_dir)  # only for the proxy column: DPO itself never reads a reward model
        dcfg = DPOConfig(data=pref_path, out_dir=os.path.join(work, f"dpo_beta{beta:g}"), overwrite=True, seed=cfg.seed,
                         max_length=40, batch_size=cfg.dpo_batch, epochs=cfg.dpo_epochs, beta=beta, loss_type="sigmoid",
                         progress=cfg.progress, optim=OptimConfig(lr=cfg.dpo_lr), lora=lora)
        res = train_dpo(dcfg, model=model, tokenizer=tokenizer)
        e = evaluate(res["model"], tokenizer, heldout, seed=cfg.seed + 1000)
        out.append({"beta": beta, "gold_score": e["gold_score"], "gold_win_rate_vs_sft": task.win_rate(e["gold"], sft_gold),
                    "kl": e["kl"], "proxy_reward": e["proxy_reward"],
                    "train_accuracy": float(res["metrics"].get("rewards/accuracies", float("nan")))})
    return out


def run_grpo(cfg: DemoConfig, work: str, sft_base: str, tokenizer) -> dict:
    """The counting task: SFT on sloppy demonstrations from the SFT model (merged into its own copy of the base),
    then GRPO with the verifiable counting reward (a fresh policy adapter on that base); held-out accuracy before
    and after GRPO, of one sample at temperature 1 and of the greedy answer."""
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.trainers import GRPOConfig, OptimConfig, SFTConfig, train_grpo, train_sft
    from rlhf_fast.trainers.loop import read_metrics

    demos = write_jsonl(os.path.join(work, "data", "count_sft.jsonl"),
                        task.count_demonstrations(cfg.count_sft_examples, seed=cfg.seed + 2))
    r = cfg.count_sft_lora_r
    sft = train_sft(SFTConfig(model=sft_base, data=demos, out_dir=os.path.join(work, "count_sft"), overwrite=True,
                              seed=cfg.seed, max_length=16, batch_size=min(64, cfg.count_sft_examples),
                              epochs=cfg.count_sft_epochs, progress=cfg.progress, merge=True,
                              optim=OptimConfig(lr=cfg.sft_lr), lora=LoraSettings(r=r, alpha=2.0 * r)),
                    tokenizer=tokenizer)
    sft_base = os.path.join(sft["out"], "base")
    heldout = task.count_examples(cfg.count_eval_prompts, split="heldout", seed=cfg.seed + 500)
    data = write_jsonl(os.path.join(work, "data", "count_prompts.jsonl"),
                       task.count_examples(cfg.grpo_steps * cfg.grpo_prompts, split="train", seed=cfg.seed + 600))
    lora = LoraSettings(r=cfg.grpo_lora_r, alpha=2.0 * cfg.grpo_lora_r)
    model = RoleModel.from_pretrained(sft_base, lora=lora, tokenizer=tokenizer)
    model.eval()

    def accuracy(m) -> dict:
        return {"sampled": count_accuracy(m, tokenizer, heldout, temperature=1.0, seed=cfg.seed + 700),
                "greedy": count_accuracy(m, tokenizer, heldout, temperature=0.0, seed=cfg.seed + 700)}

    before = accuracy(model)
    gcfg = GRPOConfig(data=data, out_dir=os.path.join(work, "grpo"), overwrite=True, seed=cfg.seed, max_length=16,
                      batch_size=cfg.grpo_prompts, num_generations=cfg.grpo_generations, max_steps=cfg.grpo_steps,
                      max_completion_length=COUNT_LENGTH, loss_type="grpo", progress=cfg.progress,
                      optim=OptimConfig(lr=cfg.grpo_lr), lora=lora)
    res = train_grpo(gcfg, model=model, tokenizer=tokenizer, reward_funcs=[task.count_accuracy])
    after = accuracy(res["model"])
    rewards = [r["reward"] for r in read_metrics(os.path.join(gcfg.out_dir, "metrics.jsonl")) if "reward" in r]
    return {"accuracy_before": before["sampled"], "accuracy_after": after["sampled"],
            "greedy_accuracy_before": before["greedy"], "greedy_accuracy_after": after["greedy"],
            "heldout_prompts": len(heldout), "steps": cfg.grpo_steps, "train_reward": rewards,
            "demonstrator_accuracy": sum(task.COUNT_RIGHT) / len(task.COUNT_RIGHT)}


def run_ai_labeler(cfg: DemoConfig, work: str, sft_base: str, tokenizer, judge_lm, pairs: list[dict],
                   val_pairs: list[dict], monitor: list[str], heldout: list[str], sft_gold: list[float]) -> dict:
    """RLAIF: the pre-trained base relabels the human-labeled pairs (demo/ai_labeler.py); a reward model trained on
    its labels (same settings as the human one), then PPO with the KL penalty on it."""
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.trainers import OptimConfig, RMConfig, train_rm

    j = ai_labeler.judge(judge_lm, tokenizer)
    ai_pairs, agreement = ai_labeler.relabel(j, pairs)
    ai_val, val_agreement = ai_labeler.relabel(j, val_pairs)
    path = write_jsonl(os.path.join(work, "data", "prefs_ai.jsonl"), ai_pairs)
    val_path = write_jsonl(os.path.join(work, "data", "prefs_ai_val.jsonl"), ai_val)
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha)
    model = RoleModel.from_pretrained(sft_base, lora=lora, tokenizer=tokenizer)
    model.eval()
    rm = train_rm(RMConfig(data=path, val_data=val_path, out_dir=os.path.join(work, "rm_ai"), overwrite=True,
                           seed=cfg.seed, max_length=40, batch_size=cfg.rm_batch, epochs=cfg.rm_epochs,
                           progress=cfg.progress, optim=OptimConfig(lr=cfg.rm_lr), lora=lora),
                  model=model, tokenizer=tokenizer)
    gold_acc = rm_gold_accuracy(model, tokenizer, val_pairs)  # the human val pairs: only their responses are read
    model, curve = run_ppo(cfg, work, "ppo_ai", model, tokenizer, cfg.kl_coef, cfg.ppo_steps, monitor)
    e = evaluate(model, tokenizer, heldout, seed=cfg.seed + 1000)
    return {"labeler_agreement": agreement, "val_labeler_agreement": val_agreement,
            "rm_heldout_accuracy": float(rm["val"].get("accuracy", float("nan"))),
            "rm_heldout_gold_accuracy": gold_acc, "pairs": len(ai_pairs),
            "ppo": {"gold_score": e["gold_score"], "gold_win_rate_vs_sft": task.win_rate(e["gold"], sft_gold),
                    "kl": e["kl"], "proxy_reward": e["proxy_reward"], "kl_coef": cfg.kl_coef,
                    "kept_step": kept_step(curve)},
            "curve": curve}


def run_ensemble(cfg: DemoConfig, work: str, sft_base: str, tokenizer, pref_path: str, val_path: str,
                 monitor: list[str], heldout: list[str], sft_gold: list[float]) -> dict:
    """A reward-model ensemble (cfg.ensemble_members adapters + heads on the one base, each on a bootstrap resample
    of the human pairs) and PPO without the KL penalty on its conservative reward (cfg.ensemble_reduce), the same
    run as the single-RM no-KL one otherwise. Proxy = the members' mean score."""
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.trainers import OptimConfig, RMConfig, train_rm

    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha)
    model = RoleModel.from_pretrained(sft_base, lora=lora, tokenizer=tokenizer)
    model.eval()
    rm = train_rm(RMConfig(data=pref_path, val_data=val_path, out_dir=os.path.join(work, "rm_ensemble"),
                           overwrite=True, seed=cfg.seed, max_length=40, batch_size=cfg.rm_batch,
                           epochs=cfg.ensemble_rm_epochs, progress=cfg.progress, optim=OptimConfig(lr=cfg.rm_lr),
                           lora=lora, ensemble=cfg.ensemble_members),
                  model=model, tokenizer=tokenizer)

    def ens_eval(m, prompts, seed) -> dict:
        e = evaluate(m, tokenizer, prompts, seed=seed)
        s = ensemble_sample_scores(m, tokenizer, prompts, e["responses"])  # (K, n)
        return e | {"proxy_reward": float(s.mean()), "ensemble_std": float(s.std(0, unbiased=False).mean())}

    model, curve = run_ppo(cfg, work, "ppo_no_kl_ensemble", model, tokenizer, 0.0, cfg.no_kl_steps, monitor, ens_eval,
                           lr=cfg.no_kl_lr, keep=cfg.no_kl_keep, ensemble_reduce=cfg.ensemble_reduce,
                           ensemble_penalty=cfg.ensemble_penalty)
    e = ens_eval(model, heldout, cfg.seed + 1000)
    return {"members": cfg.ensemble_members, "reduce": cfg.ensemble_reduce, "penalty": cfg.ensemble_penalty,
            "rm_heldout_accuracy": float(rm["val"].get("ensemble_accuracy", float("nan"))),
            "rm_member_heldout_accuracy": [float(v.get("accuracy", float("nan"))) for v in rm["val"].get("members", [])],
            "ppo_no_kl": {"gold_score": e["gold_score"], "gold_win_rate_vs_sft": task.win_rate(e["gold"], sft_gold),
                          "kl": e["kl"], "proxy_reward": e["proxy_reward"], "ensemble_std": e["ensemble_std"],
                          "kl_coef": 0.0, "kept_step": kept_step(curve)},
            "curve": curve}


@torch.no_grad()
def ensemble_sample_scores(model, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """(K, n) every ensemble member's score of the sampled responses (text ending in <eos> when it finished)."""
    from rlhf_fast.data.collate import pad
    from rlhf_fast.data.jsonl import encode_prompt

    out = []
    for i in range(0, len(prompts), 128):
        seqs = [encode_prompt(tokenizer, p) + tokenizer(r, add_special_tokens=False)["input_ids"]
                for p, r in zip(prompts[i:i + 128], responses[i:i + 128])]
        ids, mask = pad(seqs, tokenizer.pad_token_id)
        out.append(model.ensemble_scores(ids, mask))
    return torch.cat(out, 1)


def count_params(model) -> dict:
    """base: unique base tensors (tied weights once); trainable: adapters and heads of the three roles;
    total: every parameter held for the four roles (the reference is the base itself)."""
    seen, base = set(), 0
    for t in model.base_state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            base += t.numel()
    trainable = sum(p.numel() for r in ("policy", "critic", "reward") for p in model.role_parameters(r))
    return {"base": base, "trainable": trainable, "total": base + trainable}


# ----------------------------------------------------------------------------------------- the run
def run(cfg: DemoConfig) -> dict:
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.trainers import OptimConfig, RMConfig, SFTConfig, train_rm, train_sft

    _check_ppo_keep(cfg.ppo_keep)  # before any stage runs
    _check_ppo_keep(cfg.no_kl_keep, "no_kl_keep")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    stages: dict[str, float] = {}
    out = cfg.out
    work = os.path.join(out, "work")

    stage_cpu: dict[str, float] = {}
    cpu_mark = [cpu_start]

    def lap(name: str, t: float) -> float:
        now, cpu = time.perf_counter(), time.process_time()
        stages[name] = now - t
        stage_cpu[name], cpu_mark[0] = cpu - cpu_mark[0], cpu  # CPU seconds: what a shared machine does not inflate
        return now

    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    tok = task.build_tokenizer()
    lm, pretrain_loss = pretrained_base(cfg, tok)  # before anything is written: a bad --pretrained exits 2
    t = lap("pretrain", t)
    if cfg.pretrain_only:
        return {"pretrain_loss": pretrain_loss, "stage_seconds": stages}
    os.makedirs(work, exist_ok=True)
    judge_lm = copy.deepcopy(lm) if cfg.all_stages else None  # the AI labeler: the base before SFT changes it

    # SFT on demonstrations, read from a real JSONL file through the product's loader.
    sft_path = write_jsonl(os.path.join(work, "data", "sft.jsonl"), task.sft_examples(cfg.sft_examples, seed=cfg.seed + 1))
    sft_cfg = SFTConfig(data=sft_path, out_dir=os.path.join(work, "sft"), overwrite=True, seed=cfg.seed, max_length=40,
                        batch_size=64 if cfg.sft_examples >= 64 else cfg.sft_examples, epochs=cfg.sft_epochs,
                        progress=cfg.progress, merge=True, optim=OptimConfig(lr=cfg.sft_lr),
                        lora=LoraSettings(r=cfg.sft_lora_r, alpha=2.0 * cfg.sft_lora_r))
    sft = train_sft(sft_cfg, model=lm, tokenizer=tok)
    sft_base = os.path.join(sft["out"], "base")
    t = lap("sft", t)

    # The RLHF model: the merged SFT base (= the reference) with rank-r policy, critic and reward adapters.
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha)
    model = RoleModel.from_pretrained(sft_base, lora=lora, tokenizer=tok)
    model.eval()
    heldout = task.make_prompts(cfg.eval_prompts, split="heldout", seed=cfg.seed + 100)
    monitor = task.make_prompts(cfg.monitor_prompts, split="heldout", seed=cfg.seed + 200)
    train_prompts = task.make_prompts(cfg.pair_prompts + cfg.val_pair_prompts + cfg.ppo_prompts,
                                      split="train", seed=cfg.seed + 300)

    # Labeled pairs of SFT samples (the labeler is the only reader of the gold here).
    labeler = task.Labeler(beta=cfg.labeler_beta, seed=cfg.seed, mention_bonus=cfg.labeler_mention_bonus)
    n_tr = cfg.pair_prompts
    pairs = label_pairs(model, tok, train_prompts[:n_tr], labeler, cfg.seed + 11)
    val_pairs = label_pairs(model, tok, train_prompts[n_tr:n_tr + cfg.val_pair_prompts], labeler, cfg.seed + 13)
    agreement = labeler.agreement
    pref_path = write_jsonl(os.path.join(work, "data", "prefs.jsonl"), pairs)
    val_path = write_jsonl(os.path.join(work, "data", "prefs_val.jsonl"), val_pairs)
    t = lap("label", t)

    rm_cfg = RMConfig(data=pref_path, val_data=val_path, out_dir=os.path.join(work, "rm"), overwrite=True,
                      seed=cfg.seed,
                      max_length=40, batch_size=cfg.rm_batch, epochs=cfg.rm_epochs, progress=cfg.progress,
                      optim=OptimConfig(lr=cfg.rm_lr), lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    rm = train_rm(rm_cfg, model=model, tokenizer=tok)
    gold_acc = rm_gold_accuracy(model, tok, val_pairs)
    t = lap("reward_model", t)

    # SFT baseline on the held-out prompts (the policy adapter is still zero: the policy is the SFT model).
    sft_eval = evaluate(model, tok, heldout, seed=cfg.seed + 1000)
    # Best-of-N from the SFT model, picked by the reward model: no training, only samples.
    bon_resp, bon_scores = best_of_n.sample_many(model, tok, heldout, cfg.bon_samples, max_new_tokens=RESPONSE_LENGTH,
                                                 seed=cfg.seed + 2000)
    bon = best_of_n.curve(heldout, bon_resp, bon_scores, _ints(cfg.bon_ns))
    t = lap("best_of_n", t)

    ppo_prompts = train_prompts[n_tr + cfg.val_pair_prompts:]
    write_jsonl(os.path.join(work, "data", "prompts.jsonl"), [{"prompt": p} for p in ppo_prompts])
    # The no-KL run and its control start from the very same state: the RM stage's saved adapters on the same base.
    no_kl_args = (cfg, work, sft_base, rm["out"], monitor, heldout)
    # with cfg.workers > 1 the no-KL run goes to a second process, beside the stages from here to the report
    no_kl_proc = _start_no_kl_process(no_kl_args) if cfg.workers > 1 else None
    model_control = from_rm(rm["out"], sft_base, tok)
    model, curve = run_ppo(cfg, work, "ppo", model, tok, cfg.kl_coef, cfg.ppo_steps, monitor)
    ppo_eval = evaluate(model, tok, heldout, seed=cfg.seed + 1000)
    t = lap("ppo", t)
    if no_kl_proc is None:
        no_kl = no_kl_stage(*no_kl_args)
        t = lap("ppo_no_kl", t)
    # The control: the no-KL run's learning rate with the KL penalty back on, for control_steps.
    model_control, curve_control = run_ppo(cfg, work, "ppo_kl_control", model_control, tok, cfg.kl_coef,
                                           cfg.control_steps, monitor, lr=cfg.no_kl_lr)
    control_eval = evaluate(model_control, tok, heldout, seed=cfg.seed + 1000)
    del model_control
    t = lap("ppo_kl_control", t)

    # DPO on the very pairs the reward model was trained on; its samples' proxy score comes from that same RM.
    dpo = run_dpo(cfg, work, sft_base, tok, pref_path, rm["out"], heldout, sft_eval["gold"])
    t = lap("dpo", t)

    # RL with a verifiable reward: GRPO on the counting task, from the same SFT base with a fresh policy adapter.
    grpo = run_grpo(cfg, work, sft_base, tok)
    t = lap("grpo", t)

    extra = {}
    if cfg.all_stages:
        extra["ai_labeler"] = run_ai_labeler(cfg, work, sft_base, tok, judge_lm, pairs, val_pairs, monitor, heldout,
                                             sft_eval["gold"])
        t = lap("ai_labeler", t)
        extra["ensemble"] = run_ensemble(cfg, work, sft_base, tok, pref_path, val_path, monitor, heldout,
                                         sft_eval["gold"])
        t = lap("ensemble", t)

    child_cpu = 0.0
    if no_kl_proc is not None:
        no_kl = _join_no_kl_process(*no_kl_proc)
        t = lap("wait_for_ppo_no_kl", t)  # the part of the no-KL run the stages above did not cover
        stages["ppo_no_kl"], stage_cpu["ppo_no_kl"] = no_kl["wall_seconds"], no_kl["cpu_seconds"]
        child_cpu = no_kl["cpu_seconds"]
    curve_no_kl, no_kl_eval = no_kl["curve"], no_kl["eval"]

    # Artefacts: DIR/model = the SFT base (the reference) in DIR/model/base, the adapters and heads.
    model.save(os.path.join(out, "model"), save_base=True)

    params = count_params(model)

    def ppo_block(e: dict, kl_coef: float, lr: float, steps: int, curve_: list[dict]) -> dict:
        return {"gold_score": e["gold_score"], "gold_win_rate_vs_sft": task.win_rate(e["gold"], sft_eval["gold"]),
                "kl": e["kl"], "proxy_reward": e["proxy_reward"], "kl_coef": kl_coef, "lr": lr, "steps": steps,
                "kept_step": kept_step(curve_), "kl_label": kl_label(cfg) if kl_coef > 0 else "no KL penalty"}

    report = {
        "sft": {"gold_score": sft_eval["gold_score"], "proxy_reward": sft_eval["proxy_reward"],
                "final_loss": float(sft["metrics"].get("loss", float("nan")))},
        "rm": {"heldout_accuracy": float(rm["val"].get("accuracy", float("nan"))), "labeler_agreement": agreement,
               "heldout_gold_accuracy": gold_acc, "train_pairs": len(pairs), "heldout_pairs": len(val_pairs),
               "reward_offset": rm["offset"], "labeler_beta": cfg.labeler_beta,
               "labeler_mention_bonus": cfg.labeler_mention_bonus},
        "ppo": ppo_block(ppo_eval, cfg.kl_coef, cfg.ppo_lr, cfg.ppo_steps, curve),
        "ppo_no_kl": ppo_block(no_kl_eval, 0.0, cfg.no_kl_lr, cfg.no_kl_steps, curve_no_kl),
        "ppo_kl_control": ppo_block(control_eval, cfg.kl_coef, cfg.no_kl_lr, cfg.control_steps, curve_control),
        "best_of_n": bon,
        "dpo": dpo[0] if dpo else None,
        "dpo_sweep": dpo,
        "grpo": grpo,
        **extra,
        "params": params,
        "pretrain_loss": pretrain_loss,
        "max_gold_score": sum(task.max_gold(p) for p in heldout) / len(heldout),
        "eval_prompts": len(heldout),
        "curves": {"ppo": curve, "ppo_no_kl": curve_no_kl, "ppo_kl_control": curve_control,
                   **({"ppo_no_kl_ensemble": extra["ensemble"]["curve"]} if extra else {})},
        "config": dataclasses.asdict(cfg),
        "stage_seconds": stages,
        "stage_cpu_seconds": stage_cpu,
    }
    t = time.perf_counter()
    curves = {kl_label(cfg): curve, f"no KL (lr {cfg.no_kl_lr:g})": curve_no_kl,
              f"{kl_label(cfg)}, lr {cfg.no_kl_lr:g} (control)": curve_control}
    if extra:
        curves[f"no KL, ensemble of {cfg.ensemble_members} ({cfg.ensemble_reduce})"] = extra["ensemble"]["curve"]
    report["plots"] = plots(out, curves,
                            points={f"DPO beta={d['beta']:g}": d for d in dpo}, best_of_n=bon)
    report["stage_seconds"]["report"] = time.perf_counter() - t
    report["wall_seconds"] = time.perf_counter() - t_start
    # CPU seconds (user + sys) of this process and of the no-KL run's when it had its own (each runs one thread): on
    # a shared machine, closer than wall time to what the demo takes alone
    report["cpu_seconds"] = time.process_time() - cpu_start + child_cpu
    examples = list(zip(heldout, sft_eval["responses"], ppo_eval["responses"], no_kl_eval["responses"]))[:8]
    write_markdown(out, report, examples)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


@torch.no_grad()
def rm_gold_accuracy(model, tokenizer, pairs: list[dict]) -> float:
    """How often the RM orders a held-out pair as the noiseless gold does (evaluation only)."""
    from rlhf_fast.data.collate import pad
    from rlhf_fast.data.jsonl import encode_prompt, encode_response

    ok = 0.0
    for i in range(0, len(pairs), 128):
        rows = pairs[i:i + 128]
        seqs = []
        for r in rows:
            p = encode_prompt(tokenizer, r["prompt"])
            seqs += [p + encode_response(tokenizer, r["chosen"]), p + encode_response(tokenizer, r["rejected"])]
        ids, mask = pad(seqs, tokenizer.pad_token_id)
        s = model.scores(ids, mask).view(-1, 2)
        g = torch.tensor([task.gold_scores([r["prompt"]] * 2, [r["chosen"] + " " + task.EOS,
                                                                r["rejected"] + " " + task.EOS]) for r in rows])
        ok += float(((s[:, 0] - s[:, 1]) * (g[:, 0] - g[:, 1]) > 0).sum())
    return ok / max(1, len(pairs))


# Figures of report.json summarised across seeds: (label, path into the report).
SUMMARY = [
    ("RM held-out accuracy (labels)", ("rm", "heldout_accuracy")),
    ("RM held-out accuracy (gold order)", ("rm", "heldout_gold_accuracy")),
    ("SFT gold score", ("sft", "gold_score")),
    ("PPO gold win rate vs SFT", ("ppo", "gold_win_rate_vs_sft")),
    ("PPO gold score", ("ppo", "gold_score")),
    ("PPO KL to SFT", ("ppo", "kl")),
    ("PPO kept checkpoint (step)", ("ppo", "kept_step")),
    ("no-KL PPO gold score", ("ppo_no_kl", "gold_score")),
    ("no-KL PPO proxy reward", ("ppo_no_kl", "proxy_reward")),
    ("no-KL PPO KL to SFT", ("ppo_no_kl", "kl")),
    ("no-KL PPO kept checkpoint (step)", ("ppo_no_kl", "kept_step")),
    ("control (KL penalty at the no-KL lr) gold score", ("ppo_kl_control", "gold_score")),
    ("control (KL penalty at the no-KL lr) proxy reward", ("ppo_kl_control", "proxy_reward")),
    ("control (KL penalty at the no-KL lr) KL to SFT", ("ppo_kl_control", "kl")),
    ("control (KL penalty at the no-KL lr) kept checkpoint (step)", ("ppo_kl_control", "kept_step")),
    ("DPO gold win rate vs SFT", ("dpo", "gold_win_rate_vs_sft")),
    ("DPO KL to SFT", ("dpo", "kl")),
    ("GRPO counting accuracy before", ("grpo", "accuracy_before")),
    ("GRPO counting accuracy after", ("grpo", "accuracy_after")),
    ("human labeler agreement with gold", ("rm", "labeler_agreement")),
    ("AI labeler agreement with gold", ("ai_labeler", "labeler_agreement")),
    ("RM on AI labels: held-out accuracy (gold order)", ("ai_labeler", "rm_heldout_gold_accuracy")),
    ("PPO on the AI-label RM: gold win rate vs SFT", ("ai_labeler", "ppo", "gold_win_rate_vs_sft")),
    ("PPO on the AI-label RM: KL to SFT", ("ai_labeler", "ppo", "kl")),
    ("RM ensemble: held-out accuracy of the mean", ("ensemble", "rm_heldout_accuracy")),
    ("no-KL PPO on the ensemble: gold score", ("ensemble", "ppo_no_kl", "gold_score")),
    ("no-KL PPO on the ensemble: proxy (members' mean)", ("ensemble", "ppo_no_kl", "proxy_reward")),
    ("no-KL PPO on the ensemble: KL to SFT", ("ensemble", "ppo_no_kl", "kl")),
    ("wall seconds", ("wall_seconds",)),
    ("CPU seconds", ("cpu_seconds",)),
]


def _figures(report: dict) -> dict[str, float]:
    """The summarised figures of one report (those it has), including every Best-of-N row."""
    out = {}
    for label, path in SUMMARY:
        v = report
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            out[label] = float(v)
    for r in report.get("best_of_n") or []:
        out[f"Best-of-{r['n']} gold score"] = r["gold_score"]
        out[f"Best-of-{r['n']} KL (measured)"] = r["kl"]
    return out


def summarize(reports: dict[int, dict], out: str) -> dict:
    """summary.json and summary.md in `out`: each figure per seed, with mean, min and max across seeds."""
    per_seed = {s: _figures(r) for s, r in reports.items()}
    labels = list(dict.fromkeys(k for f in per_seed.values() for k in f))
    seeds = sorted(per_seed)
    rows = {}
    for label in labels:
        vals = [per_seed[s][label] for s in seeds if label in per_seed[s]]
        rows[label] = {"per_seed": {str(s): per_seed[s].get(label) for s in seeds},
                       "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    lines = ["# rlhf-fast demo across seeds", "", f"Seeds {', '.join(map(str, seeds))}; each a full run "
             "(its report.md in seed<N>/).", "",
             "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min | max |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for label, r in rows.items():
        cells = [("" if r["per_seed"][str(s)] is None else f"{r['per_seed'][str(s)]:.3f}") for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['mean']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "figures": rows}, f, indent=2)
    return rows


def _run_seeds(argv: list[str], seeds: list[int], jobs: int, out: str) -> int:
    """Each seed in its own process (`rlhf-fast demo ... --seed N --out OUT/seedN`), `jobs` at a time."""
    import subprocess

    procs: list[tuple[int, subprocess.Popen]] = []
    failed = []
    pending = list(seeds)
    while pending or procs:
        while pending and len(procs) < jobs:
            s = pending.pop(0)
            cmd = [sys.executable, "-m", "rlhf_fast.demo.run", *argv, "--seed", str(s), "--out",
                   os.path.join(out, f"seed{s}")]
            print(f"demo: seed {s} -> {os.path.join(out, f'seed{s}')}", file=sys.stderr)
            procs.append((s, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        s, p = procs.pop(0)
        if p.wait() != 0:
            failed.append(s)
    if failed:
        print(f"demo: seeds {failed} failed (see their output above)", file=sys.stderr)
        return 1
    reports = {}
    for s in seeds:
        with open(os.path.join(out, f"seed{s}", "report.json")) as f:
            reports[s] = json.load(f)
    summarize(reports, out)
    print(f"wrote {os.path.join(out, 'summary.md')} and summary.json", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlhf-fast demo", description="The embedded end-to-end demo (no downloads): "
                                "pre-training, SFT, labeled pairs, reward model, Best-of-N, PPO with and without KL, "
                                "DPO, GRPO, report.")
    p.add_argument("--tiny", action="store_true", help="a miniature run (toy sizes, for tests)")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one full run per seed in OUT/seed<N> (each "
                   "its own process), then OUT/summary.md with each figure's mean, min and max")
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at a time (default 1)")
    p.add_argument("--all", dest="all_flag", action="store_true", help="add the longer stages (AI labeler -> reward "
                   "model -> PPO; reward-model ensemble -> PPO without KL): about 20 more minutes per seed")
    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name
        if f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                           help=f"(default {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            p.add_argument(flag, type=typ, default=None, help=f"(default {f.default})")
    args = p.parse_args(argv)
    for flag in ("ppo_keep", "no_kl_keep"):  # before any stage runs
        if getattr(args, flag) is not None and getattr(args, flag) not in PPO_KEEP:
            p.error(f"--{flag} must be one of {', '.join(PPO_KEEP)}, got {getattr(args, flag)!r}")
    if args.kl_controller is not None and args.kl_controller not in ("fixed", "adaptive"):
        p.error(f"--kl_controller must be fixed or adaptive, got {args.kl_controller!r}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    for flag in ("kl_target", "kl_horizon"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            p.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    try:  # the labeler's own checks, before any stage runs
        task.Labeler(**{k: v for k, v in (("beta", args.labeler_beta), ("mention_bonus", args.labeler_mention_bonus))
                        if v is not None})
    except ValueError as e:
        p.error(str(e))
    if args.seeds:
        try:
            seeds = _ints(args.seeds)
        except ValueError:
            p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        if args.seed is not None or args.jobs < 1 or not seeds or len(set(seeds)) != len(seeds):
            p.error("--seeds needs distinct integers, --jobs >= 1 and no --seed")
        rest = list(argv if argv is not None else sys.argv[1:])
        for flag in ("--seeds", "--jobs", "--out"):  # the per-seed runs get their own --seed and --out
            while flag in rest:
                i = rest.index(flag)
                del rest[i:i + 2]
            rest = [a for a in rest if not a.startswith(flag + "=")]
        return _run_seeds(rest, seeds, args.jobs, args.out or DemoConfig.out)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if getattr(args, f.name) is not None}
    if args.all_flag:
        kw["all_stages"] = True
    cfg = DemoConfig.tiny(**kw) if args.tiny else DemoConfig(**kw)
    report = run(cfg)
    if cfg.pretrain_only:
        print(json.dumps(report, indent=2))
        return 0
    print(json.dumps({k: report.get(k) for k in ("sft", "rm", "ppo", "ppo_no_kl", "ppo_kl_control", "dpo", "grpo", "best_of_n", "params",
                                                 "wall_seconds")}, indent=2))
    print(f"wrote {os.path.join(cfg.out, 'report.json')} and report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

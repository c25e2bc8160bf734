"""One GRPO step, rlhf_fast `train_grpo` against TRL 1.16's `GRPOTrainer`, side by side on the CPU.

    .venv/bin/python bench/peers/grpo_vs_trl.py --out bench/results [--reps 3] [--steps 4] [--warmup 1]
        -> bench/results/peers-grpo-cpu-<date>.{md,json}

Same tiny model (a random Llama built from LlamaConfig: hidden 256, 4 layers, vocab 2000, fixed seed; a
WordLevel tokenizer over 2000 words, no downloads), same data (64 prompts of 16 words), same settings: 8
prompts x 4 generations per step, 48 new tokens at temperature 1.0 (top_p 1, top_k 0), LoRA r 16 / alpha 32 /
dropout 0 on every linear of the blocks (PEFT on both sides), beta 0 (no reference pass), the GRPO loss
(seq-mean-token-mean, rewards scaled by the group's std), clip 0.2, AdamW at the same constant lr, grad-norm
clip 1.0, one optimizer step per rollout (num_iterations 1, one minibatch), fp32, no vLLM, and the same
reward function (the share of the completion's words in a fixed quarter of the vocabulary).

Variants: rlhf_fast (gradient checkpointing off), trl (off), trl_gc (on: TRL's default); rlhf_fast_mb8 and trl_mb8:
the same 32 samples per update in micro-batches of 8 with gradient accumulation (rlhf_fast micro_batch_size=8;
TRL per_device_train_batch_size=8, gradient_accumulation_steps=4, which keeps its generation batch at 32);
rlhf_fast_noshare: rlhf_fast with shared_prefix off (each sample's prompt through the backbone again).

Each (variant, repetition) is a fresh process with ONE torch thread; the variants alternate (order rotated per
repetition). In it: `--warmup` steps, then `--steps` timed steps in the same run (max_steps = warmup + steps).
A step is the interval between two consecutive end-of-step hooks (rlhf_fast: the `callback` train_grpo calls
at each logged step, log_every 1; TRL: `TrainerCallback.on_step_end`), so both include one step's logging.
Per step: wall time (perf_counter) and CPU time (process user + sys, time.process_time). The split into
phases comes from profiler-free timers wrapped around functions from outside, in the child only (no product
code is edited):

    generation    rlhf_fast: rl.rollout.sample           TRL: GRPOTrainer._generate_single_turn
    scoring       the rest of the rollout: decoding, the reward function, group advantages, bookkeeping
                  rlhf_fast: trainers.grpo.make_groups    TRL: _generate_and_score_completions
                  (minus generation; `rewards` alone: the reward function / TRL's _calculate_rewards)
    old_logprobs  rlhf_fast: RoleModel.logprobs (the no-grad pass for the rollout's log-probs); TRL skips it
                  when num_iterations == 1 (it reuses the loss forward's detached log-probs)
    loss_forward  rlhf_fast: trainers.grpo.grpo_minibatch_loss   TRL: GRPOTrainer.compute_loss
    backward      rlhf_fast: end of the loss forward -> Run.apply   TRL: accelerator.backward
    optimizer     rlhf_fast: Run.apply (clip, AdamW, finiteness check)   TRL: _clip_grad_norm + optimizer.step
    other         the step's remainder (data, loop, logging)

Memory: `peak RSS` = the process's ru_maxrss at the end of the last timed step (imports, model load and every
step included: what the machine must hold); `step-window peak` = VmHWM over the timed steps only (reset with
/proc/self/clear_refs after the warm-up), and `RSS at start` = the RSS when the timed steps begin. glibc's
allocator runs with its defaults (what a user gets) unless --mmap-threshold is given.

Training is checked, not assumed: per step the loss, reward and grad norm (finite), the completions' mean
length, and the LoRA parameters' norm and change over the timed steps (nonzero).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

VOCAB = 2000
HIDDEN = 256
LAYERS = 4
PROMPTS = 64
PROMPT_WORDS = 16
SETTINGS = dict(batch_prompts=8, num_generations=4, max_completion_length=48, temperature=1.0, top_p=1.0, top_k=0,
                beta=0.0, num_iterations=1, num_minibatches=1, lr=1e-4, max_grad_norm=1.0, lora_r=16,
                lora_alpha=32, lora_dropout=0.0, clip=0.2, loss="grpo (seq-mean-token-mean, group std scaling)",
                dtype="float32", seed=0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOOD = {f"w{i}" for i in range(0, (VOCAB - 3) // 4)}  # a quarter of the words
VARIANTS = ("rlhf_fast", "trl", "trl_gc", "rlhf_fast_mb8", "trl_mb8", "rlhf_fast_noshare")
MICRO = 8  # the _mb8 variants: 8 samples per forward/backward, gradients accumulated to the same one update
PHASES = ("generation", "scoring", "old_logprobs", "loss_forward", "backward", "optimizer", "other")
GiB, MiB = 1 << 30, 1 << 20


def good_share(prompts, completions, **_):
    """The verifiable reward on both sides: the share of the completion's words that are in GOOD."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in GOOD for w in words) / max(1, len(words)))
    return out


# --------------------------------------------------------------------------------------- model and data


def build_model(folder: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SETTINGS["seed"])
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)
    rng = random.Random(SETTINGS["seed"])
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for _ in range(PROMPTS):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(PROMPT_WORDS))})
                    + "\n")


# ------------------------------------------------------------------------------------------- timers


class Clock:
    """Per-step buckets of (wall, cpu) seconds per phase; boundary() closes a step."""

    def __init__(self):
        self.step = 1  # the step now running (1-based)
        self.phases: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
        # (wall, cpu) at the end of each step, and after the end-of-step hook's bookkeeping (the next step's start)
        self.ends: list[tuple[float, float]] = []
        self.starts: list[tuple[float, float]] = []
        self.mark: tuple[float, float] | None = None
        self.track_memory_step: int | None = None  # the step whose phase ends record (phase, VmHWM, VmRSS)
        self.memory_trace: list[tuple[str, int, int]] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, name: str, start: tuple[float, float], end: tuple[float, float] | None = None) -> None:
        end = end or self.now()
        b = self.phases[self.step][name]
        b[0] += end[0] - start[0]
        b[1] += end[1] - start[1]
        if self.step == self.track_memory_step:
            self.memory_trace.append((name, _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024))

    def wrap(self, name: str, fn, after=None):
        @functools.wraps(fn)
        def inner(*a, **k):
            t0 = self.now()
            try:
                return fn(*a, **k)
            finally:
                t1 = self.now()
                self.add(name, t0, t1)
                if after is not None:
                    after(t1)
        return inner

    def boundary(self) -> None:
        """The end of the running step; call started() once the hook's own bookkeeping is done."""
        self.ends.append((*self.now(), _minor_faults()))
        self.step += 1

    def started(self) -> None:
        self.starts.append((*self.now(), _minor_faults()))


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


SOURCES = ("rlhf_fast/trainers/grpo.py", "rlhf_fast/trainers/loop.py", "rlhf_fast/ops/fused_ppo.py",
           "rlhf_fast/ops/logprobs.py", "rlhf_fast/models/generation.py", "rlhf_fast/models/role_model.py",
           "rlhf_fast/rl/rollout.py", "rlhf_fast/rl/rewards.py")


def _source_hashes() -> dict[str, str]:
    """sha256 (first 12 hex) of the product files a step runs: other work changes the tree, and an
    untracked or modified file is not named by the git commit."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    for rel in SOURCES:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            out[rel] = None
    return out


def _lora_vector(named_params, policy_only: bool):
    import torch

    ps = [p.detach().reshape(-1) for n, p in named_params if "lora_" in n and (not policy_only or ".policy" in n)]
    return torch.cat(ps).clone()


# ------------------------------------------------------------------------------------------------ child


def child(variant: str, folder: str, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    rss_after_imports = _status_kib("VmRSS") * 1024
    sources = _source_hashes()
    clock = Clock()
    mem: dict = {"rss_after_imports": rss_after_imports}
    lora: dict = {}
    total = warmup + steps

    def at_boundary(named_params, policy_only):
        clock.boundary()
        done = len(clock.ends)
        named_params = list(named_params)
        vec = _lora_vector(named_params, policy_only)
        lora.setdefault("norms", []).append(float(vec.norm()))
        lora.setdefault("b_norms", []).append(float(_lora_vector(
            [(n, p) for n, p in named_params if "lora_B" in n], policy_only).norm()))
        if done == warmup:
            lora["after_warmup"] = vec
            mem["rss_at_timed_start"] = _status_kib("VmRSS") * 1024
            mem["hwm_reset"] = _reset_hwm()
            clock.track_memory_step = warmup + 1
        if done == total:
            mem["step_window_peak"] = _status_kib("VmHWM") * 1024
            mem["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            lora["delta_timed"] = float((vec - lora["after_warmup"]).norm())
            lora["n_params"] = int(vec.numel())
        clock.started()  # the bookkeeping above is no part of any step

    with tempfile.TemporaryDirectory() as out_dir:
        if variant.startswith("rlhf_fast"):
            rows, info = _run_rlhf_fast(folder, out_dir, total, clock, at_boundary,
                                        micro=MICRO if variant.endswith("_mb8") else 0,
                                        share=variant != "rlhf_fast_noshare")
        else:
            rows, info = _run_trl(folder, out_dir, total, clock, at_boundary, gc=variant == "trl_gc",
                                  micro=MICRO if variant.endswith("_mb8") else 0)
    per_step = []
    for s in range(warmup + 1, total + 1):
        (w0, c0, f0), (w1, c1, f1) = clock.starts[s - 2], clock.ends[s - 1]
        ph = {k: list(v) for k, v in clock.phases[s].items()}
        gen = ph.get("generation", [0.0, 0.0])
        rollout = ph.pop("rollout", [0.0, 0.0])
        ph["scoring"] = [rollout[0] - gen[0], rollout[1] - gen[1]]
        known = [sum(v[i] for k, v in ph.items() if k in PHASES) for i in (0, 1)]
        ph["other"] = [(w1 - w0) - known[0], (c1 - c0) - known[1]]
        per_step.append({"step": s, "wall_s": w1 - w0, "cpu_s": c1 - c0, "minor_faults": f1 - f0,
                         "phases_wall_s": {k: ph.get(k, [0.0, 0.0])[0] for k in PHASES},
                         "phases_cpu_s": {k: ph.get(k, [0.0, 0.0])[1] for k in PHASES},
                         "rewards_wall_s": ph.get("rewards", [0.0, 0.0])[0],
                         "old_logprobs_in_loss_cpu_s": ph.get("old_logprobs_in_loss", [0.0, 0.0])[1],
                         **rows.get(s, {})})
    mem["first_timed_step_trace"] = [{"after": n, "hwm": h, "rss": r} for n, h, r in clock.memory_trace]
    if clock.memory_trace:
        top = max(h for _, h, _ in clock.memory_trace)
        mem["first_timed_step_peak_reached_in"] = next(n for n, h, _ in clock.memory_trace if h == top)
    return {"variant": variant, "steps": per_step, "memory": mem, "lora_norms": lora["norms"],
            "lora_B_norms": lora["b_norms"], "sources": sources,
            "lora_delta_timed": lora["delta_timed"], "lora_params": lora["n_params"],
            "rows_warmup": [rows.get(s, {}) for s in range(1, warmup + 1)], **info}


def _run_rlhf_fast(folder, out_dir, total, clock, at_boundary, micro: int = 0, share: bool = True):
    import torch

    import rlhf_fast.rl.rollout as RO
    import rlhf_fast.trainers.grpo as G
    import rlhf_fast.trainers.loop as L
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.ops import _dispatch
    from rlhf_fast.trainers import OptimConfig

    S = SETTINGS
    RO.sample = clock.wrap("generation", RO.sample)
    G.make_groups = clock.wrap("rollout", G.make_groups)
    RoleModel.logprobs = clock.wrap("old_logprobs", RoleModel.logprobs)

    def loss_end(t):
        clock.mark = t

    G.grpo_minibatch_loss = clock.wrap("loss_forward", G.grpo_minibatch_loss, after=loss_end)
    if hasattr(G, "fused_linear_logprobs"):  # the on-policy old log-probs from the loss's own hidden states
        G.fused_linear_logprobs = clock.wrap("old_logprobs_in_loss", G.fused_linear_logprobs)
    apply = clock.wrap("optimizer", L.Run.apply)

    def run_apply(self, loss):
        if clock.mark is not None:
            clock.add("backward", clock.mark)
            clock.mark = None
        return apply(self, loss)

    L.Run.apply = run_apply
    reward = clock.wrap("rewards", good_share)
    reward.__name__ = "good_share"

    def callback(step, model):
        at_boundary(model.named_parameters(), True)
        return {}

    cfg = G.GRPOConfig(model=folder, data=os.path.join(folder, "prompts.jsonl"), out_dir=out_dir, seed=S["seed"],
                       device="cpu", dtype="float32", batch_size=S["batch_prompts"],
                       num_generations=S["num_generations"], max_completion_length=S["max_completion_length"],
                       temperature=S["temperature"], top_p=S["top_p"], top_k=S["top_k"], beta=S["beta"],
                       num_iterations=S["num_iterations"], num_minibatches=S["num_minibatches"], loss_type="grpo",
                       micro_batch_size=micro, shared_prefix=share,
                       clip_low=S["clip"], max_steps=total, log_every=1, checkpoint_every=0, checkpoint_minutes=0,
                       progress=False, gradient_checkpointing=False,
                       optim=OptimConfig(lr=S["lr"], max_grad_norm=S["max_grad_norm"]),
                       lora=LoraSettings(r=S["lora_r"], alpha=S["lora_alpha"], dropout=S["lora_dropout"],
                                         target_modules=list(TARGETS)))
    G.train_grpo(cfg, reward_funcs=[reward], callback=callback)
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[int(r["step"])] = {"loss": r.get("loss"), "reward": r.get("reward"), "grad_norm": r.get("grad_norm"),
                                    "mean_length": r.get("completions/mean_length"), "entropy": r.get("entropy")}
    cpu = torch.device("cpu")
    info = {"backends": {op: _dispatch.select(op, cpu, torch.float32)
                         for op in ("fused_linear_ppo_loss", "fused_linear_logprobs")},
            "attn_implementation": "sdpa (RoleModel auto on CPU)", "shared_prefix": share}
    return rows, info


def instrument_trl(trainer, clock, at_boundary) -> None:
    """Time a TRL trainer's backward and optimizer step (accelerator.backward, _clip_grad_norm + the optimizer
    callbacks) and mark its step boundaries; shared with dpo_vs_trl.py."""
    from transformers import TrainerCallback

    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = clock.wrap("optimizer", trainer._clip_grad_norm)

    class Hooks(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            clock.mark = clock.now()

        def on_optimizer_step(self, args, state, control, **kw):
            clock.add("optimizer", clock.mark)
            clock.mark = None

        def on_step_end(self, args, state, control, model=None, **kw):
            at_boundary(model.named_parameters(), False)

    trainer.add_callback(Hooks())


def _run_trl(folder, out_dir, total, clock, at_boundary, gc: bool, micro: int = 0):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    S = SETTINGS
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with open(os.path.join(folder, "prompts.jsonl")) as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    args = GRPOConfig(output_dir=out_dir, max_steps=total, learning_rate=S["lr"], lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=S["max_grad_norm"], report_to="none",
                      save_strategy="no", logging_steps=1, bf16=False, fp16=False, use_cpu=True, seed=S["seed"],
                      dataloader_num_workers=0, disable_tqdm=True,
                      per_device_train_batch_size=micro or S["batch_prompts"] * S["num_generations"],
                      gradient_accumulation_steps=S["batch_prompts"] * S["num_generations"] // micro if micro else 1,
                      num_generations=S["num_generations"],
                      max_completion_length=S["max_completion_length"], temperature=S["temperature"],
                      top_p=S["top_p"], top_k=S["top_k"], beta=S["beta"], num_iterations=S["num_iterations"],
                      epsilon=S["clip"], loss_type="grpo", scale_rewards="group", use_vllm=False,
                      gradient_checkpointing=gc)
    peft_config = LoraConfig(r=S["lora_r"], lora_alpha=S["lora_alpha"], lora_dropout=S["lora_dropout"],
                             target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM")
    reward = clock.wrap("rewards", good_share)
    reward.__name__ = "good_share"
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok,
                          peft_config=peft_config)
    trainer._generate_single_turn = clock.wrap("generation", trainer._generate_single_turn)
    trainer._generate_and_score_completions = clock.wrap("rollout", trainer._generate_and_score_completions)
    trainer.compute_loss = clock.wrap("loss_forward", trainer.compute_loss)
    instrument_trl(trainer, clock, at_boundary)
    trainer.train()
    rows = {}
    for h in trainer.state.log_history:
        if "loss" in h and "step" in h:
            rows[int(h["step"])] = {"loss": h.get("loss"), "reward": h.get("reward"), "grad_norm": h.get("grad_norm"),
                                    "mean_length": h.get("completions/mean_length"), "entropy": h.get("entropy")}
    info = {"attn_implementation": getattr(model.config, "_attn_implementation", None),
            "gradient_checkpointing": gc, "trl_loss_type": args.loss_type,
            "trainer_model_is_peft": type(trainer.model).__name__}
    return rows, info


# ----------------------------------------------------------------------------------------------- parent


def _run_child(variant, folder, warmup, steps, timeout, mmap_threshold=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, folder, str(warmup), str(steps)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = list(load0), list(os.getloadavg())
    return out


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _versions():
    import importlib.metadata as md

    from rlhf_fast.bench.measure import git_commit  # here: the parent process keeps torch out until it must

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out["git_commit"] = git_commit(root)  # short hash, "+dirty" with uncommitted changes
    out["git_dirty"] = out["git_commit"].endswith("+dirty")
    return out


def _cpu() -> str:
    from rlhf_fast.bench.measure import cpu_name

    return cpu_name()


def config_name(variant: str, mmap_threshold: int) -> str:
    return variant if not mmap_threshold else f"{variant}+mmap{mmap_threshold // 1024}k"


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == key]
        steps = [s for r in rs for s in r["steps"]]
        # the per-process median step first, then the median over processes (a process is one sample of the
        # allocator / cache state); the pooled steps are kept too
        proc_wall = [statistics.median(s["wall_s"] for s in r["steps"]) for r in rs]
        proc_cpu = [statistics.median(s["cpu_s"] for s in r["steps"]) for r in rs]
        out[key] = {
            "variant": rs[0]["variant"], "mmap_threshold": rs[0]["mmap_threshold"],
            "step_wall_s": _stats(proc_wall), "step_cpu_s": _stats(proc_cpu),
            "step_wall_s_all_steps": _stats([s["wall_s"] for s in steps]),
            "step_cpu_s_all_steps": _stats([s["cpu_s"] for s in steps]),
            "minor_faults_per_step": _stats([s["minor_faults"] for s in steps]),
            "phases_cpu_s": {k: _stats([s["phases_cpu_s"][k] for s in steps]) for k in PHASES},
            "phases_wall_s": {k: _stats([s["phases_wall_s"][k] for s in steps]) for k in PHASES},
            "rewards_wall_s": _stats([s["rewards_wall_s"] for s in steps]),
            "old_logprobs_in_loss_cpu_s": _stats([s["old_logprobs_in_loss_cpu_s"] for s in steps]),
            "peak_reached_in": sorted({r["memory"].get("first_timed_step_peak_reached_in") for r in rs} - {None}),
            "process_peak_rss": _stats([r["memory"]["process_peak"] for r in rs]),
            "step_window_peak_rss": _stats([r["memory"]["step_window_peak"] for r in rs]),
            "rss_at_timed_start": _stats([r["memory"]["rss_at_timed_start"] for r in rs]),
            "rss_after_imports": _stats([r["memory"]["rss_after_imports"] for r in rs]),
            "loss": _stats([s["loss"] for s in steps]), "reward": _stats([s["reward"] for s in steps]),
            "grad_norm": _stats([s["grad_norm"] for s in steps]),
            "mean_length": _stats([s["mean_length"] for s in steps]),
            "lora_delta_timed": _stats([r["lora_delta_timed"] for r in rs]),
            "all_finite": all(s[k] is not None and math.isfinite(s[k]) for s in steps
                              for k in ("loss", "reward", "grad_norm")),
            "process_wall_s": _stats([r["process_wall_s"] for r in rs]),
        }
        w = out[key]["step_window_peak_rss"]["median"] - out[key]["rss_at_timed_start"]["median"]
        out[key]["step_window_extra_rss_median"] = w
    for ours in out.values():
        if not ours["variant"].startswith("rlhf_fast"):
            continue
        for v in ("trl", "trl_gc", "trl_mb8"):
            t = out.get(config_name(v, ours["mmap_threshold"]))
            if t is None:
                continue
            ours.setdefault("ratios", {})[config_name(v, ours["mmap_threshold"])] = {
                "throughput_x_cpu": t["step_cpu_s"]["median"] / ours["step_cpu_s"]["median"],
                "throughput_x_wall": t["step_wall_s"]["median"] / ours["step_wall_s"]["median"],
                "peak_rss_fraction": ours["process_peak_rss"]["median"] / t["process_peak_rss"]["median"],
                "step_window_peak_fraction": ours["step_window_peak_rss"]["median"]
                / t["step_window_peak_rss"]["median"],
                "step_window_extra_fraction": ours["step_window_extra_rss_median"]
                / max(1, t["step_window_extra_rss_median"]),
            }
    return out


def _mm(s, scale=1.0, fmt="{:.2f}"):
    if s is None:
        return "n/a"
    return f"{fmt.format(s['median'] / scale)} ({fmt.format(s['min'] / scale)} - {fmt.format(s['max'] / scale)})"


def markdown(report: dict) -> str:
    m, s = report["meta"], report["summary"]
    malloc = ", ".join("glibc defaults" if t == 0 else f"MALLOC_MMAP_THRESHOLD_={t} (`+mmap{t // 1024}k`)"
                       for t in m["mmap_thresholds"])
    L = [f"# GRPO step: rlhf_fast `train_grpo` vs TRL {m['trl']} `GRPOTrainer` (CPU, {m['date']})", "",
         f"Model: random tiny Llama (hidden {HIDDEN}, {LAYERS} layers, intermediate {2 * HIDDEN}, 4 heads / 2 KV "
         f"heads, vocab {VOCAB}, fp32, LlamaForCausalLM default init, seed 0), WordLevel tokenizer over "
         f"{VOCAB} words; {PROMPTS} prompts of {PROMPT_WORDS} words. CPU: {m['cpu']} ({m['cpus']} cores, shared "
         f"with other work), **1 torch thread**, one fresh process per (configuration, repetition), configurations "
         f"alternating (order rotated each repetition), {m['reps']} processes per configuration, {m['warmup']} "
         f"warm-up step(s) excluded, then {m['steps']} timed steps in the same process. Allocator: {malloc}.", "",
         "Settings, both sides: " + ", ".join(f"{k} {v}" for k, v in m["settings"].items())
         + f"; LoRA on {', '.join(TARGETS)} (PEFT on both sides); reward: share of the completion's words in a fixed "
         "quarter of the vocabulary. rlhf_fast: gradient checkpointing off. TRL: `trl` off, `trl_gc` on (TRL's "
         "default); TRL `loss_type='grpo'`, `scale_rewards='group'`, constant lr. `_mb8`: the same update in "
         f"micro-batches of {MICRO} samples with gradient accumulation (rlhf_fast `micro_batch_size`, TRL "
         "`per_device_train_batch_size` + `gradient_accumulation_steps`).", "",
         "Step = the interval between two end-of-step hooks. Step time: the median over processes of each "
         "process's median step, (min - max) over processes. CPU = process user + sys. Peak RSS = ru_maxrss at "
         "the end of the last timed step (imports and model load included); window peak = VmHWM over the timed "
         "steps only (reset after the warm-up); start = RSS when the timed steps begin; window extra = window "
         "peak - start.", "",
         "| configuration | step CPU s | step wall s | steps/s (CPU) | minor faults / step (k) | peak RSS GiB | window peak GiB | start GiB "
         "| window extra MiB | peak reached in | completion length | reward | loss | grad norm | LoRA B norm at end "
         "| LoRA change (timed) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in s.items():
        b_end = _stats([x["lora_B_norms"][-1] for x in report["runs"] if x["config"] == key])
        L.append(f"| {key} | {_mm(r['step_cpu_s'])} | {_mm(r['step_wall_s'])} | {1 / r['step_cpu_s']['median']:.2f} "
                 f"| {_mm(r['minor_faults_per_step'], 1000, '{:.0f}')} | {_mm(r['process_peak_rss'], GiB, '{:.3f}')} | {_mm(r['step_window_peak_rss'], GiB, '{:.3f}')} "
                 f"| {_mm(r['rss_at_timed_start'], GiB, '{:.3f}')} | {r['step_window_extra_rss_median'] / MiB:.0f} "
                 f"| {', '.join(r['peak_reached_in'])} | {_mm(r['mean_length'], 1, '{:.1f}')} "
                 f"| {_mm(r['reward'], 1, '{:.3f}')} | {_mm(r['loss'], 1, '{:.2g}')} "
                 f"| {_mm(r['grad_norm'], 1, '{:.3g}')} | {_mm(b_end, 1, '{:.3g}')} "
                 f"| {_mm(r['lora_delta_timed'], 1, '{:.3g}')} |")
    rows = [(f"{name} vs {k}", q) for name, r in s.items() for k, q in r.get("ratios", {}).items()]
    if rows:
        L += ["", "Ratios, rlhf_fast against each TRL configuration with the same allocator (the issue's goal: "
              ">= 1.5x TRL's step throughput at <= 0.6x its peak memory):", "",
              "| rlhf_fast vs TRL | throughput x (CPU) | throughput x (wall) | peak RSS fraction | window peak fraction "
              "| window extra fraction | goal met (CPU x >= 1.5 and peak RSS <= 0.6) |", "|---|---:|---:|---:|---:|---:|---|"]
        for k, q in rows:
            met = q["throughput_x_cpu"] >= 1.5 and q["peak_rss_fraction"] <= 0.6
            L.append(f"| {k} | {q['throughput_x_cpu']:.2f}x | {q['throughput_x_wall']:.2f}x | "
                     f"{q['peak_rss_fraction']:.2f} | {q['step_window_peak_fraction']:.2f} | "
                     f"{q['step_window_extra_fraction']:.2f} | {'yes' if met else 'no'} |")
    L += ["", "Time split per step, CPU seconds, median (min - max) over all timed steps of all processes:", "",
          "| configuration | " + " | ".join(PHASES) + " | of loss_forward: on-policy old-logprob head | reward fn "
          "(wall) |", "|---|" + "---:|" * (len(PHASES) + 2)]
    for key, r in s.items():
        L.append(f"| {key} | " + " | ".join(_mm(r["phases_cpu_s"][k], 1, "{:.3f}") for k in PHASES)
                 + f" | {_mm(r['old_logprobs_in_loss_cpu_s'], 1, '{:.3f}')} | {_mm(r['rewards_wall_s'], 1, '{:.4f}')} |")
    L += ["", "Phases: generation = rlhf_fast `rl.rollout.sample` / TRL `_generate_single_turn`; scoring = the "
          "rest of the rollout (decode, reward, advantages, bookkeeping: `make_groups` / "
          "`_generate_and_score_completions` minus generation); old_logprobs = a separate no-grad "
          "`RoleModel.logprobs` pass (TRL skips it at num_iterations 1; rlhf_fast too when the tree has the "
          "on-policy shortcut: trees before the on-policy loss (`old_logprobs=None`) spent one extra lm-head pass "
          "inside loss_forward for it, shown in its own column, 0 when the loss takes them from its own pass); "
          "loss_forward = `grpo_minibatch_loss` / `compute_loss`; backward; optimizer = clip + AdamW (+ "
          "rlhf_fast's finiteness check and undo snapshot); other = the remainder (data, loop, logging).", "",
          "Per repetition (processes in the order run):", "",
          "| # | configuration | step CPU s (each timed step) | step wall s | peak RSS GiB | window peak GiB | "
          "start GiB | load avg (1 min) before / after |", "|---:|---|---|---|---:|---:|---:|---|"]
    for i, r in enumerate(report["runs"]):
        cpu = ", ".join(f"{x['cpu_s']:.3f}" for x in r["steps"])
        wall = ", ".join(f"{x['wall_s']:.3f}" for x in r["steps"])
        L.append(f"| {i} | {r['config']} | {cpu} | {wall} | {r['memory']['process_peak'] / GiB:.3f} | "
                 f"{r['memory']['step_window_peak'] / GiB:.3f} | {r['memory']['rss_at_timed_start'] / GiB:.3f} | "
                 f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f} |")
    hashes = {}
    for r in report["runs"]:
        for f, h in r.get("sources", {}).items():
            hashes.setdefault(f, set()).add(h)
    changed = [f for f, hs in hashes.items() if len(hs) > 1]
    L += ["", f"Machine load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}; "
          f"after: {', '.join(f'{x:.2f}' for x in m['loadavg_after'])}. Total run {m['total_s']:.0f} s.", "",
          "versions: " + ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "peft", "trl", "accelerate",
                                                            "datasets", "tokenizers", "python"))
          + f"; commit {m['git_commit']}" + (" (working tree with uncommitted changes)" if m.get("git_dirty") else "")
          + ". Product files as run (sha256, first 12): "
          + ", ".join(f"{f} {'/'.join(sorted(h for h in hs if h))}" for f, hs in hashes.items())
          + (f". **Changed during the run: {', '.join(changed)}**" if changed else " (unchanged during the run)")
          + ".", "", f"Command: `{m['command']}`", ""]
    if report.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per variant")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--mmap-thresholds", default="0",
                    help="comma-separated MALLOC_MMAP_THRESHOLD_ values for the children, each a configuration of "
                         "every variant (0: glibc's default, dynamic; 131072: freed blocks >= 128 KiB leave the "
                         "RSS, as rlhf_fast/bench/measure.py fixes it)")
    ap.add_argument("--notes", default="", help="a JSON file holding a list of note strings for the report")
    ap.add_argument("--render", metavar="JSON", help="no run: rewrite the .md (and the notes in the .json) of an "
                                                     "earlier run's JSON")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL_DIR", "WARMUP", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        v, folder, warmup, steps = a.child
        print(json.dumps(child(v, folder, int(warmup), int(steps))))
        return
    if a.render:
        with open(a.render) as f:
            report = json.load(f)
        if a.notes:
            with open(a.notes) as f:
                report["notes"] = json.load(f)
        with open(a.render, "w") as f:
            json.dump(report, f, indent=1)
        with open(a.render[: -len(".json")] + ".md", "w") as f:
            f.write(markdown(report))
        print(f"rewrote {a.render[: -len('.json')]}.md")
        return
    if a.warmup < 1 or a.steps < 1 or a.reps < 1:
        ap.error("--warmup, --steps and --reps must be >= 1")
    variants = tuple(x for x in a.variants.split(",") if x)
    bad = [x for x in variants if x not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    thresholds = [int(x) for x in a.mmap_thresholds.split(",") if x.strip()]
    configs = [(v, t) for t in thresholds for v in variants]
    load0, t0 = os.getloadavg(), time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder)
        for rep in range(a.reps):
            k = rep % len(configs)
            for v, thr in configs[k:] + configs[:k]:
                r = _run_child(v, folder, a.warmup, a.steps, a.timeout, thr)
                r.update(rep=rep, mmap_threshold=thr, config=config_name(v, thr))
                runs.append(r)
                print(f"rep {rep} {r['config']:18s} cpu/step {statistics.median(s['cpu_s'] for s in r['steps']):.3f} s  wall/step "
                      f"{statistics.median(s['wall_s'] for s in r['steps']):.3f} s  peak RSS "
                      f"{r['memory']['process_peak'] / GiB:.3f} GiB  window {r['memory']['step_window_peak'] / GiB:.3f} "
                      f"GiB  load {r['loadavg_before'][0]:.2f}", flush=True)
    meta = dict(_versions(), date=a.date, device="cpu", cpu=_cpu(), cpus=os.cpu_count(), threads=1, reps=a.reps,
                steps=a.steps, warmup=a.warmup, variants=list(variants), settings=SETTINGS, lora_targets=TARGETS,
                model=dict(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, intermediate=2 * HIDDEN, heads=4, kv_heads=2,
                           prompts=PROMPTS, prompt_words=PROMPT_WORDS),
                loadavg_before=list(load0), loadavg_after=list(os.getloadavg()), total_s=time.perf_counter() - t0,
                mmap_thresholds=thresholds,
                command=" ".join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    report = {"meta": meta, "summary": summarize(runs), "runs": runs,
              "notes": json.load(open(a.notes)) if a.notes else []}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"peers-grpo-cpu-{a.date}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()

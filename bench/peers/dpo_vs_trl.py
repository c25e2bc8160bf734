"""One DPO step, rlhf_fast `train_dpo` against TRL 1.16's `DPOTrainer`, side by side on the CPU.

    .venv/bin/python bench/peers/dpo_vs_trl.py --out bench/results [--vocab 2000] [--reps 3] [--steps 4] [--warmup 1]
        -> bench/results/peers-dpo-cpu-<date>-v<vocab>.{md,json}

Same tiny model (a random Llama built from LlamaConfig: hidden 256, 4 layers, intermediate 512, 4 heads / 2 KV
heads, vocab --vocab, fixed seed, fp32; a WordLevel tokenizer over the vocabulary's words, no downloads), same
data (64 preference pairs: 32-word prompts, 48-word chosen and rejected responses of random words from a fixed
seed, chosen != rejected; both sides append EOS to each response, so 49 response tokens), same settings: 16
pairs per step, the sigmoid loss, beta 0.1, LoRA r 16 / alpha 32 / dropout 0 on every linear of the blocks (PEFT
on both sides), AdamW at a constant lr 1e-4, grad-norm clip 1.0, dropout off, the reference = the same base with
the adapters off (rlhf_fast: role "reference"; TRL: ref_model None + peft_config, so it disables the adapter),
reference log-probs computed per step on both sides (no precompute), no truncation (every sequence is 81 tokens;
the token counts each side saw are recorded and compared).

Variants: rlhf_fast (gradient checkpointing off), trl (off), trl_gc (on: TRL's default); rlhf_fast_noshare: rlhf_fast
with shared_prefix off (each row's prompt through the backbone again; what the shared pass saves); rlhf_fast_mb8:
rlhf_fast with micro_batch_size 8 (the same 16-pair update in two forward/backward parts of 8 pairs: half the
activations alive at a time).

Each (variant, repetition) is a fresh process with ONE torch thread; the variants alternate (order rotated per
repetition). In it: `--warmup` steps, then `--steps` timed steps in the same run (max_steps = warmup + steps).
A step is the interval between two consecutive end-of-step hooks (rlhf_fast: the `callback` train_dpo calls at
each logged step, log_every 1; TRL: `TrainerCallback.on_step_end`), so both include one step's logging. Per
step: wall time (perf_counter) and CPU time (process user + sys). The split into phases comes from timers
wrapped around functions from outside, in the child only (no product code is edited):

    ref_forward     rlhf_fast: trainers.dpo.reference_logps   TRL: the body of trl.trainer.dpo_trainer.use_adapter
                    (the adapter-disabled reference forward inside _compute_loss)
    policy_forward  the loss call minus ref_forward: rlhf_fast trainers.dpo.dpo_batch_loss, TRL compute_loss
                    (the policy forward, log-probs, the loss and the logged statistics)
    backward        rlhf_fast: end of dpo_batch_loss -> Run.apply   TRL: accelerator.backward
    optimizer       rlhf_fast: Run.apply (clip, AdamW, finiteness check)   TRL: _clip_grad_norm + optimizer.step
    other           the step's remainder (data, collation, loop, logging)

Memory as bench/peers/grpo_vs_trl.py: peak RSS = ru_maxrss at the end of the last timed step; window peak =
VmHWM over the timed steps only (reset via /proc/self/clear_refs after the warm-up); start = the RSS when the
timed steps begin. The timers, memory probes and statistics are imported from grpo_vs_trl.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_spec = importlib.util.spec_from_file_location(
    "grpo_vs_trl", os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_vs_trl.py"))
P = importlib.util.module_from_spec(_spec)  # the GRPO peer bench: Clock, memory probes, _stats, versions
_spec.loader.exec_module(P)

HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS = 256, 4, 512, 4, 2
PAIRS, PROMPT_WORDS, RESPONSE_WORDS = 64, 32, 48
SETTINGS = dict(batch_pairs=16, loss="sigmoid", beta=0.1, lr=1e-4, lr_scheduler="constant", max_grad_norm=1.0,
                lora_r=16, lora_alpha=32, lora_dropout=0.0, precompute_ref_logprobs=False, dropout="off",
                dtype="float32", seed=0)
MAX_LENGTH = 256  # rlhf_fast's context (>= 81: nothing is cut); TRL runs with max_length=None (no truncation)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("rlhf_fast", "trl", "trl_gc", "rlhf_fast_noshare", "rlhf_fast_mb8")
PHASES = ("ref_forward", "policy_forward", "backward", "optimizer", "other")
SOURCES = ("rlhf_fast/trainers/dpo.py", "rlhf_fast/trainers/loop.py", "rlhf_fast/ops/logprobs.py",
           "rlhf_fast/ops/preference.py", "rlhf_fast/models/role_model.py", "rlhf_fast/data/collate.py",
           "rlhf_fast/data/jsonl.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB, MiB = P.GiB, P.MiB


# --------------------------------------------------------------------------------------- model and data


def build_model(folder: str, vocab: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SETTINGS["seed"])
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(vocab - 3)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)
    rng = random.Random(SETTINGS["seed"])

    def text(n):
        return " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n))

    with open(os.path.join(folder, "prefs.jsonl"), "w") as f:
        for _ in range(PAIRS):
            prompt, chosen, rejected = text(PROMPT_WORDS), text(RESPONSE_WORDS), text(RESPONSE_WORDS)
            assert chosen != rejected
            # the leading space: TRL tokenizes prompt + chosen as one string
            f.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")


def _source_hashes() -> dict[str, str | None]:
    out = {}
    for rel in SOURCES:
        try:
            with open(os.path.join(ROOT, rel), "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            out[rel] = None
    return out


# ------------------------------------------------------------------------------------------------ child


def child(variant: str, folder: str, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    mem: dict = {"rss_after_imports": P._status_kib("VmRSS") * 1024}
    sources = _source_hashes()
    clock = P.Clock()
    batches: dict[int, dict] = {}
    lora: dict = {}
    total = warmup + steps

    def at_boundary(named_params, policy_only):
        clock.boundary()
        done = len(clock.ends)
        vec = P._lora_vector(list(named_params), policy_only)
        lora.setdefault("norms", []).append(float(vec.norm()))
        if done == warmup:
            lora["after_warmup"] = vec
            mem["rss_at_timed_start"] = P._status_kib("VmRSS") * 1024
            mem["hwm_reset"] = P._reset_hwm()
            clock.track_memory_step = warmup + 1
        if done == total:
            mem["step_window_peak"] = P._status_kib("VmHWM") * 1024
            mem["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            lora["delta_timed"] = float((vec - lora["after_warmup"]).norm())
            lora["n_params"] = int(vec.numel())
        clock.started()  # the bookkeeping above is no part of any step

    def record_batch(input_ids, attention_mask, response_mask):
        batches.setdefault(clock.step, {"rows": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                                        "attended_tokens": int(attention_mask.sum()),
                                        "response_tokens": int(response_mask.sum())})

    with tempfile.TemporaryDirectory() as out_dir:
        if variant.startswith("rlhf_fast"):
            rows, info = _run_rlhf_fast(folder, out_dir, total, clock, at_boundary, record_batch, gc=False,
                                        share=variant != "rlhf_fast_noshare",
                                        micro=8 if variant == "rlhf_fast_mb8" else 0)
        else:
            rows, info = _run_trl(folder, out_dir, total, clock, at_boundary, record_batch, gc=variant == "trl_gc")
    per_step = []
    for s in range(warmup + 1, total + 1):
        (w0, c0, f0), (w1, c1, f1) = clock.starts[s - 2], clock.ends[s - 1]
        ph = {k: list(v) for k, v in clock.phases[s].items()}
        loss = ph.pop("loss", [0.0, 0.0])
        ref = ph.get("ref_forward", [0.0, 0.0])
        ph["policy_forward"] = [loss[0] - ref[0], loss[1] - ref[1]]
        known = [sum(v[i] for k, v in ph.items() if k in PHASES) for i in (0, 1)]
        ph["other"] = [(w1 - w0) - known[0], (c1 - c0) - known[1]]
        per_step.append({"step": s, "wall_s": w1 - w0, "cpu_s": c1 - c0, "minor_faults": f1 - f0,
                         "phases_wall_s": {k: ph.get(k, [0.0, 0.0])[0] for k in PHASES},
                         "phases_cpu_s": {k: ph.get(k, [0.0, 0.0])[1] for k in PHASES},
                         "batch": batches.get(s), **rows.get(s, {})})
    mem["first_timed_step_trace"] = [{"after": n, "hwm": h, "rss": r} for n, h, r in clock.memory_trace]
    if clock.memory_trace:
        top = max(h for _, h, _ in clock.memory_trace)
        mem["first_timed_step_peak_reached_in"] = next(n for n, h, _ in clock.memory_trace if h == top)
    return {"variant": variant, "steps": per_step, "memory": mem, "lora_norms": lora["norms"], "sources": sources,
            "lora_delta_timed": lora["delta_timed"], "lora_params": lora["n_params"],
            "rows_warmup": [rows.get(s, {}) for s in range(1, warmup + 1)], **info}


def _run_rlhf_fast(folder, out_dir, total, clock, at_boundary, record_batch, gc: bool, share: bool = True,
                   micro: int = 0):
    import torch

    import rlhf_fast.trainers.dpo as D
    import rlhf_fast.trainers.loop as L
    from rlhf_fast.models import LoraSettings
    from rlhf_fast.ops import _dispatch
    from rlhf_fast.trainers import OptimConfig

    S = SETTINGS
    collate = D.collate_pairs

    def collate_pairs(pairs, pad_id):
        b = collate(pairs, pad_id)
        record_batch(b["input_ids"], b["attention_mask"], b["loss_mask"])
        return b

    D.collate_pairs = collate_pairs
    D.reference_logps = clock.wrap("ref_forward", D.reference_logps)

    def loss_end(t):
        clock.mark = t

    D.dpo_batch_loss = clock.wrap("loss", D.dpo_batch_loss, after=loss_end)
    apply = clock.wrap("optimizer", L.Run.apply)

    def run_apply(self, loss):
        if clock.mark is not None:
            clock.add("backward", clock.mark)
            clock.mark = None
        return apply(self, loss)

    L.Run.apply = run_apply

    def callback(step, model):
        at_boundary(model.named_parameters(), True)
        return {}

    cfg = D.DPOConfig(model=folder, data=os.path.join(folder, "prefs.jsonl"), out_dir=out_dir, seed=S["seed"],
                      device="cpu", dtype="float32", batch_size=S["batch_pairs"], loss_type=S["loss"],
                      beta=S["beta"], precompute_ref_logprobs=False, max_length=MAX_LENGTH, max_steps=total,
                      log_every=1, checkpoint_every=0, checkpoint_minutes=0, progress=False,
                      gradient_checkpointing=gc, shared_prefix=share, micro_batch_size=micro,
                      optim=OptimConfig(lr=S["lr"], max_grad_norm=S["max_grad_norm"], lr_scheduler="constant"),
                      lora=LoraSettings(r=S["lora_r"], alpha=S["lora_alpha"], dropout=S["lora_dropout"],
                                        target_modules=list(TARGETS)))
    D.train_dpo(cfg, callback=callback)
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[int(r["step"])] = {k: r.get(src) for k, src in _ROW_KEYS.items()}
    info = {"backends": {"fused_linear_logprobs": _dispatch.select("fused_linear_logprobs", torch.device("cpu"),
                                                                  torch.float32)},
            "attn_implementation": "sdpa (RoleModel auto on CPU)", "gradient_checkpointing": gc, "shared_prefix": share,
            "micro_batch_size": micro,
            "optimizer": "torch.optim.AdamW (rlhf_fast.trainers.loop.build_optimizer, torch's default impl)"}
    return rows, info


_ROW_KEYS = {"loss": "loss", "grad_norm": "grad_norm", "accuracy": "rewards/accuracies",
             "margin": "rewards/margins", "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}


def _run_trl(folder, out_dir, total, clock, at_boundary, record_batch, gc: bool):
    import torch
    import trl.trainer.dpo_trainer as TD
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    S = SETTINGS
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with open(os.path.join(folder, "prefs.jsonl")) as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    args = DPOConfig(output_dir=out_dir, max_steps=total, learning_rate=S["lr"], lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=S["max_grad_norm"], report_to="none",
                     save_strategy="no", logging_steps=1, bf16=False, fp16=False, use_cpu=True, seed=S["seed"],
                     dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=S["batch_pairs"],
                     gradient_accumulation_steps=1, beta=S["beta"], loss_type=[S["loss"]], max_length=None,
                     padding_free=False, precompute_ref_log_probs=False, disable_dropout=True,
                     gradient_checkpointing=gc)
    peft_config = LoraConfig(r=S["lora_r"], lora_alpha=S["lora_alpha"], lora_dropout=S["lora_dropout"],
                             target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM")
    use_adapter = TD.use_adapter

    @contextlib.contextmanager
    def timed_use_adapter(*a, **k):  # the reference forward runs inside this context in _compute_loss
        t0 = clock.now()
        try:
            with use_adapter(*a, **k):
                yield
        finally:
            clock.add("ref_forward", t0)

    TD.use_adapter = timed_use_adapter
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config)
    loss_fn = clock.wrap("loss", trainer.compute_loss)

    def compute_loss(model, inputs, *a, **k):
        record_batch(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        return loss_fn(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    P.instrument_trl(trainer, clock, at_boundary)
    trainer.train()
    rows = {}
    for h in trainer.state.log_history:
        if "loss" in h and "step" in h:
            rows[int(h["step"])] = {k: h.get(src) for k, src in _ROW_KEYS.items()}
    info = {"attn_implementation": getattr(model.config, "_attn_implementation", None),
            "gradient_checkpointing": gc, "trainer_model_is_peft": type(trainer.model).__name__,
            "reference": "adapter disabled" if trainer.ref_model is None else type(trainer.ref_model).__name__,
            "optimizer": f"{type(trainer.optimizer.optimizer).__name__} (optim={args.optim}, "
                         f"fused={trainer.optimizer.optimizer.defaults.get('fused')})"}
    return rows, info


# ----------------------------------------------------------------------------------------------- parent


def _run_child(variant, folder, warmup, steps, timeout, mmap_threshold=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, folder, str(warmup), str(steps)]
    load0, t0 = os.getloadavg(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = list(load0), list(os.getloadavg())
    return out


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def summarize(runs: list[dict]) -> dict:
    S = P._stats
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        steps = [s for r in rs for s in r["steps"]]
        d = {"step_wall_s": S([statistics.median(s["wall_s"] for s in r["steps"]) for r in rs]),
             "step_cpu_s": S([statistics.median(s["cpu_s"] for s in r["steps"]) for r in rs]),
             "step_wall_s_all_steps": S([s["wall_s"] for s in steps]),
             "step_cpu_s_all_steps": S([s["cpu_s"] for s in steps]),
             "minor_faults_per_step": S([s["minor_faults"] for s in steps]),
             "phases_cpu_s": {k: S([s["phases_cpu_s"][k] for s in steps]) for k in PHASES},
             "phases_wall_s": {k: S([s["phases_wall_s"][k] for s in steps]) for k in PHASES},
             "peak_reached_in": sorted({r["memory"].get("first_timed_step_peak_reached_in") for r in rs} - {None}),
             "process_peak_rss": S([r["memory"]["process_peak"] for r in rs]),
             "step_window_peak_rss": S([r["memory"]["step_window_peak"] for r in rs]),
             "rss_at_timed_start": S([r["memory"]["rss_at_timed_start"] for r in rs]),
             "rss_after_imports": S([r["memory"]["rss_after_imports"] for r in rs]),
             "process_wall_s": S([r["process_wall_s"] for r in rs]),
             "lora_delta_timed": S([r["lora_delta_timed"] for r in rs]),
             "batches": sorted({json.dumps(s["batch"], sort_keys=True) for s in steps}),
             "all_finite": all(_finite(s.get(k)) for s in steps for k in ("loss", "grad_norm")),
             **{k: S([s.get(k) for s in steps]) for k in _ROW_KEYS}}
        d["step_window_extra_rss_median"] = d["step_window_peak_rss"]["median"] - d["rss_at_timed_start"]["median"]
        d["trained"] = d["all_finite"] and all(r["lora_delta_timed"] > 0 for r in rs)
        d["first_step"] = {k: S([r["rows_warmup"][0].get(k) for r in rs]) for k in ("loss", "grad_norm",
                                                                                   "logps_chosen")}
        out[v] = d
    for name, ours in out.items():
        if name.startswith("rlhf_fast"):
            _ratios(ours, out)
    return out


def _ratios(ours: dict, out: dict) -> None:
    for v in ("trl", "trl_gc"):
        t = out.get(v)
        if t is None:
            continue
        q = {"throughput_x_cpu": t["step_cpu_s"]["median"] / ours["step_cpu_s"]["median"],
             "throughput_x_wall": t["step_wall_s"]["median"] / ours["step_wall_s"]["median"],
             "peak_rss_fraction": ours["process_peak_rss"]["median"] / t["process_peak_rss"]["median"],
             "step_window_peak_fraction": ours["step_window_peak_rss"]["median"] / t["step_window_peak_rss"]["median"],
             "step_window_extra_fraction": ours["step_window_extra_rss_median"]
             / max(1, t["step_window_extra_rss_median"])}
        q["goal_met"] = q["throughput_x_cpu"] >= 1.5 and q["peak_rss_fraction"] <= 0.6
        ours.setdefault("ratios", {})[v] = q


def _agree(s: dict, rtol: float = 1e-4) -> bool:
    vals = [(r["first_step"][k] or {}).get("median") for r in s.values() for k in ("loss", "grad_norm", "logps_chosen")]
    if any(not _finite(x) for x in vals):
        return False
    per = [[r["first_step"][k]["median"] for r in s.values()] for k in ("loss", "grad_norm", "logps_chosen")]
    return all(max(xs) - min(xs) <= rtol * max(1e-12, max(abs(x) for x in xs)) for xs in per)


def markdown(report: dict) -> str:
    m, s, mm = report["meta"], report["summary"], P._mm
    malloc = "glibc defaults" if not m["mmap_threshold"] else f"MALLOC_MMAP_THRESHOLD_={m['mmap_threshold']}"
    same = len({b for r in s.values() for b in r["batches"]}) == 1
    L = [f"# DPO step: rlhf_fast `train_dpo` vs TRL {m['trl']} `DPOTrainer` (CPU, vocab {m['vocab']}, {m['date']})",
         "",
         f"Model: random tiny Llama (hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}, {HEADS} heads / "
         f"{KV_HEADS} KV heads, vocab {m['vocab']}, fp32, LlamaForCausalLM default init, seed 0), WordLevel tokenizer "
         f"over {m['vocab']} words; {PAIRS} preference pairs: {PROMPT_WORDS}-word prompts, {RESPONSE_WORDS}-word chosen "
         f"and rejected responses (random words, fixed seed; both sides append EOS). CPU: {m['cpu']} ({m['cpus']} "
         f"cores, shared with other work), **1 torch thread**, one fresh process per (variant, repetition), variants "
         f"alternating (order rotated each repetition), {m['reps']} processes per variant, {m['warmup']} warm-up "
         f"step(s) excluded, then {m['steps']} timed steps in the same process. Allocator: {malloc}.", "",
         "Settings, both sides: " + ", ".join(f"{k} {v}" for k, v in m["settings"].items())
         + f"; LoRA on {', '.join(TARGETS)} (PEFT on both sides); reference = the base with the adapters off, one "
         "no-grad pass per step. rlhf_fast: gradient checkpointing off. TRL: `trl` off, `trl_gc` on (TRL's default); "
         "`max_length=None` (no truncation), `padding_free=False`, `precompute_ref_log_probs=False`, "
         "`disable_dropout=True`.", "",
         "Batches as each side saw them (rows = chosen + rejected, tokens per step): "
         + "; ".join(f"{v}: {', '.join(r['batches'])}" for v, r in s.items())
         + (" (**the same on every side**)." if same else " (**they differ**)."), "",
         "Step 1 (a warm-up step, from the same initial weights and LoRA init on every side), median over processes: "
         + "; ".join(f"{v}: loss {r['first_step']['loss']['median']:.6g}, grad norm "
                     f"{r['first_step']['grad_norm']['median']:.6g}, logps/chosen "
                     f"{r['first_step']['logps_chosen']['median']:.6g}" for v, r in s.items())
         + (" (**the sides agree**, relative difference <= 1e-4)." if _agree(s) else
            " (**the sides differ**: other batches or another computation).") + "\n\n"
         "Differences between the sides that the settings do not remove: TRL's fused LM head (`add_fused_lm_head`) "
         "also computes entropy, mean logit and top-1 per token on every pass (for its logged metrics; the "
         "reference pass runs through the same patched model, so it pays them too); on the CPU it takes its torch "
         "fallback, which scores every position (prompt included) in tiles of min(N, 4096) tokens x min(V, 32768) "
         "fp32 logits, i.e. the whole (2560, V) logits of this batch, with several temporaries of that size (on "
         "CUDA it runs Triton kernels on the response positions only: these CPU figures say nothing about that "
         "path). rlhf_fast's torch backend tiles at 4 MiB and also scores every position. TRL builds a fused AdamW "
         "(its default `adamw_torch_fused`), rlhf_fast torch's default AdamW plus a finiteness check with an undo "
         "snapshot. TRL imports more (a higher RSS at start).", "",
         "Step = the interval between two end-of-step hooks. Step time: the median over processes of each process's "
         "median step, (min - max) over processes. CPU = process user + sys. Peak RSS = ru_maxrss at the end of the "
         "last timed step (imports and model load included); window peak = VmHWM over the timed steps only (reset "
         "after the warm-up); start = RSS when the timed steps begin; window extra = window peak - start.", "",
         "| variant | step CPU s | step wall s | steps/s (CPU) | minor faults / step (k) | peak RSS GiB "
         "| window peak GiB | start GiB | window extra MiB | peak reached in | loss | grad norm | reward accuracy "
         "| reward margin | LoRA change (timed) | trained |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for v, r in s.items():
        L.append(f"| {v} | {mm(r['step_cpu_s'])} | {mm(r['step_wall_s'])} | {1 / r['step_cpu_s']['median']:.2f} "
                 f"| {mm(r['minor_faults_per_step'], 1000, '{:.0f}')} | {mm(r['process_peak_rss'], GiB, '{:.3f}')} "
                 f"| {mm(r['step_window_peak_rss'], GiB, '{:.3f}')} | {mm(r['rss_at_timed_start'], GiB, '{:.3f}')} "
                 f"| {r['step_window_extra_rss_median'] / MiB:.0f} | {', '.join(r['peak_reached_in'])} "
                 f"| {mm(r['loss'], 1, '{:.4g}')} | {mm(r['grad_norm'], 1, '{:.3g}')} | {mm(r['accuracy'], 1, '{:.2f}')} "
                 f"| {mm(r['margin'], 1, '{:.3g}')} | {mm(r['lora_delta_timed'], 1, '{:.3g}')} "
                 f"| {'yes' if r['trained'] else '**no**'} |")
    ratios = [(o, v, q) for o, r in s.items() for v, q in r.get("ratios", {}).items()]
    if ratios:
        L += ["", "Ratios, each rlhf_fast variant against each TRL variant (the issue's goal: >= 1.5x TRL's step "
              "throughput at <= 0.6x its peak memory; here throughput = CPU time per step, peak memory = peak RSS):",
              "", "| rlhf_fast variant | vs | throughput x (CPU) | throughput x (wall) | peak RSS fraction "
              "| window peak fraction | window extra fraction | goal |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for o, v, q in ratios:
            L.append(f"| {o} | {v} | {q['throughput_x_cpu']:.2f}x | {q['throughput_x_wall']:.2f}x | "
                     f"{q['peak_rss_fraction']:.2f} | {q['step_window_peak_fraction']:.2f} | "
                     f"{q['step_window_extra_fraction']:.2f} | {'met' if q['goal_met'] else 'not met'} |")
    L += ["", "Time split per step, CPU seconds, median (min - max) over all timed steps of all processes:", "",
          "| variant | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for v, r in s.items():
        L.append(f"| {v} | " + " | ".join(mm(r["phases_cpu_s"][k], 1, "{:.3f}") for k in PHASES) + " |")
    L += ["", "Phases: ref_forward = rlhf_fast `trainers.dpo.reference_logps` / the body of TRL's `use_adapter` "
          "context in `_compute_loss` (the adapter-disabled reference pass); policy_forward = `dpo_batch_loss` / "
          "`compute_loss` minus ref_forward (policy forward, log-probs, loss, logged statistics); backward; "
          "optimizer = clip + AdamW (+ rlhf_fast's finiteness check and undo snapshot); other = the remainder "
          "(data, collation, loop, logging).", "",
          "Per repetition (processes in the order run):", "",
          "| # | variant | step CPU s (each timed step) | step wall s | peak RSS GiB | window peak GiB | start GiB "
          "| load avg (1 min) before / after |", "|---:|---|---|---|---:|---:|---:|---|"]
    for i, r in enumerate(report["runs"]):
        cpu = ", ".join(f"{x['cpu_s']:.3f}" for x in r["steps"])
        wall = ", ".join(f"{x['wall_s']:.3f}" for x in r["steps"])
        L.append(f"| {i} | {r['variant']} | {cpu} | {wall} | {r['memory']['process_peak'] / GiB:.3f} "
                 f"| {r['memory']['step_window_peak'] / GiB:.3f} | {r['memory']['rss_at_timed_start'] / GiB:.3f} "
                 f"| {r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f} |")
    hashes: dict[str, set] = {}
    for r in report["runs"]:
        for f, h in r.get("sources", {}).items():
            hashes.setdefault(f, set()).add(h)
    changed = [f for f, hs in hashes.items() if len(hs) > 1]
    impl = {r["variant"]: r.get("optimizer") for r in report["runs"]}
    L += ["", "Optimizers as built: " + "; ".join(f"{v}: {o}" for v, o in impl.items()) + ".", "",
          f"Machine load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}; "
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
    ap.add_argument("--vocab", type=int, default=2000, help="vocabulary size of the model and the tokenizer")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per variant")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="MALLOC_MMAP_THRESHOLD_ for the children (0: glibc's default)")
    ap.add_argument("--notes", default="", help="a JSON file holding a list of note strings for the report")
    ap.add_argument("--render", metavar="JSON", help="no run: rewrite the .md (and the notes) of an earlier run's JSON")
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
    if a.warmup < 1 or a.steps < 1 or a.reps < 1 or a.vocab < 16:
        ap.error("--warmup, --steps and --reps must be >= 1, --vocab >= 16")
    variants = [x for x in a.variants.split(",") if x]
    bad = [x for x in variants if x not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    load0, t0 = os.getloadavg(), time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder, a.vocab)
        for rep in range(a.reps):
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:
                r = _run_child(v, folder, a.warmup, a.steps, a.timeout, a.mmap_threshold)
                r["rep"] = rep
                runs.append(r)
                print(f"rep {rep} {v:10s} cpu/step {statistics.median(s['cpu_s'] for s in r['steps']):.3f} s  "
                      f"wall/step {statistics.median(s['wall_s'] for s in r['steps']):.3f} s  peak RSS "
                      f"{r['memory']['process_peak'] / GiB:.3f} GiB  window {r['memory']['step_window_peak'] / GiB:.3f}"
                      f" GiB  load {r['loadavg_before'][0]:.2f}", flush=True)
    meta = dict(P._versions(), date=a.date, device="cpu", cpu=P._cpu(), cpus=os.cpu_count(), threads=1,
                reps=a.reps, steps=a.steps, warmup=a.warmup, variants=variants, vocab=a.vocab, settings=SETTINGS,
                lora_targets=TARGETS, mmap_threshold=a.mmap_threshold,
                model=dict(vocab=a.vocab, hidden=HIDDEN, layers=LAYERS, intermediate=INTERMEDIATE, heads=HEADS,
                           kv_heads=KV_HEADS, pairs=PAIRS, prompt_words=PROMPT_WORDS, response_words=RESPONSE_WORDS),
                loadavg_before=list(load0), loadavg_after=list(os.getloadavg()), total_s=time.perf_counter() - t0,
                command=" ".join([os.path.relpath(sys.executable), os.path.relpath(__file__)]
                                 + (argv if argv is not None else sys.argv[1:])))
    notes = []
    if a.notes:
        with open(a.notes) as f:
            notes = json.load(f)
    report = {"meta": meta, "summary": summarize(runs), "runs": runs, "notes": notes}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"peers-dpo-cpu-{a.date}-v{a.vocab}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()

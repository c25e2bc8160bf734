"""RoleModel.experience() against the four-model PPO recipe, throughput (tokens/s) and peak memory.

The four-model recipe is what TRL's PPO keeps in memory: separate policy, reference, critic and reward models
(full copies), log-probs from materialised (B, T, V) logits (log_softmax + gather), value and reward models
as backbone + Linear(H, 1) on every token (AutoModelForSequenceClassification). RoleModel runs the four roles
on one base through LoRA adapters, log-probs through ops.fused_linear_logprobs.

CPU:  python bench/bench_role_model.py (from the repo root) -> bench/results/cpu-role-model-<date>.{md,json}
GPU:  from rlhf_fast.bench.role_model import gpu_compare; gpu_compare()  (Qwen2-0.5B shape, bf16, 32 x 1024)

Also measured on the CPU: experience(mode="mixed") (one 4B-row forward with peft's per-row adapter_names)
against mode="sequential", and generation with the live policy adapter against merge-for-rollout.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on the CPU the weights' bytes plus the peak of live
CPU allocations during the call, from torch.profiler's memory events (RSS deltas are too noisy).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.bench.measure import git_commit, tensor_peak_extra_bytes
from rlhf_fast.models import LoraSettings, RoleModel
from rlhf_fast.models.role_model import position_ids

# ----------------------------------------------------------------------------------------------- configs


def qwen2_0_5b_config():
    """Qwen2-0.5B's shape (random init; nothing is downloaded)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)


def tiny_cpu_config():
    """A small Qwen2 with a realistic vocabulary-to-hidden ratio (V / H = 128; Qwen2-0.5B has 170)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=8192, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)


# ----------------------------------------------------------------------------------------------- the baseline

class FourModels(nn.Module):
    """Separate policy, reference, critic and reward models, as in TRL's PPO (full copies of the base)."""

    def __init__(self, lm):
        super().__init__()
        h = lm.get_output_embeddings().weight.shape[1]
        self.policy = copy.deepcopy(lm)
        self.reference = copy.deepcopy(lm)
        self.critic = copy.deepcopy(lm.base_model)
        self.reward = copy.deepcopy(lm.base_model)
        dev = lm.get_output_embeddings().weight.device
        self.value_head = nn.Linear(h, 1, device=dev)
        self.score_head = nn.Linear(h, 1, device=dev)
        self.requires_grad_(False)

    @torch.no_grad()
    def experience(self, ids, mask):
        pos = position_ids(mask)
        out = {}
        for key, lm in (("logprobs", self.policy), ("ref_logprobs", self.reference)):
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, T, V)
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out[key] = torch.nn.functional.pad(lp, (1, 0))
            del logits, lp
        h = self.critic(input_ids=ids, attention_mask=mask, position_ids=pos)[0]
        out["values"] = self.value_head(h.float()).squeeze(-1)  # (B, T): a value on every token
        h = self.reward(input_ids=ids, attention_mask=mask, position_ids=pos)[0]
        per_token = self.score_head(h.float()).squeeze(-1)
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        out["scores"] = per_token.gather(1, last[:, None]).squeeze(1)
        return out


# ----------------------------------------------------------------------------------------------- measuring

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_many(fns: dict, device, reps: int) -> dict:
    """Median seconds of each fn, after one warm-up each; the fns alternate within every repetition.

    On the CPU the clock is this process's CPU time (all its threads), not wall time: the 2-core machine
    these runs share makes wall time swing by 10x from one repetition to the next (other processes take the
    cores), while the CPU time a recipe consumes stays put. On CUDA it is wall time after a synchronise.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[key].append(clock() - t0)
    _time_many.last = times  # raw per-repetition times, for paired ratios
    return {key: statistics.median(v) for key, v in times.items()}


def _held_bytes(module: nn.Module) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(module.parameters()) + list(module.buffers())}.values())


def _peak_memory(fn, device, held: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return held + torch.cuda.max_memory_allocated() - before
    return held + tensor_peak_extra_bytes(fn)[0]


def _micro(fn, ids, mask, micro_batch):
    # Run fn over micro-batches (both recipes alike), as PPO's rollout forward batch size does.
    def run():
        mb = micro_batch or ids.shape[0]
        for i in range(0, ids.shape[0], mb):
            fn(ids[i:i + mb], mask[i:i + mb])
    return run


def compare(config, *, batch: int, seq: int, micro_batch: int | None = None, dtype=torch.float32,
            device: str = "cpu", reps: int = 3, lora: LoraSettings | None = None, seed: int = 0) -> dict:
    """experience() vs the four-model recipe on a random-init model of `config`: tokens/s and peak memory.

    Args:
        config: a transformers config of a causal LM (random init).
        batch, seq: the batch is (batch, seq) tokens; every row is full (no padding).
        micro_batch: rows per forward for both recipes (None: the whole batch at once).
        dtype, device: of the base weights and the run.
        reps: timed repetitions (median reported), after one warm-up.
    Returns a dict with both recipes' tokens/s, peak bytes and the ratios.
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=dev)
    mask = torch.ones_like(ids)
    tokens = batch * seq
    results = {"config": {"model_type": config.model_type, "hidden": config.hidden_size,
                          "layers": config.num_hidden_layers, "vocab": config.vocab_size},
               "batch": batch, "seq": seq, "micro_batch": micro_batch, "dtype": str(dtype), "device": device}

    # Memory: held weights + the peak of what the call allocates beyond what was live before it, per recipe.
    # Time: on the CPU the recipes alternate within each repetition, so load from other processes hits all
    # alike; on CUDA the four models are freed before RoleModel is built.
    four = FourModels(lm)
    runs = {"four_models": _micro(four.experience, ids, mask, micro_batch)}
    held = {"four_models": _held_bytes(four)}
    peaks = {"four_models": _peak_memory(runs["four_models"], dev, held["four_models"])}
    times = {}
    if dev.type == "cuda":
        times |= _time_many(runs, dev, reps)
        del four, runs["four_models"]
        torch.cuda.empty_cache()

    model = RoleModel.from_pretrained(lm, lora=lora or LoraSettings(r=16, alpha=32.0))
    model.eval()
    for mode in ("sequential", "mixed"):
        key = f"role_model_{mode}"
        runs[key] = _micro(lambda i, m, mode=mode: model.experience(i, m, mode=mode), ids, mask, micro_batch)
        held[key] = _held_bytes(model)
        peaks[key] = _peak_memory(runs[key], dev, held[key])
    times |= _time_many(runs, dev, reps)
    raw = _time_many.last if dev.type != "cuda" else None
    for key in peaks:
        results[key] = {"tokens_per_s": tokens / times[key], "seconds": times[key], "peak_bytes": peaks[key],
                        "weight_bytes": held[key]}
    # attribution: the two fused log-prob calls (policy, reference) alone, on the hidden states
    from rlhf_fast import ops

    mb = micro_batch or batch
    with torch.no_grad():
        h = model._hidden(ids[:mb], mask[:mb])[:, :-1]  # (mb, T-1, H)
        t = _time_many({"op": lambda: ops.fused_linear_logprobs(h, model.lm_head.weight, ids[:mb, 1:])}, dev,
                       reps)["op"]
    results["role_model_sequential"]["logprob_op_seconds"] = t * 2 * (batch // mb)
    rm, fm = results["role_model_sequential"], results["four_models"]
    results["reps"] = reps
    # on the CPU the recipes ran back to back in each repetition: the median of the paired ratios is robust
    # to load from other processes that shifts whole repetitions
    results["throughput_ratio"] = (statistics.median(f / r for f, r in zip(raw["four_models"],
                                                                           raw["role_model_sequential"]))
                                   if raw else rm["tokens_per_s"] / fm["tokens_per_s"])
    results["throughput_ratio_per_rep"] = ([f / r for f, r in zip(raw["four_models"], raw["role_model_sequential"])]
                                           if raw else None)
    results["peak_memory_ratio"] = rm["peak_bytes"] / fm["peak_bytes"]
    results["mixed_over_sequential_throughput"] = (
        statistics.median(r / m for r, m in zip(raw["role_model_sequential"], raw["role_model_mixed"])) if raw
        else results["role_model_mixed"]["tokens_per_s"] / rm["tokens_per_s"])
    results["_model"] = model
    return results


def compare_generation(model: RoleModel, *, batch: int, prompt: int, new_tokens: int, reps: int = 3) -> dict:
    """Rollout with the policy adapter live vs merged into the base for the rollout (and unmerged after)."""
    dev = model.lm_head.weight.device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=dev)
    mask = torch.ones_like(ids)
    with torch.no_grad():  # a non-zero policy adapter, so both paths do real work
        for n, p in model.peft.named_parameters():
            if "lora_B.policy" in n:
                p.normal_(0, 0.01)
    fns = {name: (lambda merge=merge: model.generate(ids, mask, max_new_tokens=new_tokens, temperature=0,
                                                      eos_token_id=[], merge=merge))
           for name, merge in (("live", False), ("merged", True))}
    out = {k: {"new_tokens_per_s": batch * new_tokens / t, "seconds": t}
           for k, t in _time_many(fns, dev, reps).items()}
    raw = _time_many.last
    out["merged_over_live_throughput"] = statistics.median(lv / mg for lv, mg in zip(raw["live"], raw["merged"]))
    out["merged_over_live_per_rep"] = [lv / mg for lv, mg in zip(raw["live"], raw["merged"])]
    out.update(batch=batch, prompt=prompt, new_tokens=new_tokens)
    return out


def gpu_compare(batch: int = 32, seq: int = 1024, micro_batch: int | None = 8, reps: int = 5) -> dict:
    """The issue's GPU comparison: Qwen2-0.5B shape, random init, bf16, batch x seq tokens on CUDA.

    micro_batch=8 for both recipes: the four-model recipe's materialised logits (8 x 1024 x 151936) need
    ~2.5 GB in bf16 plus ~5 GB for the fp32 log_softmax per micro-batch. Returns compare()'s dict.
    """
    res = compare(qwen2_0_5b_config(), batch=batch, seq=seq, micro_batch=micro_batch, dtype=torch.bfloat16,
                  device="cuda", reps=reps)
    res.pop("_model")
    res["device_name"] = torch.cuda.get_device_name(0)
    return res


# ----------------------------------------------------------------------------------------------- reporting

def _versions() -> dict:
    import peft
    import transformers

    commit = git_commit(os.getcwd())
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "git_commit": commit,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _markdown(res: dict, gen: dict, meta: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"
    c = res["config"]
    lines = [f"# RoleModel.experience() vs the four-model recipe (CPU, {meta['date']})", "",
             f"Model: random-init {c['model_type']}, hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}; "
             f"batch {res['batch']} x {res['seq']} tokens, {res['dtype']}, micro-batch {res['micro_batch']}, "
             f"{meta['threads']} threads; median of {meta['reps']} runs after a warm-up, the recipes alternating "
             "within each run. Time is the process's CPU time (all threads), because the 2-core machine is "
             "shared and wall time swings 10x between runs: tokens/s are tokens per CPU-second. "
             "LoRA r=16 on every linear of the blocks.", "",
             "| recipe | tokens/s | peak MiB | weights MiB |", "|---|---:|---:|---:|"]
    for key, name in (("four_models", "four models (logits materialised)"),
                      ("role_model_sequential", "RoleModel experience(), sequential"),
                      ("role_model_mixed", "RoleModel experience(), mixed-adapter batch")):
        r = res[key]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {mib(r['peak_bytes'])} | {mib(r['weight_bytes'])} |")
    per_rep = res.get("throughput_ratio_per_rep") or []
    lines += ["", f"- throughput ratio RoleModel / four models: **{res['throughput_ratio']:.2f}x** (median of the "
              f"per-repetition ratios: {', '.join(f'{x:.2f}' for x in per_rep)})",
              f"- peak memory ratio RoleModel / four models: **{res['peak_memory_ratio']:.3f}x**",
              f"- mixed-adapter batch / sequential throughput: {res['mixed_over_sequential_throughput']:.2f}x",
              f"- of RoleModel's {res['role_model_sequential']['seconds']:.2f} s, the two fused log-prob calls "
              f"(torch backend on the CPU) take {res['role_model_sequential']['logprob_op_seconds']:.2f} s",
              "", f"Generation (greedy, batch {gen['batch']}, prompt {gen['prompt']}, {gen['new_tokens']} new tokens):",
              "", "| policy adapter | new tokens/s |", "|---|---:|",
              f"| live | {gen['live']['new_tokens_per_s']:.0f} |",
              f"| merged for the rollout, unmerged after | {gen['merged']['new_tokens_per_s']:.0f} |",
              "", f"- merged / live: {gen['merged_over_live_throughput']:.2f}x (per repetition: "
              f"{', '.join(f'{x:.2f}' for x in gen['merged_over_live_per_rep'])})", "",
              "Peak memory on the CPU = bytes of the weights held + peak of live CPU allocations during the call "
              "(torch.profiler memory events).", "",
              f"versions: torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
              f"python {meta['python']}; commit {meta['git_commit']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)  # 1: no OpenMP spin-waits inflating CPU time
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = compare(tiny_cpu_config(), batch=args.batch, seq=args.seq, reps=args.reps)
    model = res.pop("_model")
    gen = compare_generation(model, batch=args.batch, prompt=32, new_tokens=32, reps=args.reps)
    date = datetime.date.today().isoformat()
    meta = _versions() | {"date": date, "reps": args.reps, "device": "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"experience": res, "generation": gen, "meta": meta}
    (out / f"cpu-role-model-{date}.json").write_text(json.dumps(payload, indent=2))
    md = _markdown(res, gen, meta)
    (out / f"cpu-role-model-{date}.md").write_text(md)
    print(md)
    return payload


if __name__ == "__main__":
    main()

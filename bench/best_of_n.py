"""Best-of-N sampling with a shared prompt prefill against N separate generate calls, on the CPU (run from the repo
root):

    .venv/bin/python bench/best_of_n.py [--n 8 --prompts 4 --prompt_len 96 --new_tokens 32 --reps 5 --note "..."]
        -> bench/results/cpu-best-of-n-<date>.{md,json}

Three ways to draw N samples for each of B prompts from the policy of a RoleModel (random-init Llama, one thread):

    shared    one RoleModel.generate(num_samples=N): each prompt prefilled once, its KV cache repeated for its N
              samples, one decode loop over B*N rows (what rlhf_fast.rl.best_of_n does)
    separate  N generate calls of the B prompts (the baseline of the issue: the same total samples)
    repeated  one generate call of the B prompts each repeated N times (B*N prefills, one decode loop)

Every response is exactly new_tokens long (no EOS stops a row), so each variant does the same decode work. The
variants alternate within each repetition; CPU time (time.process_time, the process's threads) and wall time,
medians with min and max. The machine may be shared: say in --note what else ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import peft
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_fast.models import RoleModel


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0) -> RoleModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return RoleModel.from_pretrained(LlamaForCausalLM(cfg)).eval()


def variants(model, ids, mask, n: int, new_tokens: int):
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, eos_token_id=[])  # no stop token: fixed lengths

    def shared(g):
        return model.generate(ids, mask, num_samples=n, generator=g, **kw)["sequences"].shape[0]

    def separate(g):
        return sum(model.generate(ids, mask, generator=g, **kw)["sequences"].shape[0] for _ in range(n))

    def repeated(g):
        return model.generate(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), generator=g,
                              **kw)["sequences"].shape[0]

    return {"shared": shared, "separate": separate, "repeated": repeated}


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts B per call")
    p.add_argument("--prompt_len", type=int, default=96)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = build_model(a.hidden, a.layers, a.vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, a.vocab, (a.prompts, a.prompt_len), generator=g)  # (B, P)
    mask = torch.ones_like(ids)
    mask[1::2, : a.prompt_len // 4] = 0  # every other prompt left-padded by a quarter: prompts of two lengths
    fns = variants(model, ids, mask, a.n, a.new_tokens)
    for fn in fns.values():  # warm-up
        fn(torch.Generator().manual_seed(1))
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for rep in range(a.reps):
        names = list(fns) if rep % 2 == 0 else list(fns)[::-1]  # alternate the order
        for name in names:
            gen = torch.Generator().manual_seed(100 + rep)
            c0, w0 = time.process_time(), time.perf_counter()
            rows = fns[name](gen)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            assert rows == a.prompts * a.n, (name, rows)
    samples = a.prompts * a.n
    result = {
        "what": "Best-of-N: shared prompt prefill (num_samples=N) vs N separate generate calls vs one call with the "
                "prompts repeated N times", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": a.threads, "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "setup": {"model": f"random-init llama, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32",
                  "n": a.n, "prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                  "samples_per_call": samples, "reps": a.reps, "temperature": 1.0},
        "note": a.note, "load_average": os.getloadavg(),
        "cpu_s": {k: stats(v) for k, v in cpu.items()}, "wall_s": {k: stats(v) for k, v in wall.items()},
    }
    ratio = lambda t, base: [b / s for b, s in zip(t[base], t["shared"])]  # noqa: E731
    result["speedup_cpu"] = {"vs_separate": stats(ratio(cpu, "separate")), "vs_repeated": stats(ratio(cpu, "repeated"))}
    result["speedup_wall"] = {"vs_separate": stats(ratio(wall, "separate")),
                              "vs_repeated": stats(ratio(wall, "repeated"))}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"cpu-best-of-n-{result['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(report(result))
    print(report(result))


def report(r: dict) -> str:
    s = r["setup"]
    fmt = lambda d: f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f})"  # noqa: E731
    lines = [f"# Best-of-N: shared prompt prefill vs N separate generate calls (CPU, {r['date']})", "",
             f"Model: {s['model']}; B = {s['prompts']} prompts of {s['prompt_len']} tokens (every other one left-padded "
             f"by a quarter), N = {s['n']} samples each ({s['samples_per_call']} samples per variant), "
             f"{s['new_tokens']} new tokens per sample (no EOS stop), temperature 1; {r['threads']} thread; "
             f"{s['reps']} repetitions after a warm-up, the variants alternating in order. Seconds: median (min-max).",
             "", "| variant | CPU s | wall s | samples / CPU s |", "|---|---:|---:|---:|"]
    names = {"shared": "shared prefill, one call (num_samples=N)", "separate": "N separate generate calls",
             "repeated": "one call, prompts repeated N times"}
    for k, name in names.items():
        c, w = r["cpu_s"][k], r["wall_s"][k]
        lines.append(f"| {name} | {fmt(c)} | {fmt(w)} | {s['samples_per_call'] / c['median']:.1f} |")
    sc, sw = r["speedup_cpu"], r["speedup_wall"]
    lines += ["", f"- shared / separate, CPU time: **{sc['vs_separate']['median']:.2f}x** (min {sc['vs_separate']['min']:.2f},"
              f" max {sc['vs_separate']['max']:.2f}); wall: {sw['vs_separate']['median']:.2f}x "
              f"({sw['vs_separate']['min']:.2f}-{sw['vs_separate']['max']:.2f})",
              f"- shared / repeated prompts, CPU time: {sc['vs_repeated']['median']:.2f}x "
              f"({sc['vs_repeated']['min']:.2f}-{sc['vs_repeated']['max']:.2f}); wall: "
              f"{sw['vs_repeated']['median']:.2f}x ({sw['vs_repeated']['min']:.2f}-{sw['vs_repeated']['max']:.2f})",
              "- ratios are per repetition (the variants of one repetition ran back to back), then the median",
              "", f"Machine: {r['note'] or 'no note'}; load average at the end {', '.join(f'{x:.2f}' for x in r['load_average'])}.",
              "", f"versions: torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, peft "
              f"{r['versions']['peft']}, python {r['versions']['python']}; commit {r['commit']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

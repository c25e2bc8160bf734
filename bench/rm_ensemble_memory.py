"""Peak memory of scoring one batch with K = 4 reward models, three ways, on the CPU:

    single     one RoleModel, its reward adapter (the reference point: one reward model)
    ensemble   one RoleModel with 4 reward members (set_reward_members(4)): model.ensemble_scores
    separate   4 RoleModels (4 copies of the base), each scoring with its own reward adapter

Run from the repo root:

    .venv/bin/python bench/rm_ensemble_memory.py [--reps 3] [--out bench/results]
        -> bench/results/cpu-rm-ensemble-<date>.{md,json}

Each (variant, repetition) is a fresh process with one thread; the variants alternate within a repetition
(rotated order). In it: import, record the RSS (`imports`), build the model(s) from a saved random Llama
(hidden 512, 8 layers, V = 8000: the base, not the imports, dominates), score one batch (B = 8, T = 128) once
to warm up, then time 3 more; the peak is ru_maxrss at the end (glibc's mmap threshold fixed at 128 KiB so
freed blocks leave the RSS, as rlhf_fast/bench/measure.py does). Reported: the whole peak and the peak above
`imports` (what the models and the scoring add), medians with min/max over the repetitions.
Goal (issue 10): the ensemble's peak <= 1.1x one model's at K = 4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

K = 4
CONFIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
              tie_word_embeddings=False)
BATCH, T = 8, 128
VARIANTS = ("single", "ensemble", "separate")
MiB = 1 << 20


def _build(folder: str) -> int:
    """A random Llama of CONFIG, saved as safetensors; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant: str, folder: str) -> dict:
    """One measurement, in this (fresh) process."""
    from rlhf_fast.models import LoraSettings, RoleModel

    torch.set_num_threads(1)
    imports = _rss()
    lora = LoraSettings(r=16, alpha=32)
    n = 4 if variant == "separate" else 1
    models = [RoleModel.from_pretrained(folder, lora=lora).eval() for _ in range(n)]
    if variant == "ensemble":
        models[0].set_reward_members(K)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, T), generator=g)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def score():
        if variant == "ensemble":
            return models[0].ensemble_scores(ids, mask)  # (K, B)
        if variant == "separate":
            return torch.stack([m.scores(ids, mask) for m in models])  # (K, B)
        return models[0].scores(ids, mask)[None]  # (1, B)

    out = score()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = score()
        times.append(time.perf_counter() - t0)
    params = sum(sum(p.numel() for p in m.parameters()) for m in models)
    return {"variant": variant, "peak": _maxrss(), "imports": imports, "score_s": statistics.median(times),
            "members": int(out.shape[0]), "params": params}


def _run_child(variant: str, folder: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    r = subprocess.run([sys.executable, __file__, "--child", variant, "--folder", folder], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    try:  # read-only
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--child")
    ap.add_argument("--folder")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.folder)))
        return 0
    import peft
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        base_params = _build(folder)
        runs = {v: [] for v in VARIANTS}
        for rep in range(a.reps):
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotated: no variant always runs first
            for v in order:
                runs[v].append(_run_child(v, folder))
                print(f"rep {rep} {v}: peak {runs[v][-1]['peak'] / MiB:.0f} MiB", flush=True)
    rows = []
    for v in VARIANTS:
        rs = runs[v]
        rows.append({"variant": v, "members": rs[0]["members"], "params_held": rs[0]["params"],
                     "peak_mib": stats([r["peak"] / MiB for r in rs]),
                     "above_imports_mib": stats([(r["peak"] - r["imports"]) / MiB for r in rs]),
                     "imports_mib": stats([r["imports"] / MiB for r in rs]),
                     "score_ms": stats([r["score_s"] * 1e3 for r in rs])})
    by = {r["variant"]: r for r in rows}
    ratio = {k: by[k]["peak_mib"]["median"] / by["single"]["peak_mib"]["median"] for k in ("ensemble", "separate")}
    ratio_above = {k: by[k]["above_imports_mib"]["median"] / by["single"]["above_imports_mib"]["median"]
                   for k in ("ensemble", "separate")}
    date = datetime.date.today().isoformat()
    meta = {"device": f"cpu: {_cpu()}", "threads": 1, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "git_commit": _git_commit(),
            "date": date, "reps": a.reps, "K": K, "batch": BATCH, "T": T, "config": CONFIG,
            "base_params": base_params, "base_mib_fp32": base_params * 4 / MiB}
    result = {"meta": meta, "rows": rows, "ratio_to_single_peak": ratio, "ratio_to_single_above_imports": ratio_above,
              "goal": "ensemble peak <= 1.1x single at K = 4",
              "goal_met": ratio["ensemble"] <= 1.1, "goal_met_above_imports": ratio_above["ensemble"] <= 1.1}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"cpu-rm-ensemble-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    fmt = lambda s: f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"  # noqa: E731
    lines = [f"# Reward-model ensemble memory, CPU, {date}", "",
             f"{meta['device']}, 1 thread; torch {meta['torch']}, transformers {meta['transformers']}, peft "
             f"{meta['peft']}; commit {meta['git_commit']}. Command: `.venv/bin/python bench/rm_ensemble_memory.py "
             f"--reps {a.reps}`.", "",
             f"Base: random Llama, hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, V = "
             f"{CONFIG['vocab_size']}: {base_params / 1e6:.1f} M parameters, {meta['base_mib_fp32']:.0f} MiB in fp32. "
             f"LoRA r = 16 on every linear of the blocks. One scoring batch: B = {BATCH}, T = {T}, no gradients. "
             f"Each figure: median (min-max) of {a.reps} fresh processes, variants alternating.", "",
             "| variant | reward models | parameters held | peak RSS MiB | peak above imports MiB | "
             "time per scoring batch ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['members']} | {r['params_held'] / 1e6:.1f} M | {fmt(r['peak_mib'])} | "
                     f"{fmt(r['above_imports_mib'])} | {fmt(r['score_ms'])} |")
    lines += ["", f"Peak RSS / single: ensemble {ratio['ensemble']:.2f}x, separate {ratio['separate']:.2f}x. "
              f"Above imports / single: ensemble {ratio_above['ensemble']:.2f}x, separate "
              f"{ratio_above['separate']:.2f}x.",
              f"Goal (ensemble peak <= 1.1x one model at K = 4): {'met' if result['goal_met'] else 'NOT met'} on the "
              f"whole peak, {'met' if result['goal_met_above_imports'] else 'NOT met'} above imports.", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

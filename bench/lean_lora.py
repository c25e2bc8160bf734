"""LoRA layer forward: rlhf_fast's LeanLoraLinear against PEFT's own forward, through a RoleModel's whole backbone
on the CPU (run from the repo root):

    python bench/lean_lora.py [--models tiny,smollm2 --reps 5 --threads 1]
        -> bench/results/cpu-lean-lora-<date>.{md,json}

Three paths: `peft` (PEFT's forward), `addmm` (LeanLoraLinear's one-addmm path on every call: the merge
threshold set out of reach) and `lean` (LeanLoraLinear as shipped: calls with >= MERGE_ROWS_PER_RANK x r rows
merge the adapter into the weight for the call). Per model: the backbone's forward without grad (a rollout-side
scoring pass) and forward + backward of a scalar of the hidden states with the policy adapter on (an update's
pass), CPU time of this process, the paths alternating within each repetition (the order rotated each
repetition), medians with min - max. All paths run on the same model object: the layers' class (and the
threshold) are switched between passes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from rlhf_fast.bench.measure import cpu_name, git_commit
from rlhf_fast.models import LoraSettings, RoleModel, lean_lora
from rlhf_fast.models.lean_lora import LeanLoraLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    # the peers benches' shapes: the GRPO tiny Llama at 8 prompts x 4 samples x (16 + 48) tokens, SmolLM2 at the
    # PPO bench's 16 x (40 + 48)
    "tiny": dict(batch=32, seq=64),
    "smollm2": dict(batch=16, seq=88),
}


def build(name: str) -> RoleModel:
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    if name == "smollm2":
        return RoleModel.from_pretrained("smollm2", lora=lora, dtype=torch.float32)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=2000))
    return RoleModel.from_pretrained(lm, lora=lora)


def measure(name: str, reps: int) -> dict:
    model = build(name)
    with torch.no_grad():  # B != 0, so the adapter's product is real work on both paths
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    shape = MODELS[name]
    ids = torch.randint(0, model.lm_head.weight.shape[0], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(0))

    merge_rows = lean_lora.MERGE_ROWS_PER_RANK

    def use(path: str) -> None:
        for m in layers:
            m.__class__ = PeftLoraLinear if path == "peft" else LeanLoraLinear
        lean_lora.MERGE_ROWS_PER_RANK = float("inf") if path == "addmm" else merge_rows

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with model.role("policy"):
            h = model.backbone(input_ids=ids).last_hidden_state
        h.pow(2).mean().backward()

    def fwd():
        with torch.no_grad(), model.role("policy"):
            model.backbone(input_ids=ids)

    times = {f"{p}/{k}": [] for p in PATHS for k in ("forward", "forward_backward")}
    for path in PATHS:  # one untimed warm-up each
        use(path)
        fwd_bwd()
    for rep in range(reps):
        for path in PATHS[rep % 3:] + PATHS[:rep % 3]:
            use(path)
            for kind, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
                t = time.process_time()
                fn()
                times[f"{path}/{kind}"].append(time.process_time() - t)
    use("lean")
    stats = {k: summary(v) for k, v in times.items()}
    return {"model": name, "tokens": shape["batch"] * shape["seq"], **shape, "lora_layers": len(layers),
            "merge_rows_per_rank": merge_rows, "times": stats,
            "speedup": {k: stats[f"peft/{k}"]["median"] / stats[f"lean/{k}"]["median"]
                        for k in ("forward", "forward_backward")},
            "merge_speedup": {k: stats[f"addmm/{k}"]["median"] / stats[f"lean/{k}"]["median"]
                              for k in ("forward", "forward_backward")}}


PATHS = ("peft", "addmm", "lean")


def summary(v: list[float]) -> dict:
    """Median, min, max and every value of a list of timings (this script's and bench/cpu_gemm.py's reports)."""
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}


def markdown(report: dict) -> str:
    merge = report["results"][0]["merge_rows_per_rank"] if report["results"] else "?"
    lines = [f"# LoRA layer forward: LeanLoraLinear vs PEFT (CPU, {report['date']})", "",
             f"CPU: {report['cpu']}, **{report['threads']} torch thread(s)**; {report['reps']} repetitions, the "
             "three paths alternating (order rotated each repetition), CPU time of the process; medians (min - "
             "max). LoRA r 16, alpha 32, on q, k, v, o, gate, up and down projections, adapter B random (std 0.02); "
             "fp32. `forward`: the backbone without grad; `forward_backward`: forward + backward of mean(h^2) with "
             f"the policy adapter on. Paths: PEFT's forward; `addmm`: LeanLoraLinear's one-addmm path on every "
             f"call; `lean`: LeanLoraLinear as shipped (calls with >= {merge} x r rows merge the adapter into the "
             "weight for the call; every call here has that many).", "",
             "| model | tokens | LoRA layers | pass | PEFT s | addmm s | lean s | PEFT / lean | addmm / lean |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]

    def cell(t: dict) -> str:
        return f"{t['median']:.3f} ({t['min']:.3f} - {t['max']:.3f})"

    for r in report["results"]:
        for kind in ("forward", "forward_backward"):
            p, a, q = (r["times"][f"{path}/{kind}"] for path in PATHS)
            lines.append(f"| {r['model']} | {r['batch']} x {r['seq']} | {r['lora_layers']} | {kind} | {cell(p)} | "
                         f"{cell(a)} | {cell(q)} | {r['speedup'][kind]:.3f}x | {r['merge_speedup'][kind]:.3f}x |")
    lines += ["", f"versions: {report['versions']}; commit {report['commit']}.",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def parse(description: str, argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The command line this script and bench/cpu_gemm.py share: the models (validated), repetitions, torch
    threads (set here), output folder and date."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default="tiny,smollm2", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    return args, names


def header(args: argparse.Namespace, script: str, argv=None) -> dict:
    """A report's common fields: date, threads, repetitions, CPU, commit, versions and the command."""
    import peft
    import transformers

    return {"date": args.date, "threads": args.threads, "reps": args.reps,
            "cpu": f"{cpu_name()} ({os.cpu_count()} cores)", "commit": git_commit(ROOT),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
            "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])}


def write(report: dict, out: str, stem: str, text: str) -> None:
    """report as out/stem.json and text as out/stem.md; the text is also printed."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None) -> None:
    args, names = parse(__doc__.splitlines()[0], argv)
    report = header(args, "lean_lora.py", argv) | {"results": [measure(n, args.reps) for n in names]}
    write(report, args.out, f"cpu-lean-lora-{args.date}", markdown(report))


if __name__ == "__main__":
    main()

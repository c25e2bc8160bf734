"""fp32 GEMMs on the CPU: oneDNN (torch.ops.mkldnn._linear_pointwise) against torch's own op (MKL sgemm in the
official wheels), per call and through a RoleModel's whole backbone (run from the repo root):

    python bench/cpu_gemm.py [--models tiny,smollm2 --reps 5 --threads 1]
        -> bench/results/cpu-gemm-<date>.{md,json}

`calls`: the shapes our passes run (SmolLM2-135M's projections over a PPO batch's 1408 rows, the backward's dx
GEMM against [W + s B A | B], the fused lm head's chunks, decode steps, the tiny bench and demo models), each
timed as a loop of at least 50 ms of CPU time per measurement; `taken` says which backend ops.cpu_gemm's rule
picks for the shape. `backbone`: bench/lean_lora.py's models and batches (LoRA r 16 with random B), the
backbone's forward without grad with the policy adapter (a scoring pass), with the adapters off (the reference
pass), and forward + backward of mean(h^2) with the policy adapter (an update's pass), with cpu_gemm's backend
set to each in turn. Both sides alternate within each repetition (the order swapped each repetition); CPU time
of this process; medians with min - max.
"""

from __future__ import annotations

import sys
import time

import lean_lora as LL  # bench/lean_lora.py (this script's folder is on sys.path)
import torch
import torch.nn.functional as F

from rlhf_fast.ops import cpu_gemm

BACKENDS = ("onednn", "torch")

# (label, rows, in, out, form): form "linear" = x (rows, in) @ W (out, in)^T; "matmul" = a (rows, in) @ b (in, out)
CALLS = [
    ("SmolLM2 q / o proj", 1408, 576, 576, "linear"),
    ("SmolLM2 k / v proj", 1408, 576, 192, "linear"),
    ("SmolLM2 gate / up proj", 1408, 576, 1536, "linear"),
    ("SmolLM2 down proj", 1408, 1536, 576, "linear"),
    ("SmolLM2 backward dx, gate / up", 1408, 1536, 592, "matmul"),
    ("SmolLM2 backward dx, down", 1408, 576, 1552, "matmul"),
    ("SmolLM2 backward dx, q / o", 1408, 576, 592, "matmul"),
    ("SmolLM2 lm head logits, 128-row chunk", 128, 576, 49152, "linear"),
    ("SmolLM2 lm head grad_hidden, 128-row chunk", 128, 49152, 576, "matmul"),
    ("SmolLM2 log-prob block, 256 x 4096", 256, 576, 4096, "linear"),
    ("SmolLM2 decode, 16 rows, gate / up", 16, 576, 1536, "linear"),
    ("SmolLM2 decode, 64 rows, down", 64, 1536, 576, "linear"),
    ("tiny bench 2048 rows, 256 -> 256", 2048, 256, 256, "linear"),
    ("tiny bench 2048 rows, 256 -> 512", 2048, 256, 512, "linear"),
    ("demo 2560 rows, 128 -> 128", 2560, 128, 128, "linear"),
    ("demo 2560 rows, 128 -> 512", 2560, 128, 512, "linear"),
    ("small: 64 rows, 128 -> 128", 64, 128, 128, "linear"),
    ("small: 16 rows, 256 -> 256", 16, 256, 256, "linear"),
]


def _per_call(fn, budget: float = 0.05) -> float:
    """CPU seconds per call of fn, from a loop of at least `budget` seconds."""
    fn()
    n = 1
    while True:
        t = time.process_time()
        for _ in range(n):
            fn()
        dt = time.process_time() - t
        if dt >= budget:
            return dt / n
        n *= 4


def measure_calls(reps: int) -> list[dict]:
    op = cpu_gemm._OP
    out = []
    for label, rows, n_in, n_out, form in CALLS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, n_in, generator=g)
        w = torch.randn(n_out, n_in, generator=g) if form == "linear" else torch.randn(n_in, n_out, generator=g).t()
        fns = {"torch": (lambda x=x, w=w: F.linear(x, w)) if form == "linear" else (lambda x=x, w=w: x @ w.t()),
               "onednn": lambda x=x, w=w: op(x, w, None, "none", [], "")}
        times = {b: [] for b in BACKENDS}
        for rep in range(reps):
            for b in BACKENDS if rep % 2 == 0 else BACKENDS[::-1]:
                times[b].append(_per_call(fns[b]))
        s = {b: LL.summary(v) for b, v in times.items()}
        out.append({"label": label, "rows": rows, "in": n_in, "out": n_out, "form": form,
                    "macs": rows * n_in * n_out, "taken": "onednn" if cpu_gemm._takes_onednn(x, w, None) else "torch",
                    "times": s, "speedup": s["torch"]["median"] / s["onednn"]["median"]})
    return out


def measure_backbone(name: str, reps: int) -> dict:
    model = LL.build(name)
    with torch.no_grad():  # B != 0: the adapter's product is real work
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    shape = LL.MODELS[name]
    ids = torch.randint(0, model.lm_head.weight.shape[0], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(0))

    def forward(role):
        def run():
            with torch.no_grad(), model.role(role):
                model.backbone(input_ids=ids)
        return run

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with model.role("policy"):
            h = model.backbone(input_ids=ids).last_hidden_state
        h.pow(2).mean().backward()

    passes = {"forward": forward("policy"), "reference_forward": forward("reference"), "forward_backward": fwd_bwd}
    times = {f"{b}/{k}": [] for b in BACKENDS for k in passes}
    for b in BACKENDS:  # one untimed warm-up each
        cpu_gemm.set_backend(b)
        fwd_bwd()
    for rep in range(reps):
        for b in BACKENDS if rep % 2 == 0 else BACKENDS[::-1]:
            cpu_gemm.set_backend(b)
            for kind, fn in passes.items():
                t = time.process_time()
                fn()
                times[f"{b}/{kind}"].append(time.process_time() - t)
    cpu_gemm.set_backend("onednn")
    s = {k: LL.summary(v) for k, v in times.items()}
    return {"model": name, **shape, "times": s,
            "speedup": {k: s[f"torch/{k}"]["median"] / s[f"onednn/{k}"]["median"] for k in passes}}


def _cell(t: dict, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(t['median'] * scale)} ({fmt.format(t['min'] * scale)} - {fmt.format(t['max'] * scale)})"


def markdown(report: dict) -> str:
    lines = [f"# fp32 GEMMs on the CPU: oneDNN vs torch's op (MKL) ({report['date']})", "",
             f"CPU: {report['cpu']}, **{report['threads']} torch thread(s)**; {report['reps']} repetitions, the two "
             "backends alternating (order swapped each repetition), CPU time of the process; medians (min - max). "
             f"ops.cpu_gemm takes oneDNN for calls with >= {report['min_rows']} rows and >= 2^"
             f"{report['min_macs'].bit_length() - 1} multiply-adds (`taken`).", "",
             "## Calls", "",
             "| call | rows x in -> out | form | torch ms | oneDNN ms | torch / oneDNN | taken |",
             "|---|---|---|---:|---:|---:|---|"]
    for c in report["calls"]:
        t = c["times"]
        lines.append(f"| {c['label']} | {c['rows']} x {c['in']} -> {c['out']} | {c['form']} | "
                     f"{_cell(t['torch'], 1e3)} | {_cell(t['onednn'], 1e3)} | {c['speedup']:.2f}x | {c['taken']} |")
    lines += ["", "form: linear = x @ W^T with W (out, in) row-major (the layers' weights); matmul = a @ b with b "
              "(in, out) row-major, passed to oneDNN as the transposed view of b^T.", "",
              "## Whole backbone (RoleModel, LoRA r 16 on q, k, v, o, gate, up, down; random B)", "",
              "| model | tokens | pass | torch s | oneDNN s | torch / oneDNN |", "|---|---:|---|---:|---:|---:|"]
    for r in report["backbone"]:
        for kind in ("forward", "reference_forward", "forward_backward"):
            lines.append(f"| {r['model']} | {r['batch']} x {r['seq']} | {kind} | {_cell(r['times'][f'torch/{kind}'])}"
                         f" | {_cell(r['times'][f'onednn/{kind}'])} | {r['speedup'][kind]:.3f}x |")
    lines += ["", "forward: no grad, policy adapter on (merged per call); reference_forward: adapters off (the base "
              "alone); forward_backward: forward + backward of mean(h^2), policy adapter on.", "",
              f"versions: {report['versions']}; commit {report['commit']}.", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args, names = LL.parse(__doc__.splitlines()[0], argv)
    if cpu_gemm._OP is None:
        sys.exit("this torch has no oneDNN linear op (torch.ops.mkldnn._linear_pointwise): nothing to compare")
    report = LL.header(args, "cpu_gemm.py", argv) | {
        "min_rows": cpu_gemm.MIN_ROWS, "min_macs": cpu_gemm.MIN_MACS,
        "calls": measure_calls(args.reps), "backbone": [measure_backbone(n, args.reps) for n in names]}
    LL.write(report, args.out, f"cpu-gemm-{args.date}", markdown(report))


if __name__ == "__main__":
    main()

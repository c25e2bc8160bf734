"""Peak RSS of rlhf_fast's PPO step on SmolLM2-135M with the lean LoRA forward and with PEFT's own, on the peers
bench's settings (bench/peers/ppo_vs_trl.py: 16 prompts of 40 tokens x 48 new tokens, 4 PPO epochs, LoRA r=16,
fp32, one thread). Run from the repo root:

    .venv/bin/python bench/ppo_step_rss.py [--steps 2] -> bench/results/cpu-ppo-step-rss-<date>.{md,json}

One fresh process per forward (the parent runs itself as a child with --child lean|peft, one after the other); in
each, a thread samples VmRSS every 20 ms with the phase of the step it falls in (generation, experience, the policy
and value losses' forwards and backwards, the optimizer). `peft` switches the layers back to PEFT's class before
training (rlhf_fast.models.lean_lora.install made a no-op), everything else is the same code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ["generation", "experience", "policy_fwd", "policy_bwd", "value_fwd", "value_bwd", "optimizer"]


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2 ** 20


def child(forward: str, steps: int, folder: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, os.path.join(ROOT, "bench", "peers"))
    import ppo_vs_trl as peers  # the peers bench's model folder, settings and targets

    if forward == "peft":
        import rlhf_fast.models.lean_lora as lean_lora

        lean_lora.install = lambda module: 0
    import torch

    import rlhf_fast.rl.rollout as rollout
    import rlhf_fast.trainers.loop as loop
    import rlhf_fast.trainers.ppo as ppo
    from rlhf_fast.models import LoraSettings, RoleModel
    from rlhf_fast.trainers import OptimConfig

    torch.set_num_threads(1)
    if not os.path.exists(os.path.join(folder, peers.MODEL_INFO)):
        os.makedirs(folder, exist_ok=True)
        peers.build_smollm2(folder)
    phase, samples, stop = ["setup"], [], [False]

    def sampler():
        while not stop[0]:
            samples.append((_rss_gib(), phase[0]))
            time.sleep(0.02)

    def wrap(obj, name, label, after):
        fn = getattr(obj, name)

        def inner(*a, **k):
            phase[0] = label
            try:
                return fn(*a, **k)
            finally:
                phase[0] = after

        setattr(obj, name, inner)

    wrap(rollout, "sample", "generation", "generation")
    wrap(RoleModel, "experience", "experience", "experience")
    wrap(ppo, "ppo_policy_loss", "policy_fwd", "policy_bwd")
    wrap(ppo, "ppo_value_loss", "value_fwd", "value_bwd")
    wrap(loop.Run, "apply", "optimizer", "optimizer")
    threading.Thread(target=sampler, daemon=True).start()
    s = peers.SETTINGS
    lora = LoraSettings(r=s["lora_r"], alpha=s["lora_alpha"], dropout=0.0, target_modules=list(peers.TARGETS))
    model = RoleModel.from_pretrained(folder, lora=lora, dtype=torch.float32)
    loop.eos_id = lambda tokenizer, model=None: None  # EOS ignored, as in the peers bench
    model.eos_token_id = None
    with open(os.path.join(folder, "prompts.jsonl")) as f:
        prompts = [{"prompt_ids": json.loads(line)["prompt_ids"]} for line in f]
    cfg = ppo.PPOConfig(
        model=folder, data=os.path.join(folder, "prompts.jsonl"), out_dir=os.path.join(folder, f"out-{forward}"),
        overwrite=True, seed=0, device="cpu", dtype="float32", batch_size=s["batch_prompts"], max_steps=steps,
        response_length=s["response_length"], temperature=1.0, top_p=1.0, top_k=0, ppo_epochs=s["ppo_epochs"],
        num_minibatches=s["num_minibatches"], kl_coef=s["kl_coef"], kl_controller=s["kl_controller"],
        kl_estimator=s["kl_estimator"], gamma=s["gamma"], lam=s["lam"], clip_low=s["clip"], value_clip=s["value_clip"],
        vf_coef=s["vf_coef"], entropy_coef=0.0, whiten_advantages=s["whiten_advantages"],
        normalize_scores=s["normalize_scores"], missing_eos_penalty=s["missing_eos_penalty"], loss_agg=s["loss_agg"],
        log_every=1, checkpoint_every=0, checkpoint_minutes=0, progress=False, gradient_checkpointing=False,
        optim=OptimConfig(lr=s["lr"], weight_decay=0.0, lr_scheduler="constant", warmup_steps=0, max_grad_norm=0.0),
        lora=lora)
    before = _rss_gib()
    lean = sum(type(m).__name__ == "LeanLoraLinear" for m in model.modules())
    t = time.process_time()
    ppo.train_ppo(cfg, model=model, prompts=prompts)
    cpu = time.process_time() - t
    stop[0] = True
    per = {p: max((r for r, q in samples if q == p), default=None) for p in PHASES}
    peak = max(r for r, _ in samples)
    return {"forward": forward, "lean_layers": lean, "rss_before_train_gib": before, "peak_gib": peak,
            "peak_phase": next(q for r, q in samples if r >= peak - 1e-9), "per_phase_gib": per,
            "cpu_s": cpu, "steps": steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--folder", default=os.path.join("/tmp", "rlhf_fast-smollm2-peers"),
                    help="where the SmolLM2 transformers folder is built once (dequantised from the GGUF)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--child", choices=["lean", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.folder)), flush=True)
        return
    runs = []
    for forward in ("peft", "lean"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", forward, "--steps", str(args.steps),
                              "--folder", args.folder], capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    import peft
    import torch
    import transformers

    from rlhf_fast.bench.measure import git_commit

    commit = git_commit(ROOT)
    report = {"date": args.date, "commit": commit, "runs": runs,
              "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"}
    lines = [f"# PPO step peak RSS, SmolLM2-135M: lean LoRA forward vs PEFT's (CPU, {args.date})", "",
             "The peers bench's settings (bench/peers/ppo_vs_trl.py: 16 prompts of 40 tokens x 48 new tokens, 4 PPO "
             "epochs, LoRA r=16 on every linear of the blocks, fp32, 1 thread); one fresh process per forward, "
             f"{args.steps} PPO steps each; VmRSS sampled every 20 ms, the maximum per phase (GiB).", "",
             "| forward | lean layers | RSS before training | " + " | ".join(PHASES) + " | peak | CPU s |",
             "|---|---:|---:|" + "---:|" * (len(PHASES) + 2)]
    for r in runs:
        cells = " | ".join("" if r["per_phase_gib"][p] is None else f"{r['per_phase_gib'][p]:.3f}" for p in PHASES)
        lines.append(f"| {r['forward']} | {r['lean_layers']} | {r['rss_before_train_gib']:.3f} | {cells} | "
                     f"**{r['peak_gib']:.3f}** ({r['peak_phase']}) | {r['cpu_s']:.1f} |")
    lines += ["", f"versions: {report['versions']}; commit {commit}.",
              f"Command: `python bench/ppo_step_rss.py --steps {args.steps}`", ""]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu-ppo-step-rss-{args.date}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

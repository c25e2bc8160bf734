"""A PPO run killed with SIGKILL after a checkpoint, then resumed, ends exactly where an uninterrupted run
ends: same adapters, heads, KL controller, score statistics and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from rlhf_fast.trainers import checkpoint as ckpt

SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    torch.set_num_threads(1)
    from rlhf_fast.trainers import OptimConfig, PPOConfig, train_ppo

    def reward(seq, attn, resp):  # share of response tokens in a quarter of the vocabulary
        return (torch.isin(seq, torch.arange(3, 27)) & (resp != 0)).sum(1).float() / resp.sum(1).clamp(min=1)

    def build(kw):
        return PPOConfig(**kw, optim=OptimConfig(lr=1e-2))

    def stall(step, model):  # leaves the test time to kill the process after the step-2 checkpoint
        if step >= 3 and "--stall" in sys.argv:  # the step-2 checkpoint is written after step 2 logs
            time.sleep(60)

    if __name__ == "__main__":
        train_ppo(build(json.loads(sys.argv[1])), reward_fn=reward, callback=stall)
''')


def test_sigkill_then_resume_matches_uninterrupted(tiny_model, data_files, tmp_path):
    script = tmp_path / "run_ppo.py"
    script.write_text(SCRIPT)
    kw = dict(model=tiny_model, data=data_files["prompts"], batch_size=8, max_steps=4, response_length=5,
              ppo_epochs=2, num_minibatches=2, checkpoint_every=2, progress=False, kl_controller="adaptive",
              kl_target=0.05, kl_horizon=100, normalize_scores=True, ptx_data=data_files["ptx"], ptx_coef=0.1)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, *extra, wait=True):
        args = [sys.executable, str(script), json.dumps(kw | {"out_dir": str(out)}), *extra]
        if wait:
            subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
            return None
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ns = {"__name__": "uninterrupted"}  # the uninterrupted run in this process: one interpreter start fewer
    exec(SCRIPT, ns)
    ns["train_ppo"](ns["build"](kw | {"out_dir": str(tmp_path / "full")}), reward_fn=ns["reward"])

    out = tmp_path / "killed"
    proc = run(out, "--stall", wait=False)
    deadline = time.time() + 240
    while ckpt.latest_checkpoint(str(out / "checkpoints")) is None:
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "model").exists()  # killed before the end: no final model, and no corrupt checkpoint
    assert os.path.basename(ckpt.latest_checkpoint(str(out / "checkpoints"))) == "step-00000002"

    kw["resume"] = True
    run(out)

    want = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004" / "trainable.pt")
    got = torch.load(out / "checkpoints" / "step-00000004" / "trainable.pt")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    state = [json.load(open(d / "checkpoints" / "step-00000004" / "state.json")) for d in (tmp_path / "full", out)]
    assert state[0] == state[1]
    rows = [[json.loads(ln) for ln in open(d / "metrics.jsonl")] for d in (tmp_path / "full", out)]
    drop = ("tokens/s", "peak_memory_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]

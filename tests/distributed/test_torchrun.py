"""The DDP and FSDP2 tiers with real processes: torchrun, gloo on the CPU, 2 processes against 1 with the same global
batch.

Each trainer makes 3 plain-SGD steps on a tiny Llama with examples of unequal lengths (so the two processes hold
unequal token counts). After them the adapters agree bit for bit across the processes, and match one process
within 1e-6. The RL trainers sample fixed responses (driver.fixed_sample), so both sides see the same rollouts:
with real sampling each process draws its own responses, so the runs are equal in distribution, not in value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.trainers import checkpoint as ckpt
from tests.tiny import build_tiny_model, make_data

ROOT = Path(__file__).resolve().parents[2]
DRIVER = str(Path(__file__).with_name("driver.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SGD = {"optimizer": "sgd", "lr": 0.2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {"model": str(build_tiny_model(root / "model", "llama")), **make_data(root)}


def options(name: str, files: dict) -> dict:
    common = {"model": files["model"], "batch_size": 4, "max_steps": 3, "progress": False, "optim": SGD}
    return common | {
        "sft": {"data": files["sft"], "merge": False},
        "rm": {"data": files["pairs"], "val_fraction": 0.2},
        "dpo": {"data": files["pairs"]},
        "ppo": {"data": files["prompts"], "response_length": 5, "ppo_epochs": 2, "num_minibatches": 2,
                "kl_controller": "adaptive", "kl_target": 0.05, "kl_horizon": 100, "normalize_scores": True,
                "ptx_data": files["ptx"], "ptx_coef": 0.1, "ptx_batch_size": 2},
        "grpo": {"data": files["prompts"], "num_generations": 4, "max_completion_length": 6, "num_minibatches": 2,
                 "num_iterations": 2, "loss_type": "dr_grpo", "scale_rewards": "batch", "beta": 0.1},
    }[name]


def run(trainer: str, kw: dict, nproc: int, *, check: bool = True, timeout: float = 300):
    cmd = (TORCHRUN if nproc == 2 else [sys.executable]) + [DRIVER, trainer, json.dumps(kw)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def params(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"params-rank{rank}.pt")["params"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def held(out: Path, rank: int) -> dict:
    return torch.load(out / f"params-rank{rank}.pt")["held"]


@pytest.mark.parametrize("tier", ["ddp", "fsdp2"])
@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_two_processes_equal_one(trainer, tier, files, tmp_path):
    kw = options(trainer, files)
    run(trainer, kw | {"out_dir": str(tmp_path / "one")}, 1)
    run(trainer, kw | {"out_dir": str(tmp_path / "two"), "distributed": tier}, 2)
    one, two0, two1 = params(tmp_path / "one"), params(tmp_path / "two", 0), params(tmp_path / "two", 1)
    h0, h1 = held(tmp_path / "two", 0), held(tmp_path / "two", 1)
    if tier == "fsdp2":  # each process holds half of the blocks' base weights; embeddings, norm, lm_head whole
        assert h0["sharded"] > h0["whole"] > 0 and h0["sharded_local"] + h1["sharded_local"] == h0["sharded"]
        assert h0["sharded_local"] == h1["sharded_local"]
    else:
        assert h0["sharded"] == 0
    for k in two0:  # the processes hold the very same adapters
        assert torch.equal(two0[k], two1[k]), k
    trained = [k for k in one if "lora_B" in k and one[k].abs().max() > 0]  # B starts at 0: these were trained
    assert trained, "no adapter moved: the comparison would prove nothing"
    diff = max_diff(one, two0)
    print(f"{trainer} {tier}: max |1 process - 2 processes| = {diff:.3g}")
    assert diff < 1e-6
    rows = [[json.loads(ln) for ln in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]  # rank 0 alone wrote the log, once
    keys = ("objective/kl", "objective/scores", "objective/kl_coef") if trainer == "ppo" else ("loss",)
    for a, b in zip(*rows):  # logged: the global batch's values
        for k in keys:
            if k in a:
                assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert not (tmp_path / "two" / ".tmp").exists()
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["step-00000003"]


@pytest.mark.parametrize("tier", ["ddp", "fsdp2"])
def test_kill_one_rank_then_resume_all(tier, files, tmp_path):
    """SIGKILL one process after the step-2 checkpoint: torchrun ends the other; the resumed pair ends where an
    uninterrupted pair ends, bit for bit."""
    kw = options("ppo", files) | {"max_steps": 4, "checkpoint_every": 2, "distributed": tier}
    run("ppo", kw | {"out_dir": str(tmp_path / "full")}, 2)

    out = tmp_path / "killed"
    cmd = TORCHRUN + [DRIVER, "ppo", json.dumps(kw | {"out_dir": str(out), "stall_after": 2})]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "pid-rank1").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.1)
    time.sleep(0.2)  # the pid is written whole
    os.kill(int((out / "pid-rank1").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun stopped rank 0 and failed: nothing hangs
    assert not (out / "model").exists()
    assert os.path.basename(ckpt.latest_checkpoint(str(out / "checkpoints"))) == "step-00000002"

    run("ppo", kw | {"out_dir": str(out), "resume": True}, 2)
    want = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004" / "trainable.pt")
    got = torch.load(out / "checkpoints" / "step-00000004" / "trainable.pt")
    for k in want:
        assert torch.equal(want[k], got[k]), k
    state = [json.load(open(d / "checkpoints" / "step-00000004" / "state.json")) for d in (tmp_path / "full", out)]
    assert state[0] == state[1]  # sampler, KL controller, score moments


@pytest.mark.parametrize("tier", ["ddp", "fsdp2"])
def test_generate_smoke(tier, files, tmp_path):
    """Real sampling (each process its own stream) through PPO on 2 processes: the adapters stay identical on both
    and the model is saved once. Under FSDP2 the processes decode in lockstep (each forward gathers the shards)
    though their responses end at different steps."""
    kw = options("ppo", files) | {"fixed_rollouts": False, "max_steps": 2, "out_dir": str(tmp_path / "gen"),
                                  "distributed": tier}
    run("ppo", kw, 2)
    a, b = params(tmp_path / "gen", 0), params(tmp_path / "gen", 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "gen" / "model").is_dir()


def cli(*args, nproc: int = 1, timeout: float = 120):
    cmd = (TORCHRUN if nproc == 2 else [sys.executable]) + ["-m", "rlhf_fast.cli", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_batch_not_divisible_by_world(files, tmp_path):
    out = tmp_path / "out"
    p = cli("sft", "--model", files["model"], "--data", files["sft"], "--out_dir", str(out), "--batch_size", "3",
            "--max_steps", "1", "--no-progress", nproc=2)
    assert p.returncode != 0
    assert "--batch_size 3 is global" in p.stderr and "divisible by the 2 processes" in p.stderr
    assert not out.exists()  # refused before anything was written


def test_mismatched_options_across_ranks(files, tmp_path):
    out = tmp_path / "out"
    p = run("sft", options("sft", files) | {"out_dir": str(out), "lr_by_rank": True}, 2, check=False)
    assert p.returncode != 0
    assert "different options" in p.stderr and "--lr 0.4 on rank 1, 0.2 on rank 0" in p.stderr
    assert not out.exists()


def test_fsdp2_without_torchrun(files, tmp_path):
    args = ["sft", "--model", files["model"], "--data", files["sft"], "--out_dir", str(tmp_path / "o"),
            "--distributed", "fsdp2"]
    p = cli(*args)
    assert p.returncode == 2
    assert "fsdp2 needs several processes" in p.stderr and "torchrun" in p.stderr
    assert not (tmp_path / "o").exists()


def test_fsdp2_sft_merges_and_saves_the_whole_base(files, tmp_path):
    """SFT's merge into a sharded base, gathered by rank 0 for the saved base: the same base as one process writes
    (the pipeline's next stage loads it), the same fingerprint."""
    from safetensors.torch import load_file

    kw = options("sft", files) | {"merge": True}
    run("sft", kw | {"out_dir": str(tmp_path / "one")}, 1)
    run("sft", kw | {"out_dir": str(tmp_path / "two"), "distributed": "fsdp2"}, 2)
    one, two = (load_file(tmp_path / d / "model" / "base" / "model.safetensors") for d in ("one", "two"))
    base = load_file(Path(files["model"]) / "model.safetensors")
    assert one.keys() == two.keys()
    assert max(float((one[k] - base[k]).abs().max()) for k in one) > 1e-3  # the merge changed the base
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6
    fp = [json.load(open(tmp_path / d / "model" / "role_model.json"))["base_fingerprint"] for d in ("one", "two")]
    assert fp[0] == fp[1]


def test_kto_and_raft_refuse_several_processes(files, tmp_path, monkeypatch):
    from rlhf_fast.trainers import KTOConfig, RAFTConfig, train_kto, train_raft
    from rlhf_fast.trainers.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="kto .* does not run on several processes"):
        train_kto(KTOConfig(model=files["model"], data=files["sft"], out_dir=str(tmp_path / "k")))
    with pytest.raises(ConfigError, match="raft .* does not run on several processes"):
        train_raft(RAFTConfig(model=files["model"], data=files["prompts"], out_dir=str(tmp_path / "r"),
                              reward_funcs="format"))
    assert not (tmp_path / "k").exists() and not (tmp_path / "r").exists()


def test_fsdp2_checkpoint_resumes_on_one_process(files, tmp_path):
    """An FSDP2 checkpoint holds the adapters whole: 2 steps on 2 processes, then --resume on one process to step 3,
    ends where 3 steps on one process end."""
    kw = options("sft", files)
    run("sft", kw | {"out_dir": str(tmp_path / "one")}, 1)
    run("sft", kw | {"out_dir": str(tmp_path / "mixed"), "max_steps": 2, "distributed": "fsdp2"}, 2)
    run("sft", kw | {"out_dir": str(tmp_path / "mixed"), "resume": True}, 1)
    assert max_diff(params(tmp_path / "one"), params(tmp_path / "mixed")) < 1e-6

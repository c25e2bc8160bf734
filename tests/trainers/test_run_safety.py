"""The out_dir and checkpoint safety of the shared step loop (trainers/loop.py Run, trainers/checkpoint.py): a new
run refuses an out_dir holding another run, rotation deletes only the current run's checkpoints, a second
process is locked out, damaged checkpoints and logs are skipped with a warning, leftovers of a kill are removed,
checkpoints are written by time, non-finite updates are undone and a diverged run stops."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import ConfigError, OptimConfig, PPOConfig, SFTConfig, train_ppo, train_sft
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import loop as L

ENV = dict(os.environ, OMP_NUM_THREADS="1")
EXE = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")

# A child process running SFT; it stalls (so the test can act on it) from step `stall_at` on, or, with
# `stall_in_final_save`, inside the final model save after the heads were written.
CHILD = textwrap.dedent('''
    import json, sys, time, torch
    torch.set_num_threads(1)
    import rlhf_fast.models.io as io
    from rlhf_fast.trainers import OptimConfig, SFTConfig, train_sft

    kw = json.loads(sys.argv[1])
    stall_at = kw.pop("stall_at", None)
    if kw.pop("stall_in_final_save", False):
        write = io.save_file
        def slow(*a, **k):
            write(*a, **k)
            time.sleep(120)
        io.save_file = slow

    def stall(step, model):
        if stall_at is not None and step >= stall_at:
            time.sleep(120)

    train_sft(SFTConfig(**kw, optim=OptimConfig(lr=3e-3)), callback=stall)
''')


def sft_cfg(tiny_model, data_files, out, **kw):
    base = dict(model=tiny_model, data=data_files["sft"], out_dir=str(out), batch_size=8, max_steps=4,
                progress=False, merge=False, optim=OptimConfig(lr=3e-3))
    return SFTConfig(**(base | kw))


def with_attrs(cfg, **attrs):
    """Options the lead adds to TrainConfig (overwrite, checkpoint_minutes): set them whether or not they exist."""
    for k, v in attrs.items():
        setattr(cfg, k, v)
    return cfg


def steps(out) -> list[int]:
    return [int(os.path.basename(p)[len("step-"):]) for p in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))]


def rows(out) -> list[dict]:
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def policy(result) -> list[torch.Tensor]:
    return [p.detach().clone() for p in result["model"].role_parameters("policy")]


def spawn(script, kw: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), json.dumps(kw)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for(cond, proc, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the child ended before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------- 1. reused out_dir
def test_new_run_refuses_an_out_dir_holding_another_run(tiny_model, data_files, tmp_path):
    out = tmp_path / "o"
    train_sft(sft_cfg(tiny_model, data_files, out, checkpoint_every=1, keep_checkpoints=2))
    before = {f: open(f, "rb").read() for f in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(f)}
    with pytest.raises(ConfigError, match="holds another run") as e:
        train_sft(sft_cfg(tiny_model, data_files, out, max_steps=2, checkpoint_every=1))
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    after = {f: open(f, "rb").read() for f in before}
    assert after == before and steps(out) == [3, 4]  # nothing of the earlier run was touched

    old_id = ckpt.read_run_info(str(out / "checkpoints" / "step-00000004"))["run_id"]
    with pytest.warns(UserWarning, match="overwrite: deleted the earlier run"):
        train_sft(with_attrs(sft_cfg(tiny_model, data_files, out, max_steps=2, checkpoint_every=1), overwrite=True))
    assert steps(out) == [1, 2] and [r["step"] for r in rows(out)] == [1, 2]
    new_id = ckpt.read_run_info(str(out / "checkpoints" / "step-00000002"))["run_id"]
    assert new_id != old_id

    # the resumed run is the same run: it keeps its id and rotates its own checkpoints
    train_sft(sft_cfg(tiny_model, data_files, out, max_steps=4, checkpoint_every=1, resume=True))
    assert steps(out) == [3, 4] and [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert ckpt.read_run_info(str(out / "checkpoints" / "step-00000004"))["run_id"] == new_id

    with pytest.raises(ConfigError, match="exclude each other"):
        train_sft(with_attrs(sft_cfg(tiny_model, data_files, out, resume=True), overwrite=True))


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = L.build_scheduler(opt, OptimConfig(), 10)
    root = str(tmp_path / "checkpoints")
    save = dict(params=[("w", w)], optimizer=opt, scheduler=sched, state={}, keep=2)
    for step in (11, 12):
        ckpt.save_checkpoint(root, step, run_id="old", **save)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, run_id="new", **save)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == \
        ["step-00000002", "step-00000003", "step-00000011", "step-00000012"]


# ----------------------------------------------------------------------------------------- 2. the lock
def test_second_process_is_locked_out_until_the_first_dies(tiny_model, data_files, tmp_path, capsys):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "o"
    kw = dict(model=tiny_model, data=data_files["sft"], out_dir=str(out), batch_size=8, max_steps=3,
              checkpoint_every=1, keep_checkpoints=5, progress=False, merge=False, stall_at=2)
    first = spawn(script, kw)
    try:
        wait_for(lambda: steps(out) == [1], first, "its step-1 checkpoint")
        argv = ["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", str(out), "--max_steps", "3",
                "--batch_size", "8", "--lr", "0.003", "--no-progress", "--no-merge", "--resume"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and str(out) in err and f"pid {first.pid}" in err
        assert first.poll() is None and steps(out) == [1]  # the running one was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert cli.main(argv) == 0  # the OS released the killed process's lock
    assert steps(out) == [1, 3] and [r["step"] for r in rows(out)] == [1, 2, 3]


# ----------------------------------------------------------------------------------------- 4. non-finite
def test_update_leaving_blown_up_weights_is_undone():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = L.build_scheduler(opt, OptimConfig(), 10)
    (w * w).sum().backward()
    assert L.apply_gradients((w * w).sum(), [w], opt, sched, 1.0)[0]  # one good update: optimiser state exists
    before = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    opt.param_groups[0]["lr"] = 1e30  # a finite loss and gradient, then weights of ~1e30
    loss = (w * w).sum()
    loss.backward()
    ok, gnorm = L.apply_gradients(loss, [w], opt, sched, 1.0)
    assert not ok and gnorm > 0
    assert torch.equal(w.detach(), before) and w.grad is None
    assert opt.state[w].keys() == state.keys() and all(torch.equal(opt.state[w][k], v) for k, v in state.items())
    assert sched.last_epoch == 1  # the schedule did not advance on the undone update


def test_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    w = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    opt = torch.optim.AdamW([w], lr=0.1)
    with pytest.raises(ValueError, match="non-finite weights"):
        ckpt.save_checkpoint(str(tmp_path), 1, params=[("w", w)], optimizer=opt,
                             scheduler=L.build_scheduler(opt, OptimConfig(), 10), state={})
    assert os.listdir(tmp_path) == []


def test_diverging_sft_stops_and_saves_no_model(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    start = [p.detach().clone() for p in model.role_parameters("policy")]
    c = sft_cfg(tiny_model, data_files, tmp_path, max_steps=8, checkpoint_every=1, keep_checkpoints=10, merge=True,
                optim=OptimConfig(lr=1e30))
    with pytest.raises(L.TrainingDiverged, match=r"no update applied in the last 3 steps \(1-3\)"):
        train_sft(c, model=model)
    assert not (tmp_path / "model").exists()  # no merged base, no adapters
    assert [r["skipped_steps"] for r in rows(tmp_path)] == [1, 2, 3]
    for p, s in zip(model.role_parameters("policy"), start):
        assert torch.equal(p.detach(), s)  # every update was undone
    for path in ckpt.list_checkpoints(str(tmp_path / "checkpoints")):
        for t in torch.load(os.path.join(path, "trainable.pt")).values():
            assert bool(torch.isfinite(t).all()) and float(t.abs().max()) < L.BLOWN_UP


def test_diverging_ppo_stops_instead_of_crashing_in_sampling(tiny_model, data_files, tmp_path):
    c = PPOConfig(model=tiny_model, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=4, max_steps=5,
                  response_length=4, ppo_epochs=2, progress=False, optim=OptimConfig(lr=1e30))
    with pytest.raises(L.TrainingDiverged, match="training diverged"):
        train_ppo(c, reward_fn=lambda s, a, m: m.sum(1).float())
    assert not (tmp_path / "model").exists()


def test_the_command_reports_divergence_with_exit_code_1(tiny_model, data_files, tmp_path):
    r = subprocess.run([EXE, "sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", str(tmp_path),
                        "--max_steps", "6", "--batch_size", "4", "--lr", "1e30", "--no-progress"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "training diverged" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------------------- 5. damage
@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data_files, tmp_path_factory):
    """The policy adapter after 6 SFT steps without interruption."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (conftest's _one_thread runs after module fixtures): same sums
    try:
        return policy(train_sft(sft_cfg(tiny_model, data_files, tmp_path_factory.mktemp("full"), max_steps=6)))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("damage", ["truncated trainable.pt", "no state.json"])
def test_resume_skips_a_damaged_latest_checkpoint(damage, uninterrupted, tiny_model, data_files, tmp_path):
    train_sft(sft_cfg(tiny_model, data_files, tmp_path, checkpoint_every=1, keep_checkpoints=5))
    latest = tmp_path / "checkpoints" / "step-00000004"
    if damage == "no state.json":
        os.remove(latest / "state.json")
    else:
        data = (latest / "trainable.pt").read_bytes()
        (latest / "trainable.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000004"):
        res = train_sft(sft_cfg(tiny_model, data_files, tmp_path, max_steps=6, resume=True))
    for a, b in zip(uninterrupted, policy(res)):
        assert torch.equal(a, b)  # resumed from step 3 and ended where the uninterrupted run ends
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 7))


def test_resume_with_no_readable_checkpoint_is_a_usage_error(tiny_model, data_files, tmp_path):
    train_sft(sft_cfg(tiny_model, data_files, tmp_path, max_steps=2, checkpoint_every=1))
    for path in ckpt.list_checkpoints(str(tmp_path / "checkpoints")):
        os.remove(os.path.join(path, "optimizer.pt"))
    with pytest.raises(ConfigError, match="no readable checkpoint"), pytest.warns(UserWarning):
        train_sft(sft_cfg(tiny_model, data_files, tmp_path, resume=True))


def test_resume_drops_a_partial_last_metrics_line(tiny_model, data_files, tmp_path):
    train_sft(sft_cfg(tiny_model, data_files, tmp_path, max_steps=2))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed while the row was written
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropping a partial last line"):
        train_sft(sft_cfg(tiny_model, data_files, tmp_path, resume=True))
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_a_malformed_metrics_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON object"):
        L.MetricsLogger(str(path), resume_step=2)


def test_a_kill_during_the_final_save_leaves_nothing_behind_after_the_next_run(tiny_model, data_files, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "o"
    kw = dict(model=tiny_model, data=data_files["sft"], out_dir=str(out), batch_size=8, max_steps=2, progress=False,
              merge=True, stall_in_final_save=True)
    child = spawn(script, kw)
    try:
        wait_for(lambda: glob.glob(str(out / ".model.tmp-*" / "heads.safetensors")), child, "the final save")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert glob.glob(str(out / ".model.tmp-*")) and not (out / "model").exists()
    res = train_sft(sft_cfg(tiny_model, data_files, out, max_steps=2, merge=True, resume=True))
    assert not glob.glob(str(out / ".model.tmp-*")) and not glob.glob(str(out / ".*tmp*"))
    assert os.path.isfile(os.path.join(res["out"], "base", "config.json"))


# ----------------------------------------------------------------------------------------- 6. by time
@pytest.mark.parametrize("minutes, want", [(1e-9, [1, 2, 3, 4]), (0.0, [4])])
def test_checkpoints_are_written_by_time(minutes, want, tiny_model, data_files, tmp_path):
    train_sft(with_attrs(sft_cfg(tiny_model, data_files, tmp_path, keep_checkpoints=10), checkpoint_minutes=minutes))
    assert steps(tmp_path) == want  # tiny: every step (a step takes longer than 60 ns); 0: off, only the end


def test_finish_writes_the_final_checkpoint_inside_the_block(tmp_path):
    """A trainer calls run.finish() before changing the weights outside training (SFT's merge, RM's offset) and
    saves the model inside the block, under the lock: the checkpoint holds the trained weights."""
    from rlhf_fast.trainers import TrainConfig

    w = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=2, max_steps=3, progress=False, optim=OptimConfig(lr=0.1))
    with L.Run(cfg, "toy", [("w", w)], 4) as run:
        for _ in run:
            (w - 1.0).pow(2).sum().backward()
            run.apply((w - 1.0).pow(2).sum())
        run.finish()
        trained = w.detach().clone()
        with torch.no_grad():
            w.add_(100.0)  # e.g. a merge into the base that resets the adapter
        with pytest.raises(ConfigError, match="is in use by another run"):  # still locked here
            L.Run(cfg, "toy", [("w", w)], 4)
    saved = torch.load(tmp_path / "checkpoints" / "step-00000003" / "trainable.pt")["w"]
    assert torch.equal(saved, trained) and steps(tmp_path) == [3]

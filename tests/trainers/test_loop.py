"""The shared step loop's parts: non-finite step skipping, schedules, checkpoints, metrics, data order."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import loop as C
from rlhf_fast.trainers.config import OptimConfig


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_non_finite_step_is_skipped(bad):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = C.build_scheduler(opt, OptimConfig(), 10)
    loss = (w * (torch.tensor([1.0, float("nan"), 1.0]) if bad == "grad" else 1.0)).sum()
    if bad == "loss":
        loss = loss * float("inf")
    loss.backward()
    ok, _ = C.apply_gradients(loss, [w], opt, sched, 1.0)
    assert not ok and torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    assert sched.last_epoch == 0  # the schedule does not advance either
    (w * 2).sum().backward()
    ok, _ = C.apply_gradients((w * 2).sum(), [w], opt, sched, 1.0)
    assert ok and not torch.equal(w.detach(), torch.ones(3))


def test_checkpoint_round_trip_and_crash_leftovers(tmp_path):
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = C.build_scheduler(opt, OptimConfig(warmup_steps=3), 10)
    w.sum().backward()
    opt.step()
    sched.step()
    root = str(tmp_path / "ck")
    os.makedirs(os.path.join(root, ".tmp-step-00000009-123"))  # a save killed half-way
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, params=[("w", w)], optimizer=opt, scheduler=sched,
                             state={"x": step}, keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert not any(n.startswith(".tmp") for n in os.listdir(root))
    saved, rng_next = w.detach().clone(), torch.rand(3)
    with torch.no_grad():
        w.zero_()
    opt2 = torch.optim.AdamW([w], lr=0.1)
    sched2 = C.build_scheduler(opt2, OptimConfig(warmup_steps=3), 10)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), params=[("w", w)], optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3, "x": 3}
    assert torch.equal(w.detach(), saved) and sched2.last_epoch == sched.last_epoch
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), rng_next)  # RNG state restored to the moment of the save


def test_metrics_logger_truncates_on_resume(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = C.MetricsLogger(path)
    for s in range(1, 6):
        log.log(s, {"loss": torch.tensor(float(s))})
    C.MetricsLogger(path, resume_step=3)
    rows = [json.loads(ln) for ln in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 1.0


def test_batch_sampler_resumes_the_same_order():
    a = C.BatchSampler(10, 4, seed=3)
    seen = [a.next() for _ in range(3)]
    b = C.BatchSampler(10, 4, seed=3)
    b.next()
    state = b.state_dict()
    c = C.BatchSampler(10, 4, seed=3)
    c.load_state_dict(state)
    assert [c.next(), c.next()] == seen[1:]
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0] + seen[1]))  # no repeats within an epoch


def test_metrics_go_to_tensorboard_when_it_imports(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = C.MetricsLogger(str(tmp_path / "m.jsonl"), tensorboard_dir=str(tmp_path / "tb"))
    log.log(3, {"objective/kl": torch.tensor(0.5)})
    log.close()
    assert written == [("objective/kl", 0.5, 3), "closed"]

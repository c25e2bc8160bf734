"""CPU benchmark of GAE at B = 64, T = 4096 (fp32): native C++ (rlhf_fast._C) and the torch-vectorised
backend against the reverse Python loop over time that TRL, OpenRLHF and verl use.

Run: `make bench` or `pytest bench/test_bench_gae_cpu.py --benchmark-enable --benchmark-only`.
Not a timed test: nothing here asserts a speed; every case first checks its output against the loop.
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_fast.bench.measure import peer_python_loop_gae as python_loop_gae

B, T = 64, 4096
GAMMA, LAM = 1.0, 0.95


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    # Right padding only (no interior holes), so the peers' loop and the exact semantics agree.
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return rewards, values, mask


@pytest.fixture(scope="module")
def expected(inputs):
    rewards, values, mask = inputs
    adv, _ = python_loop_gae(rewards.double(), values.double(), mask.double(), GAMMA, LAM)
    return adv * mask


def _check(adv, expected, mask):
    torch.testing.assert_close((adv * mask).double(), expected, rtol=1e-4, atol=1e-3)


def test_gae_python_loop(benchmark, inputs, expected):
    rewards, values, mask = inputs
    benchmark.group = f"gae B={B} T={T} fp32 CPU"
    adv, _ = benchmark.pedantic(python_loop_gae, args=(rewards, values, mask, GAMMA, LAM), rounds=5,
                                iterations=1, warmup_rounds=1)
    _check(adv, expected, mask)


def test_gae_native(benchmark, inputs, expected):
    C = pytest.importorskip("rlhf_fast._C", reason="the extension rlhf_fast._C is not built")
    rewards, values, mask = inputs
    benchmark.group = f"gae B={B} T={T} fp32 CPU"
    adv, _ = benchmark(C.gae, rewards, values, mask, GAMMA, LAM)
    _check(adv, expected, mask)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_gae_public_op(benchmark, inputs, expected, backend, monkeypatch):
    # rlhf_fast.ops.gae with its input checks and dispatch: native (C++) and the torch-vectorised scan.
    try:
        from rlhf_fast.ops.gae import gae
    except ImportError as e:
        pytest.skip(f"rlhf_fast.ops.gae (the torch-vectorised backend) is not available: {e}")
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    rewards, values, mask = inputs
    benchmark.group = f"gae B={B} T={T} fp32 CPU"
    adv, _ = benchmark(gae, rewards, values, mask, gamma=GAMMA, lam=LAM)
    _check(adv, expected, mask)


def test_kl_penalized_gae_native(benchmark, inputs):
    # The whole PPO experience step (k1 KL penalty, score at the last token, GAE) in one native pass.
    C = pytest.importorskip("rlhf_fast._C", reason="the extension rlhf_fast._C is not built")
    rewards, values, mask = inputs
    logprobs, ref_logprobs, scores = -rewards.abs(), -values.abs(), rewards[:, 0].contiguous()
    benchmark.group = f"kl_penalized_gae B={B} T={T} fp32 CPU"
    adv, _, _ = benchmark(C.kl_penalized_gae, logprobs, ref_logprobs, values, scores, mask, 0.05, GAMMA, LAM, 0)
    assert adv.shape == (B, T)


@pytest.fixture(autouse=True)
def _threads():
    # Report what the machine gives; the figures in the notes say how many threads were used.
    n = int(os.environ.get("RLHF_FAST_BENCH_THREADS", "0")) or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(old)

"""CPU benchmark (pytest-benchmark, `make bench`): fused_linear_logprobs, torch backend, against materialised
logits (log_softmax + gather), forward + backward at N=4096, H=256, V=32768 fp32: time, and peak extra memory
in benchmark.extra_info. GAE lives in bench/test_bench_gae_cpu.py.

Time: benchmark.pedantic, 3 rounds after one warm-up. Peak extra memory (rlhf_fast.bench.measure.cpu_peak_extra_bytes,
a fresh process per variant; the gradients count): the peak of live tensor bytes from torch.profiler's memory
events, and ru_maxrss minus the RSS once the inputs exist. Nothing here asserts a speed; tests/test_memory.py
asserts the memory promise.
"""

import pytest
import torch

from rlhf_fast.bench import measure as _bench

N, H, V = 4096, 256, 32768


@pytest.fixture(scope="module")
def inputs():
    return _bench.logprobs_inputs(N, H, V, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("variant", ["fused", "materialised"])
def test_fused_linear_logprobs_vs_materialised(benchmark, inputs, variant, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    hidden, weight, targets = inputs
    step = _bench.fwd_bwd(_bench.LOGPROBS_VARIANTS[variant], hidden, weight, targets, False)
    benchmark.group = f"fused_linear_logprobs fwd+bwd N={N} H={H} V={V} fp32 CPU"
    grad_hidden, grad_weight = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    # Same gradients either way (both are the exact formula in fp32).
    ref = _bench.fwd_bwd(_bench.eager_logprobs, hidden[:64].detach().requires_grad_(True), weight, targets[:64],
                         False)()[0]
    torch.testing.assert_close(grad_hidden[:64], ref, rtol=1e-4, atol=1e-5)
    mem = _bench.cpu_peak_extra_bytes(variant, N, H, V, backend="torch")
    benchmark.extra_info.update(
        tensor_peak_extra_mib=round(mem["tensor_peak_extra_bytes"] / _bench.MiB, 1),
        rss_peak_extra_mib=round(mem["peak_extra_bytes"] / _bench.MiB, 1),
        grads_mib=round(mem["grad_bytes"] / _bench.MiB, 1),
        memory_method="fresh process; tensor peak from torch.profiler memory events; RSS: ru_maxrss after "
                      "fwd+bwd minus RSS after inputs")

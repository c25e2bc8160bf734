"""Measurement primitives shared by every benchmark: `rlhf-fast bench`, bench/gpu.py, bench/cpu_report.py,
bench/test_bench_cpu.py and tests/test_memory.py all call these, so each measurement exists once.

Timing: median of triton.testing.do_bench on CUDA; median of perf_counter on the CPU.
Peak memory: torch.cuda.max_memory_allocated minus what was allocated before the call on CUDA; on the CPU
a fresh subprocess per variant, peak RSS (ru_maxrss) minus the RSS once its inputs are built (torch has no
CPU allocator statistics, and a separate process keeps one variant's high-water mark out of the other's),
with glibc's mmap threshold fixed so that freed blocks leave the RSS.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from rlhf_fast.ops import fused_linear_logprobs, gae, use_backend

MiB = 1 << 20
GiB = 1 << 30


# ----------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 100.0, rep_ms: float = 500.0,
            max_reps: int = 50) -> float:
    """Median wall time of fn() in ms. CUDA: triton.testing.do_bench (L2 flushed between calls). CPU: one
    warm-up call, then calls until rep_ms of measurement or max_reps, median of perf_counter."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during fn() beyond what was allocated before it (the inputs); None off CUDA.
    fn's results are dropped after the peak is read, so its outputs (gradients) count in the peak."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ----------------------------------------------------------------------------------------------- log-probs


def logprobs_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """hidden (N, H), weight (V, H) leaves with requires_grad, targets (N,) int64; scaled so logits are O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: V x H is 622M numbers at full size
    hidden = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_(True)  # (N, H)
    weight = (torch.randn(V, H, generator=g, device=device) / math.sqrt(H)).to(dtype).requires_grad_(True)  # (V, H)
    targets = torch.randint(0, V, (N,), generator=g, device=device)  # (N,)
    return hidden, weight, targets


def eager_logprobs(hidden, weight, targets, return_entropy: bool = True):
    """The baseline every peer uses: materialise the (N, V) logits, log_softmax in fp32, gather."""
    logits = (hidden @ weight.T).float()  # (N, V)
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    lp = logp.gather(-1, targets[:, None])[:, 0]
    if not return_entropy:
        return lp, None
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def fused_logprobs(hidden, weight, targets, return_entropy: bool = True):

    out = fused_linear_logprobs(hidden, weight, targets, return_entropy=return_entropy, checks=False)
    return out if return_entropy else (out, None)


def fwd_bwd(forward: Callable, hidden, weight, targets, return_entropy: bool = True):
    """A closure running forward + backward of sum(logprobs) (+ sum(entropy)) into (grad_hidden, grad_weight)."""

    def step():
        lp, ent = forward(hidden, weight, targets, return_entropy)
        loss = lp.sum() if ent is None else lp.sum() + ent.sum()
        return torch.autograd.grad(loss, (hidden, weight))

    return step


LOGPROBS_VARIANTS = {"fused": fused_logprobs, "materialised": eager_logprobs}


def tensor_peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak bytes of CPU tensors alive at once during fn() beyond those alive before it, from torch.profiler's
    memory events (every tensor allocation and free, in order). Deterministic, unlike RSS, which also moves
    with the C allocator's state. Returns (peak, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out


def _rss_child(variant: str, N: int, H: int, V: int, return_entropy: bool, backend: str, rss: bool) -> None:
    """Runs in a fresh process: forward+backward of `variant`, prints as JSON its peak extra RSS (first call,
    if rss) and its peak of live tensor bytes (next call, under torch.profiler)."""
    with use_backend(backend):
        hidden, weight, targets = logprobs_inputs(N, H, V, torch.float32, torch.device("cpu"))
        step = fwd_bwd(LOGPROBS_VARIANTS[variant], hidden, weight, targets, return_entropy)
        out = {"variant": variant}
        if rss:
            gc.collect()
            base = _rss_bytes()
            grads = step()
            out.update(peak_extra_bytes=_maxrss_bytes() - base, rss_after_inputs=base)
            del grads
            gc.collect()
        tensor_peak, grads = tensor_peak_extra_bytes(step)
    out.update(tensor_peak_extra_bytes=tensor_peak, grad_bytes=sum(g.numel() * g.element_size() for g in grads))
    print(json.dumps(out))


def _rss_cmd(variant, N, H, V, return_entropy, backend, rss):
    code = (f"from rlhf_fast.bench.measure import _rss_child; "
            f"_rss_child({variant!r}, {N}, {H}, {V}, {bool(return_entropy)}, {backend!r}, {bool(rss)})")
    return [sys.executable, "-c", code]


def cpu_peak_extra_bytes_many(variants, N: int, H: int, V: int, *, return_entropy: bool = False,
                              backend: str = "torch", rss: bool = True, timeout: float = 300.0
                              ) -> dict[str, dict]:
    """Peak extra RSS of one fp32 forward+backward of each variant ("fused" | "materialised"), each in its own
    fresh process (run side by side: they share nothing but the CPU): ru_maxrss after the call minus the RSS
    once the inputs exist. If an earlier transient (imports, input building) left the high-water mark above
    the call's own peak, the figure over-states the call's peak; it never under-states it.
    And, from a further call in the same process, tensor_peak_extra_bytes: the peak of live tensor bytes from
    torch.profiler's memory events, which does not move with the C allocator's state (rss=False: only this).
    Returns {variant: {"tensor_peak_extra_bytes", "grad_bytes"[, "peak_extra_bytes", "rss_after_inputs"]}}."""
    env = dict(os.environ)
    # glibc raises its mmap threshold after each large free, so freed blocks then stay in the heap and RSS
    # counts memory the program no longer holds (seen here: the fused variant read 106 to 162 MiB run to run).
    # A fixed threshold returns every block >= 128 KiB to the OS when freed, so RSS tracks live memory
    # (fused then reads 70 MiB, stable).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    procs = {v: subprocess.Popen(_rss_cmd(v, N, H, V, return_entropy, backend, rss), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for v in variants}
    out = {}
    for v, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"memory child for {v} failed:\n{stderr[-2000:]}")
        out[v] = json.loads(stdout.strip().splitlines()[-1])
    return out


def cpu_peak_extra_bytes(variant: str, N: int, H: int, V: int, **kw) -> dict:
    """cpu_peak_extra_bytes_many for one variant."""
    return cpu_peak_extra_bytes_many([variant], N, H, V, **kw)[variant]


# ----------------------------------------------------------------------------------------------- GAE


def gae_inputs(B: int, T: int, device: torch.device, seed: int = 0, holes: bool = True):
    """rewards, values (B, T) fp32 and a float 0/1 mask with a ragged end and, with holes, masked spans."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)  # (B, T)
    values = torch.randn(B, T, generator=g)  # (B, T)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    if holes:
        mask = mask * (torch.rand(B, T, generator=g) > 0.1).float()
    return rewards.to(device), values.to(device), mask.to(device)


def gae_python_loop(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95, steps: int | None = None):
    """The baseline TRL, OpenRLHF and verl ship: a Python loop over time, vectorised over the batch (verl's
    masked form, so masked positions carry next_value and the running advantage through, as our spec says).
    steps: run only the last `steps` time steps (for timing a prefix and extrapolating)."""
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    last = torch.zeros_like(next_value)
    out = []
    t_end = -1 if steps is None else max(-1, T - 1 - steps)
    for t in range(T - 1, t_end, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m + (1 - m) * last
        next_value = values[:, t] * m + (1 - m) * next_value
        out.append(last)
    adv = torch.stack(out[::-1], dim=1) * mask[:, T - len(out):]
    returns = (adv + values[:, T - len(out):]) * mask[:, T - len(out):]
    return adv, returns


def peer_python_loop_gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """The peers' reverse loop as OpenRLHF and verl write it (masked by multiplication, so it agrees with our
    semantics on right padding only): one small vector op per step, T steps."""
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def time_python_loop(rewards, values, mask, device, *, budget_s: float) -> tuple[float, str]:
    """Median ms of the full Python loop, or, when one full run would not fit budget_s, the time of a prefix of
    the time steps scaled linearly in T (the loop's cost is per time step). Returns (ms, how it was measured)."""
    T = rewards.shape[1]
    probe = min(T, 256)
    sync(device)
    t0 = time.perf_counter()
    gae_python_loop(rewards, values, mask, steps=probe)  # also the warm-up
    sync(device)
    per_step_s = (time.perf_counter() - t0) / probe
    if per_step_s * T * 4 <= budget_s:
        ms = time_ms(lambda: gae_python_loop(rewards, values, mask), device, warmup_ms=1,
                     rep_ms=min(budget_s * 250, 2000), max_reps=5)
        return ms, "measured (full loop)"
    steps = min(T, max(16, int(budget_s / 4 / per_step_s)))
    ms = time_ms(lambda: gae_python_loop(rewards, values, mask, steps=steps), device, warmup_ms=1,
                 rep_ms=min(budget_s * 250, 2000), max_reps=3)
    return ms * T / steps, f"extrapolated: last {steps} of {T} time steps timed, scaled x{T / steps:.1f}"


def gae_op(backend: str):
    """A callable (rewards, values, mask) -> (adv, returns) running rlhf_fast.ops.gae on `backend`."""
    def run(rewards, values, mask):
        return gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)

    return run


# ----------------------------------------------------------------------------------------------- reporting


def fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return "NaN"
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo_root: str | None = None) -> str:
    """HEAD's short hash (+dirty), or $RLHF_FAST_GIT_COMMIT where the tree has no .git (the device machine
    gets a copy of the working tree without it)."""
    if os.environ.get("RLHF_FAST_GIT_COMMIT"):
        return os.environ["RLHF_FAST_GIT_COMMIT"] + " (from RLHF_FAST_GIT_COMMIT)"
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=repo_root, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=repo_root, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

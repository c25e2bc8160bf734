"""The benchmark sections. Each takes a Run (device, shapes, time budget) and returns
{"title", "rows", "columns", "notes"}; rlhf_fast/bench/cli.py orchestrates them and writes the report.

GPU script sections: check, ceilings, logprobs, ppo, gae, role_model. CPU report sections: gae, logprobs.
With smoke=True the same code runs at tiny shapes (on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_fast import reference as R
from rlhf_fast.bench import measure as B
from rlhf_fast.bench import role_model as RM
from rlhf_fast.ops import use_backend


@dataclass
class Run:
    device: torch.device
    smoke: bool = False
    deadline: float = math.inf  # time.monotonic() after which sections skip what is left
    repo_root: Path | None = None
    ceilings: dict = field(default_factory=dict)  # filled by the ceilings section

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timed(self, fn, *, rep_ms: float = 500.0, max_reps: int = 50) -> float:
        if self.smoke and self.device.type != "cuda":
            return B.time_ms(fn, self.device, rep_ms=min(rep_ms, 200.0), max_reps=3)
        return B.time_ms(fn, self.device, warmup_ms=100.0, rep_ms=rep_ms, max_reps=max_reps)


def section(title, rows, columns, notes=()):
    return {"title": title, "rows": rows, "columns": columns, "notes": list(notes)}


def _short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


# ----------------------------------------------------------------------------------------------- check

# Relative-error bounds ||out - ref|| / ||ref|| by input dtype. Low precision may also reach twice the error
# of plain PyTorch in the same dtype (STYLE.md), whichever is larger.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return math.nan
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def _plain_logprobs(logits, targets, temperature, ignore_index):
    """Plain PyTorch in the logits' own dtype (the "plain" baseline of the low-precision rule):
    log_softmax(logits / T)[target] and -sum p log p; 0 where ignored."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _check_fused_linear_logprobs(dtype, dev, shp):
    N, H, V = shp["N"], shp["H"], shp["V"]
    hidden, weight, targets = B.logprobs_inputs(N, H, V, dtype, dev, seed=1)
    bias = (0.1 * torch.randn(V)).to(dev, dtype).requires_grad_(True)
    targets[::7] = -100
    temp = 0.7
    h64, w64, b64 = (x.detach().double().requires_grad_(True) for x in (hidden, weight, bias))
    lp_r, ent_r = R.linear_logprobs_entropy(h64, w64, targets, b64, temp, -100)
    g = torch.autograd.grad(lp_r.sum() + ent_r.sum(), (h64, w64, b64))
    ref = {"logprobs": lp_r, "entropy": ent_r, "grad_hidden": g[0], "grad_weight": g[1], "grad_bias": g[2]}

    def run():
        from rlhf_fast.ops import fused_linear_logprobs

        lp, ent = fused_linear_logprobs(hidden, weight, targets, bias, temperature=temp, return_entropy=True)
        gr = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight, bias))
        return {"logprobs": lp, "entropy": ent, "grad_hidden": gr[0], "grad_weight": gr[1], "grad_bias": gr[2]}

    def plain():
        logits = hidden @ weight.T + bias  # (N, V) in the input dtype, as plain PyTorch does
        lp, ent = _plain_logprobs(logits.float(), targets, temp, -100)
        gr = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight, bias))
        return {"logprobs": lp, "entropy": ent, "grad_hidden": gr[0], "grad_weight": gr[1], "grad_bias": gr[2]}

    return run, ref, plain


def _check_logprobs_from_logits(dtype, dev, shp):
    N, V = shp["N"], shp["V"]
    logits = (2 * torch.randn(N, V)).to(dev, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,)).to(dev)
    targets[::5] = -100
    l64 = logits.detach().double().requires_grad_(True)
    lp_r, ent_r = R.logprobs_entropy(l64, targets, 1.3, -100)
    ref = {"logprobs": lp_r, "entropy": ent_r,
           "grad_logits": torch.autograd.grad(lp_r.sum() + ent_r.sum(), l64)[0]}

    def run():
        from rlhf_fast.ops import logprobs_from_logits

        lp, ent = logprobs_from_logits(logits, targets, temperature=1.3, return_entropy=True)
        return {"logprobs": lp, "entropy": ent,
                "grad_logits": torch.autograd.grad(lp.sum() + ent.sum(), logits)[0]}

    def plain():
        lp, ent = _plain_logprobs(logits.float(), targets, 1.3, -100)
        return {"logprobs": lp, "entropy": ent,
                "grad_logits": torch.autograd.grad(lp.sum() + ent.sum(), logits)[0]}

    return run, ref, plain


def _check_fused_linear_ppo_loss(dtype, dev, shp):
    Bn, T, H, V = shp["B"], shp["N"] // shp["B"], shp["H"], shp["V"]
    hidden, weight, targets = B.logprobs_inputs(Bn * T, H, V, dtype, dev, seed=2)
    hidden = hidden.detach().reshape(Bn, T, H).requires_grad_(True)
    targets = targets.reshape(Bn, T)
    g = torch.Generator().manual_seed(3)
    old = (-3 + 0.3 * torch.randn(Bn, T, generator=g)).to(dev)
    ref_lp = (-3 + 0.3 * torch.randn(Bn, T, generator=g)).to(dev)
    adv = torch.randn(Bn, T, generator=g).to(dev)
    mask = (torch.rand(Bn, T, generator=g) > 0.2).float().to(dev)
    kw = dict(kl_coef=0.1, entropy_coef=0.01, clip=0.2)
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (hidden, weight))

    loss64 = R.linear_ppo_loss(h64, w64, targets, old, adv, mask, ref_lp=ref_lp, kl_coef=kw["kl_coef"],
                               kl_estimator="k3", entropy_coef=kw["entropy_coef"], clip_low=kw["clip"])
    g64 = torch.autograd.grad(loss64, (h64, w64))
    ref = {"loss": loss64, "grad_hidden": g64[0], "grad_weight": g64[1]}

    def plain():  # the same formula in plain PyTorch, logits in the input dtype
        logits = hidden.reshape(-1, H) @ weight.T
        lp, ent = _plain_logprobs(logits.float(), targets.reshape(-1), 1.0, -100)
        ratio = torch.exp(lp - old.reshape(-1))
        a = adv.reshape(-1)
        tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - kw["clip"], 1 + kw["clip"]))
        d = lp - ref_lp.reshape(-1)
        tok = tok + kw["kl_coef"] * (torch.expm1(-d) + d) - kw["entropy_coef"] * ent
        m = mask.reshape(-1)
        loss = (tok * m).sum() / m.sum()
        gr = torch.autograd.grad(loss, (hidden, weight))
        return {"loss": loss, "grad_hidden": gr[0], "grad_weight": gr[1]}

    def run():
        from rlhf_fast.ops import fused_linear_ppo_loss

        loss, _ = fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, ref_logprobs=ref_lp,
                                        kl_coef=kw["kl_coef"], kl_estimator="k3", entropy_coef=kw["entropy_coef"],
                                        clip_low=kw["clip"])
        gr = torch.autograd.grad(loss, (hidden, weight))
        return {"loss": loss, "grad_hidden": gr[0], "grad_weight": gr[1]}

    return run, ref, plain


def _check_gae(dtype, dev, shp):
    r, v, m = B.gae_inputs(shp["B"], shp["T"], dev, seed=4)
    adv, ret = R.gae_loop(r, v, m, 0.99, 0.95)

    def run():
        from rlhf_fast.ops import gae

        a, rt = gae(r, v, m, gamma=0.99, lam=0.95)
        return {"advantages": a, "returns": rt}

    return run, {"advantages": adv, "returns": ret}, None


def _check_kl_penalized_gae(dtype, dev, shp):
    lp, ref_lp, m = B.gae_inputs(shp["B"], shp["T"], dev, seed=5)
    values = torch.randn(shp["B"], shp["T"]).to(dev)
    scores = torch.randn(shp["B"]).to(dev)
    adv, ret, rew = R.kl_penalized_gae_loop(lp.cpu(), ref_lp.cpu(), values.cpu(), scores.cpu(), m.cpu(), 0.05, 1.0,
                                            0.95, "k3")

    def run():
        from rlhf_fast.ops import kl_penalized_gae

        a, rt, rw = kl_penalized_gae(lp, ref_lp, values, scores, m, kl_coef=0.05, lam=0.95, estimator="k3")
        return {"advantages": a, "returns": rt, "rewards": rw}

    return run, {"advantages": adv, "returns": ret, "rewards": rew}, None


def _check_elementwise(dtype, dev, shp):
    """The torch-only element-wise ops: kl_penalty, masked_whiten, ppo_policy_loss, value_loss,
    bradley_terry_loss, each against its plain float64 formula."""
    g = torch.Generator().manual_seed(6)
    Bn, T = shp["B"], shp["T"]
    lp, old, ref_lp = (-2 + 0.5 * torch.randn(Bn, T, generator=g) for _ in range(3))
    adv, v, old_v, ret = (torch.randn(Bn, T, generator=g) for _ in range(4))
    m = (torch.rand(Bn, T, generator=g) > 0.3).float()
    c, r = torch.randn(Bn, generator=g), torch.randn(Bn, generator=g)
    ref = {f"kl_{e}": R.kl(lp, ref_lp, e) for e in ("k1", "k2", "k3", "abs")}
    ref |= {"masked_whiten": R.masked_whiten(adv, m),
           "ppo_policy_loss": R.aggregate(R.ppo_token_loss(lp, old, adv, 0.2), m, "token-mean"),
           "value_loss": R.aggregate(R.value_token_loss(v, old_v, ret, 0.2), m, "token-mean"),
           "bradley_terry_loss": torch.nn.functional.softplus(-(c.double() - r.double())).mean()}
    to = lambda *xs: [x.to(dev) for x in xs]  # noqa: E731
    lp, old, ref_lp, adv, v, old_v, ret, m, c, r = to(lp, old, ref_lp, adv, v, old_v, ret, m, c, r)

    def run():
        from rlhf_fast import ops

        out = {f"kl_{e}": ops.kl_penalty(lp, ref_lp, e) for e in ("k1", "k2", "k3", "abs")}
        out["masked_whiten"] = ops.masked_whiten(adv, m)
        out["ppo_policy_loss"] = ops.ppo_policy_loss(lp, old, adv, m, clip_low=0.2)[0]
        out["value_loss"] = ops.value_loss(v, old_v, ret, m, clip=0.2)[0]
        out["bradley_terry_loss"] = ops.bradley_terry_loss(c, r)
        return out

    return run, ref, None


# (op name, builder, dtypes, dispatching op name for backend availability or None if torch only)
CHECKS = [
    ("fused_linear_logprobs", _check_fused_linear_logprobs, (torch.float32, torch.bfloat16), "fused_linear_logprobs"),
    ("logprobs_from_logits", _check_logprobs_from_logits, (torch.float32, torch.bfloat16), "logprobs_from_logits"),
    ("fused_linear_ppo_loss", _check_fused_linear_ppo_loss, (torch.float32, torch.bfloat16),
     "fused_linear_ppo_loss"),
    ("gae", _check_gae, (torch.float32,), "gae"),
    ("kl_penalized_gae", _check_kl_penalized_gae, (torch.float32,), "kl_penalized_gae"),
    ("element-wise ops (kl_penalty x4, masked_whiten, ppo_policy_loss, value_loss, bradley_terry_loss)",
     _check_elementwise, (torch.float32,), None),
]
CHECK_BACKENDS = ("triton", "native", "torch")


def check_section(run: Run) -> dict:
    from rlhf_fast.ops import _dispatch

    dev = run.device
    shp = (dict(N=34, H=32, V=301, B=2, T=37) if run.smoke else dict(N=1028, H=256, V=4099, B=37, T=1025))
    rows, details, notes = [], [], []
    n_fail = 0
    for name, build, dtypes, op in CHECKS:
        for dtype in dtypes:
            row = {"op": name, "dtype": str(dtype).replace("torch.", "")}
            torch.manual_seed(0)
            try:
                fn, ref, plain = build(dtype, dev, shp)
                plain_err = {}
                if plain is not None and dtype != torch.float32:
                    plain_err = {k: rel_err(v, ref[k]) for k, v in plain().items()}
            except Exception as e:  # noqa: BLE001 - a broken builder is reported, not fatal
                for b in CHECK_BACKENDS:
                    row[b] = f"error building inputs: {_short_error(e)}"
                rows.append(row)
                n_fail += 1
                continue
            for b in CHECK_BACKENDS:
                if op is None and b != "torch":
                    row[b] = "-"
                    continue
                if op is not None:
                    ok, why = _dispatch._available(op, b, dev)
                    if not ok:
                        row[b] = f"n/a ({why})"
                        continue
                if run.left() < 0:
                    row[b] = "skipped (time budget)"
                    continue
                try:
                    with use_backend(b):
                        out = fn()
                    errs = {k: rel_err(out[k], ref[k]) for k in ref}
                    tols = {k: max(REL_TOL[dtype], 2 * plain_err.get(k, 0.0)) for k in ref}
                    bad = [k for k in ref if not errs[k] <= tols[k]]  # NaN fails
                    worst = max(ref, key=lambda k: (math.inf if math.isnan(errs[k]) else errs[k] / tols[k]))
                    row[b] = (f"FAIL {', '.join(bad)} ({B.fmt(errs[bad[0]])})" if bad
                              else f"pass (max {errs[worst]:.1e})")
                    n_fail += bool(bad)
                    details.append({"op": name, "dtype": row["dtype"], "backend": b, "rel_err": errs,
                                    "tol": tols, "plain_torch_rel_err": plain_err, "pass": not bad})
                except Exception as e:  # noqa: BLE001
                    row[b] = f"ERROR {_short_error(e)}"
                    n_fail += 1
                    details.append({"op": name, "dtype": row["dtype"], "backend": b, "error": _short_error(e),
                                    "traceback": traceback.format_exc()[-1500:]})
            rows.append(row)
    notes.append(f"Shapes: {shp}; odd sizes, ignore_index holes, masks with holes, temperature != 1. Error = "
                 "||out - ref|| / ||ref|| against a float64 reference on the same rounded inputs; NaN fails. "
                 f"Bound: {', '.join(f'{str(k)[6:]} {v:g}' for k, v in REL_TOL.items())}, or twice plain "
                 "PyTorch's error in the same dtype if larger.")
    notes.append(f"{n_fail} failing or erroring cell(s).")
    out = section("Correctness against the float64 reference", rows, ["op", "dtype", *CHECK_BACKENDS], notes)
    out["details"] = details
    out["failures"] = n_fail
    return out


# ----------------------------------------------------------------------------------------------- ceilings


def ceilings_section(run: Run) -> dict:
    dev = run.device
    n = 256 if run.smoke else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = run.timed(lambda: a @ b)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    a = b = None  # free before the copy buffers
    nbytes = (16 if run.smoke else 2048) * B.MiB
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms_copy = run.timed(lambda: y.copy_(x))
    gbps = 2 * nbytes / (ms_copy * 1e-3) / 1e9
    x = y = None
    run.ceilings.update(gemm_tflops=tflops, copy_gbps=gbps)
    rows = [{"ceiling": f"bf16 GEMM {n}x{n}x{n}", "median ms": ms, "value": tflops, "unit": "TFLOP/s"},
            {"ceiling": f"device copy {nbytes // B.MiB} MiB (read + write counted)", "median ms": ms_copy,
             "value": gbps, "unit": "GB/s"}]
    return section("Ceilings (measured)", rows, ["ceiling", "median ms", "value", "unit"],
                   ["GEMM on random normal data; copy is y.copy_(x) in fp32, bytes read plus bytes written."])


# ----------------------------------------------------------------------------------------------- log-probs


def _liger(module_path: str, name: str):
    try:
        mod = importlib.import_module(module_path)
        return getattr(mod, name), None
    except Exception as e:  # noqa: BLE001 - Liger is optional
        return None, _short_error(e)


def _floor_ms(run: Run, flops: float) -> float | None:
    t = run.ceilings.get("gemm_tflops")
    return None if not t else flops / (t * 1e12) * 1e3


def _measure(run: Run, rows: list, label: str, step, *, floor_ms, ref_ms_key="rlhf_fast", grad_bytes=0,
             min_left_s: float = 20.0, **extra) -> float | None:
    """Time `step` and its peak extra memory; append a row. Skips (with a row saying so) near the deadline."""
    row = {"variant": label, **extra}
    if run.left() < min_left_s:
        row["note"] = "skipped (time budget)"
        rows.append(row)
        return None
    try:
        t0 = time.monotonic()
        step()  # first call: compiles (torch.compile, Triton autotune) outside the timing
        row["first call s"] = time.monotonic() - t0
        ms = run.timed(step, rep_ms=300.0 if run.left() < 120 else 600.0)
        peak = B.cuda_peak_extra_bytes(step, run.device)
    except Exception as e:  # noqa: BLE001
        row["note"] = f"ERROR {_short_error(e)}"
        rows.append(row)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    row.update({"median ms": ms, "x floor": None if not floor_ms else ms / floor_ms,
                "peak extra MiB": B.mib(peak),
                "extra beyond grads MiB": None if peak is None else B.mib(peak - grad_bytes)})
    rows.append(row)
    return ms


def _ours(run: Run) -> str:
    """Backend for our rows: auto (what users get), except in a CPU smoke run, where auto would pick torch and
    leave the Triton path unexercised."""
    return "triton" if run.smoke and run.device.type != "cuda" else "auto"


def _speedups(rows: list, ours_label_prefix: str = "rlhf_fast") -> None:
    ours = next((r.get("median ms") for r in rows if r["variant"].startswith(ours_label_prefix)
                 and r.get("median ms")), None)
    for r in rows:
        if ours and r.get("median ms"):
            r["time / rlhf_fast"] = r["median ms"] / ours


LOGPROBS_COLUMNS = ["variant", "entropy", "median ms", "x floor", "time / rlhf_fast", "peak extra MiB",
                    "extra beyond grads MiB", "first call s", "note"]


def logprobs_section(run: Run) -> dict:
    dev = run.device
    N, H, V = (64, 32, 301) if run.smoke else (8192, 4096, 151936)
    dtype = torch.bfloat16
    hidden, weight, targets = B.logprobs_inputs(N, H, V, dtype, dev)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    floor = _floor_ms(run, 6 * N * H * V)
    rows, notes = [], []
    kw = dict(floor_ms=floor, grad_bytes=grad_bytes)

    ours = _ours(run)
    fused = lambda ent: B.fwd_bwd(B.fused_logprobs, hidden, weight, targets, ent)  # noqa: E731
    with use_backend(ours):
        _measure(run, rows, f"rlhf_fast fused_linear_logprobs ({ours} backend)", fused(True), entropy="yes", **kw)

    with torch.no_grad():
        g_logits = torch.randn(N, V, device=dev, dtype=dtype)  # (N, V) stand-in for dL/dlogits
    h0, w0 = hidden.detach(), weight.detach()
    _measure(run, rows, "lm_head GEMMs only: logits, dL/dhidden, dL/dweight (3 GEMMs)",
             lambda: (h0 @ w0.T, g_logits @ w0, g_logits.T @ h0), entropy="-", **kw)
    g_logits = None  # (N, V): free it before the other variants run

    flce, why = _liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if flce is not None and (dev.type == "cuda" or run.smoke):  # off CUDA it runs under TRITON_INTERPRET=1
        loss_fn = flce(reduction="sum")

        def liger_step():
            return torch.autograd.grad(loss_fn(weight, hidden, targets), (hidden, weight))

        _measure(run, rows, "Liger-Kernel LigerFusedLinearCrossEntropyLoss (sum)", liger_step, entropy="no",
                 **kw)
    else:
        notes.append(f"Liger-Kernel not run: {why or 'needs CUDA'}.")
    _measure(run, rows, "eager PyTorch: materialised logits + log_softmax + gather",
             B.fwd_bwd(B.eager_logprobs, hidden, weight, targets, True), entropy="yes", **kw)
    with use_backend(ours):
        _measure(run, rows, f"rlhf_fast fused_linear_logprobs ({ours} backend), no entropy", fused(False),
                 entropy="no", **kw)
    if dev.type == "cuda":
        compiled = torch.compile(B.eager_logprobs, dynamic=False)
        _measure(run, rows, "torch.compile of the eager version",
                 B.fwd_bwd(compiled, hidden, weight, targets, True), entropy="yes", min_left_s=90, **kw)
    else:
        notes.append("torch.compile skipped off CUDA (smoke run).")
    with use_backend("torch"):
        _measure(run, rows, "rlhf_fast fused_linear_logprobs (torch backend)", fused(True), entropy="yes",
                 min_left_s=60, **kw)
    _speedups(rows)
    notes.append(f"{str(dtype)[6:]}, N={N}, H={H}, V={V}; forward + backward of sum(logprobs) (+ sum(entropy)) "
                 "into grad_hidden and grad_weight. Median of triton.testing.do_bench on CUDA "
                 "(perf_counter median off CUDA).")
    if floor:
        notes.append(f"x floor: time / (6NHV = {6 * N * H * V / 1e12:.1f} TFLOP at the measured "
                     f"{run.ceilings['gemm_tflops']:.0f} TFLOP/s = {floor:.2f} ms). The fused op recomputes the "
                     "logits in its backward (8NHV), so 1.33 is its own floor.")
    notes.append(f"Peak extra: max_memory_allocated during one call minus the inputs; the gradients "
                 f"themselves ({grad_bytes / B.MiB:.0f} MiB in {str(dtype)[6:]}) are part of it; the next "
                 "column subtracts them. Liger computes cross-entropy only (no entropy), as its API offers.")
    return section(f"fused_linear_logprobs forward + backward, N={N}, H={H}, V={V}", rows, LOGPROBS_COLUMNS,
                   notes)


# ----------------------------------------------------------------------------------------------- PPO loss


def _eager_ppo_loss(hidden, weight, targets, old, adv, ref, mask, kl_coef, clip):
    """Eager baseline: materialised logits, log_softmax, gather, clipped surrogate + k3 KL, token mean."""
    Bn, T, H = hidden.shape
    logits = (hidden.reshape(-1, H) @ weight.T).float()  # (N, V)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.reshape(-1, 1))[:, 0].reshape(Bn, T)
    ratio = torch.exp(lp - old)
    l = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    d = lp - ref
    l = l + kl_coef * (torch.exp(-d) - 1 + d)
    return (l * mask).sum() / mask.sum().clamp(min=1)


def ppo_section(run: Run) -> dict:
    dev = run.device
    Bn, T, H, V = (2, 32, 32, 301) if run.smoke else (8, 1024, 4096, 151936)
    N = Bn * T
    dtype = torch.bfloat16
    hidden, weight, targets = B.logprobs_inputs(N, H, V, dtype, dev, seed=7)
    hidden = hidden.detach().reshape(Bn, T, H).requires_grad_(True)
    targets = targets.reshape(Bn, T)
    g = torch.Generator().manual_seed(8)
    old = (-3 + 0.3 * torch.randn(Bn, T, generator=g)).to(dev)
    ref = (-3 + 0.3 * torch.randn(Bn, T, generator=g)).to(dev)
    seq_adv = torch.randn(Bn, generator=g).to(dev)  # (B,) per-sequence, as GRPO and Liger take it
    adv = seq_adv[:, None].expand(Bn, T).contiguous()
    mask = torch.ones(Bn, T, device=dev)
    kl_coef, clip = 0.04, 0.2
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    kw = dict(floor_ms=_floor_ms(run, 6 * N * H * V), grad_bytes=grad_bytes)
    rows, notes = [], []

    def ours():
        from rlhf_fast.ops import fused_linear_ppo_loss

        loss, _ = fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, ref_logprobs=ref,
                                        kl_coef=kl_coef, kl_estimator="k3", clip_low=clip, checks=False)
        return torch.autograd.grad(loss, (hidden, weight))

    def eager_with(fn):
        return lambda: torch.autograd.grad(fn(hidden, weight, targets, old, adv, ref, mask, kl_coef, clip),
                                           (hidden, weight))

    with use_backend(_ours(run)):
        _measure(run, rows, f"rlhf_fast fused_linear_ppo_loss ({_ours(run)} backend)", ours, **kw)
    grpo, why = _liger("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    losses = {}
    if grpo is not None and (dev.type == "cuda" or run.smoke):
        # compiled=True is Liger's default (torch.compile of its chunk step); off CUDA (smoke) it runs eagerly.
        loss_fn = grpo(beta=kl_coef, use_ref_model=True, epsilon_low=clip, epsilon_high=clip, loss_type="dapo",
                       compiled=dev.type == "cuda")

        def liger_loss():
            out = loss_fn(hidden, weight, targets, mask, seq_adv, ref_per_token_logps=ref,
                          old_per_token_logps=old)
            return out[0] if isinstance(out, (tuple, list)) else out

        def liger_step():
            return torch.autograd.grad(liger_loss(), (hidden, weight))

        _measure(run, rows, "Liger-Kernel LigerFusedLinearGRPOLoss (dapo = token mean, k3 KL)", liger_step,
                 min_left_s=60, **kw)
        with contextlib.suppress(Exception):
            losses["Liger"] = float(liger_loss())
    else:
        notes.append(f"Liger-Kernel not run: {why or 'needs CUDA'}.")
    _measure(run, rows, "eager PyTorch: materialised logits + log_softmax + gather + loss",
             eager_with(_eager_ppo_loss), **kw)
    with contextlib.suppress(Exception), torch.no_grad():
        from rlhf_fast.ops import fused_linear_ppo_loss

        with use_backend(_ours(run)):
            losses["rlhf_fast"] = float(fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                                              ref_logprobs=ref, kl_coef=kl_coef,
                                                              kl_estimator="k3", clip_low=clip)[0])
        losses["eager"] = float(_eager_ppo_loss(hidden, weight, targets, old, adv, ref, mask, kl_coef, clip))
    if losses:
        notes.append("Same loss, so the variants are comparable: "
                     + ", ".join(f"{k} {v:.6g}" for k, v in losses.items()) + ".")
    if dev.type == "cuda":
        _measure(run, rows, "torch.compile of the eager version",
                 eager_with(torch.compile(_eager_ppo_loss, dynamic=False)), min_left_s=90, **kw)
    else:
        notes.append("torch.compile skipped off CUDA (smoke run).")
    with use_backend("torch"):
        _measure(run, rows, "rlhf_fast fused_linear_ppo_loss (torch backend)", ours, min_left_s=60, **kw)
    _speedups(rows)
    notes.append(f"{str(dtype)[6:]}, B={Bn}, T={T} (N={N}), H={H}, V={V}; clipped surrogate (clip {clip}) + "
                 f"{kl_coef} * k3 KL to given reference log-probs, token mean, per-sequence advantages; forward "
                 "+ backward into grad_hidden and grad_weight. x floor as in the log-probs table (6NHV).")
    return section(f"fused_linear_ppo_loss forward + backward, N={N}, H={H}, V={V}", rows,
                   [c for c in LOGPROBS_COLUMNS if c != "entropy"], notes)


# ----------------------------------------------------------------------------------------------- GAE


GAE_BYTES_PER_ELEM = 20  # read rewards, values, float mask (4 B each), write advantages, returns (4 B each)


def gae_section(run: Run, *, B_: int | None = None, T: int | None = None,
                backends=("native", "triton", "torch"), peer_loop: bool = False) -> dict:
    """Our GAE backends against the Python loop over time. peer_loop: time the peers' own loop
    (measure.peer_python_loop_gae; its masking agrees with ours on right padding only, so the masks then have no
    interior holes); otherwise measure.gae_python_loop (masks with holes)."""
    dev = run.device
    if B_ is None:
        B_, T = (8, 64) if run.smoke else (1024, 8192)
    rows, notes = [], []
    peer = B.peer_python_loop_gae if peer_loop else None
    r, v, m = B.gae_inputs(B_, T, dev, holes=peer is None)
    copy = run.ceilings.get("copy_gbps")
    nbytes = GAE_BYTES_PER_ELEM * B_ * T
    from rlhf_fast.ops import _dispatch

    if peer is not None:
        loop_label = "Python loop over time (measure.peer_python_loop_gae, OpenRLHF style)"
        loop_ms, how = run.timed(lambda: peer(r, v, m, 1.0, 0.95), rep_ms=1e9, max_reps=5), "measured (full loop)"
    else:
        loop_label = "Python loop over time, vectorised over batch (TRL/OpenRLHF/verl style)"
        loop_budget = 2.0 if run.smoke else min(30.0, max(5.0, run.left() / 6))
        loop_ms, how = B.time_python_loop(r, v, m, dev, budget_s=loop_budget)
    ref_adv, _ = B.gae_python_loop(r, v, m)
    for b in backends:
        row = {"variant": f"rlhf_fast gae ({b} backend)"}
        ok, why = _dispatch._available("gae", b, dev)
        if not ok:
            row["note"] = f"n/a ({why})"
            rows.append(row)
            continue
        op = B.gae_op(b)
        try:
            adv, _ = op(r, v, m)
            err = rel_err(adv, ref_adv)
            ms = run.timed(lambda op=op: op(r, v, m))
        except Exception as e:  # noqa: BLE001
            row["note"] = f"ERROR {_short_error(e)}"
            rows.append(row)
            continue
        gbps = nbytes / (ms * 1e-3) / 1e9
        row.update({"median ms": ms, "GB/s": gbps, "% of copy": None if not copy else 100 * gbps / copy,
                    "x Python loop": loop_ms / ms, "rel err vs loop": err})
        rows.append(row)
    rows.append({"variant": loop_label, "median ms": loop_ms, "x Python loop": 1.0, "note": how})
    mask_kind = "a ragged end and 10% holes" if peer is None else "a ragged end (no holes)"
    notes.append(f"fp32, B={B_}, T={T}, float mask with {mask_kind}; gamma=1, lam=0.95. GB/s counts "
                 f"{GAE_BYTES_PER_ELEM} B per element (rewards, values, mask read; advantages, returns written)"
                 + (f"; % of the measured copy bandwidth ({copy:.0f} GB/s)." if copy else "."))
    notes.append("The loop's cost is per time step (each step is a few batch-wide kernels), so when a full run "
                 "would not fit the time budget a suffix of the time steps is timed and scaled by T; the note "
                 "column says which.")
    return section(f"GAE, B={B_}, T={T}", rows,
                   ["variant", "median ms", "GB/s", "% of copy", "x Python loop", "rel err vs loop", "note"], notes)


# ----------------------------------------------------------------------------------------------- RoleModel

def role_model_section(run: Run) -> dict:
    """Calls the comparison in rlhf_fast/bench/role_model.py (gpu_compare on CUDA; compare() on its tiny CPU
    config in a smoke run); the measurement is not duplicated here."""
    title = "RoleModel.experience() vs the four-model recipe"
    mod = RM
    try:
        if run.device.type == "cuda" and not run.smoke:
            reps = 5 if run.left() > 240 else 2
            res, how = mod.gpu_compare(reps=reps), f"gpu_compare(reps={reps})"
        else:
            res = mod.compare(mod.tiny_cpu_config(), batch=2, seq=16, reps=1, device=str(run.device))
            res.pop("_model", None)
            how = "compare(tiny_cpu_config(), batch=2, seq=16, reps=1)"
    except Exception as e:  # noqa: BLE001
        return section(title, [], [], [f"bench_role_model failed: {_short_error(e)}", traceback.format_exc()[-1500:]])
    rows = []
    for key, label in (("four_models", "four models (TRL-style, logits materialised)"),
                       ("role_model_sequential", "RoleModel.experience(), sequential roles"),
                       ("role_model_mixed", "RoleModel.experience(), mixed-adapter batch")):
        r = res.get(key)
        if r:
            rows.append({"recipe": label, "tokens/s": r["tokens_per_s"], "seconds": r["seconds"],
                         "peak MiB": B.mib(r["peak_bytes"]), "weights MiB": B.mib(r["weight_bytes"])})
    c = res.get("config", {})
    notes = [f"rlhf_fast/bench/role_model.py:{how}: random-init {c.get('model_type')} (hidden {c.get('hidden')}, "
             f"{c.get('layers')} layers, vocab {c.get('vocab')}), batch {res.get('batch')} x {res.get('seq')}, "
             f"micro-batch {res.get('micro_batch')}, {res.get('dtype')}.",
             f"throughput ratio RoleModel / four models: {B.fmt(res.get('throughput_ratio'))}; peak memory ratio: "
             f"{B.fmt(res.get('peak_memory_ratio'))} (goal on the GPU: >= 1.5 and <= 0.35)."]
    out = section(title, rows, ["recipe", "tokens/s", "seconds", "peak MiB", "weights MiB"], notes)
    out["raw"] = {k: v for k, v in res.items() if k != "_model"}
    return out


# ----------------------------------------------------------------------------------------------- CPU memory


def cpu_logprobs_section(run: Run, *, N: int = 4096, H: int = 256, V: int = 32768) -> dict:
    """fused_linear_logprobs (torch backend) vs materialised logits on the CPU: time and peak extra RSS."""
    if run.smoke:
        N, H, V = 256, 32, 2048
    rows = []
    hidden, weight, targets = B.logprobs_inputs(N, H, V, torch.float32, torch.device("cpu"))
    mems = B.cpu_peak_extra_bytes_many(["fused", "materialised"], N, H, V, backend="torch")
    for variant, label in (("fused", "rlhf_fast fused_linear_logprobs (torch backend)"),
                           ("materialised", "materialised logits + log_softmax + gather")):
        with use_backend("torch"):
            ms = run.timed(B.fwd_bwd(B.LOGPROBS_VARIANTS[variant], hidden, weight, targets, False),
                           rep_ms=1e9, max_reps=3)
        mem = mems[variant]
        rows.append({"variant": label, "median ms": ms,
                     "tensor peak extra MiB": B.mib(mem["tensor_peak_extra_bytes"]),
                     "RSS peak extra MiB": B.mib(mem["peak_extra_bytes"]),
                     "of which grads MiB": B.mib(mem["grad_bytes"])})
    fused, mat = rows
    fused["memory / materialised"] = fused["tensor peak extra MiB"] / mat["tensor peak extra MiB"]
    fused["time / materialised"] = fused["median ms"] / mat["median ms"]
    mat["memory / materialised"] = mat["time / materialised"] = 1.0
    notes = [f"fp32, N={N}, H={H}, V={V}, forward + backward of sum(logprobs) (no entropy) into grad_hidden and "
             "grad_weight. Time: median of 3 perf_counter runs after one warm-up. Memory, in a fresh process per "
             "variant (the gradients count): tensor peak = peak of live tensor bytes from torch.profiler's memory "
             "events (deterministic; the ratio uses it); RSS peak = ru_maxrss after the call minus the RSS once "
             "the inputs exist, glibc's mmap threshold fixed at 128 KiB so freed blocks leave the RSS (it still "
             "moves with the allocator's state: 70 to 254 MiB seen for the fused call)."]
    return section(f"fused_linear_logprobs vs materialised logits on the CPU, N={N}, H={H}, V={V}", rows,
                   ["variant", "median ms", "time / materialised", "tensor peak extra MiB", "memory / materialised",
                    "RSS peak extra MiB", "of which grads MiB"], notes)

"""Direct tests of the GAE kernels against the float64 reverse loop of rlhf_fast.reference: rlhf_fast._C (native
C++ on the CPU, CUDA where built and a GPU is present), the Triton launchers of kernels/gae.py (interpreter on the
CPU) and csrc/gae.cu's device code under a warp emulation. Only the native tests need the built extension."""

import ctypes
import importlib
import pathlib
import shutil
import subprocess

import pytest
import torch

from rlhf_fast.reference import gae_loop as gae_ref
from rlhf_fast.reference import kl_penalized_gae_loop as kl_gae_ref
from tests.tolerances import assert_close

try:
    C = importlib.import_module("rlhf_fast._C")
except ImportError:
    C = None
needs_native = pytest.mark.skipif(C is None, reason="the extension rlhf_fast._C is not built")

ESTIMATORS = (0, 1, 2, 3)  # k1, k2, k3, abs
CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


# ---------------------------------------------------------------- inputs and comparison


def make_mask(B, T, kind):
    """0/1 fp32 mask. "holes": interior zeros, leading and trailing zeros, an all-zero row, a hole across
    the 256/1024 chunk boundaries and a row valid only at its start (the carry crosses empty chunks)."""
    if kind == "full":
        return torch.ones(B, T)
    m = (torch.rand(B, T) > 0.3).float()
    m[0, : min(2, T)] = 0
    m[-1, max(0, T - 3):] = 0
    if T > 300:
        m[0, 250:300] = 0
        m[0, 1000:1025] = 0
    if B >= 3:
        m[1] = 0
        if T > 20:
            m[2, 10:] = 0
    return m


def make_gae_inputs(B, T, kind):
    return torch.randn(B, T), torch.randn(B, T), make_mask(B, T, kind)


def make_kl_inputs(B, T, kind):
    logprobs = -3 * torch.rand(B, T)
    ref_logprobs = logprobs + 0.5 * torch.randn(B, T)
    return logprobs, ref_logprobs, torch.randn(B, T), 5 * torch.randn(B), make_mask(B, T, kind)


def check(actual, expected, gamma, lam, T):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    if gamma * lam < 1:
        assert_close(actual, expected, torch.float32)
    else:
        # gamma = lam = 1: the advantage is an undiscounted sum over up to T terms, so fp32 rounding grows
        # with the partial sums (~sqrt(T) for unit-variance terms), not with the result; scale atol by it.
        rtol, atol = 1e-4, 1e-5 * (1 + T**0.5)
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the launchers under test


def native_gae(r, v, m, gamma, lam, **_):
    return C.gae(r, v, m, gamma, lam)


def native_kl_gae(*args, **_):
    return C.kl_penalized_gae(*args)


def triton_gae(r, v, m, gamma, lam, block_t=None):
    from rlhf_fast.kernels import gae as K

    return K.gae_fwd(r, v, m, gamma, lam, block_t=block_t)


def triton_kl_gae(*args, block_t=None):
    from rlhf_fast.kernels import gae as K

    return K.kl_penalized_gae_fwd(*args, block_t=block_t)


try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

GAE_IMPLS = [pytest.param(native_gae, id="native", marks=needs_native),
             pytest.param(triton_gae, id="triton", marks=needs_triton)]
KL_IMPLS = [pytest.param(native_kl_gae, id="native", marks=needs_native),
            pytest.param(triton_kl_gae, id="triton", marks=needs_triton)]


# ---------------------------------------------------------------- native C++ (CPU): full grid of shapes


@needs_native
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 17), (3, 17), (1, 1025), (3, 1025)])
@pytest.mark.parametrize("kind", ["full", "holes"])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_native_gae_matches_reference(B, T, kind, gamma, lam):
    r, v, m = make_gae_inputs(B, T, kind)
    adv, ret = C.gae(r, v, m, gamma, lam)
    r_adv, r_ret = gae_ref(r, v, m, gamma, lam)
    check(adv, r_adv, gamma, lam, T)
    check(ret, r_ret, gamma, lam, T)
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


@needs_native
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (3, 1025)])
@pytest.mark.parametrize("kind", ["full", "holes"])
def test_native_kl_penalized_gae_matches_reference(estimator, B, T, kind):
    args = make_kl_inputs(B, T, kind) + (0.1, 0.99, 0.95, estimator)
    out = C.kl_penalized_gae(*args)
    for got, want in zip(out, kl_gae_ref(*args)):
        check(got, want, 0.99, 0.95, T)


@needs_native
def test_native_kl_penalized_gae_undiscounted():
    args = make_kl_inputs(3, 1025, "holes") + (0.05, 1.0, 1.0, 2)
    for got, want in zip(C.kl_penalized_gae(*args), kl_gae_ref(*args)):
        check(got, want, 1.0, 1.0, 1025)


@needs_native
def test_native_empty():
    adv, ret = C.gae(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), 1.0, 0.95)
    assert adv.shape == ret.shape == (2, 0)
    out = C.kl_penalized_gae(*(torch.zeros(0, 5),) * 3, torch.zeros(0), torch.zeros(0, 5), 0.1, 1.0, 0.95, 0)
    assert all(o.shape == (0, 5) for o in out)


@needs_native
def test_native_with_cuda_flag():
    assert isinstance(C.with_cuda(), bool)
    if torch.version.cuda is None:  # a CPU-only torch cannot have built the CUDA part
        assert C.with_cuda() is False


@needs_native
def test_native_results_do_not_depend_on_the_thread_count():
    """Rows go to threads only from 2 x 4M elements on (csrc/gae_cpu.cpp, kMinWorkPerThread): this size runs on
    two threads when torch allows two, and must give the bits the serial loop gives."""
    B, T = 4, 1 << 21
    lp, ref, v, scores, m = make_kl_inputs(B, T, "holes")
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            kl = C.kl_penalized_gae(lp, ref, v, scores, m, 0.1, 0.99, 0.95, 2)
            outs.append(C.gae(lp, v, m, 0.99, 0.95) + kl)
    finally:
        torch.set_num_threads(before)
    for serial, threaded in zip(*outs):
        assert torch.equal(serial, threaded)


# ---------------------------------------------------------------- Triton (interpreter on the CPU): small grids


@needs_triton
@pytest.mark.parametrize("B,T,block_t,gamma,lam", [
    (1, 1, None, 0.99, 0.95), (3, 17, None, 0.99, 0.95), (3, 17, 8, 0.99, 0.95), (3, 17, 8, 1.0, 1.0),
    (3, 17, 8, 0.9, 0.0), (3, 1025, 256, 0.99, 0.95), (2, 1025, None, 1.0, 1.0)])
def test_triton_gae_matches_reference(B, T, block_t, gamma, lam):
    # block_t < T: the state (next value, last) is carried across chunks, including across empty ones.
    r, v, m = make_gae_inputs(B, T, "holes")
    adv, ret = triton_gae(r, v, m, gamma, lam, block_t=block_t)
    r_adv, r_ret = gae_ref(r, v, m, gamma, lam)
    check(adv, r_adv, gamma, lam, T)
    check(ret, r_ret, gamma, lam, T)


@needs_triton
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("B,T,block_t", [(1, 1, None), (3, 17, 8)])
def test_triton_kl_penalized_gae_matches_reference(estimator, B, T, block_t):
    args = make_kl_inputs(B, T, "holes") + (0.1, 0.9, 0.8, estimator)
    for got, want in zip(triton_kl_gae(*args, block_t=block_t), kl_gae_ref(*args)):
        check(got, want, 0.9, 0.8, T)


@needs_triton
def test_triton_kl_penalized_gae_long_row():
    # The score must reach row 2's last valid position (t = 9) through chunks with no valid token.
    args = make_kl_inputs(3, 1025, "holes") + (0.1, 1.0, 0.95, 2)
    for got, want in zip(triton_kl_gae(*args, block_t=256), kl_gae_ref(*args)):
        check(got, want, 1.0, 0.95, 1025)


_SM90_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels import gae as K

fn = K._gae_fwd_kernel
sig = {n: ("*fp32" if n.endswith("_ptr") else "i32" if n in ("B", "T") else "fp32") for n in fn.arg_names}
for kl, est in ((False, 0), (True, 0), (True, 1), (True, 2), (True, 3)):
    const = dict(KL=kl, ESTIMATOR=est, BLOCK_B=2, BLOCK_T=1024)
    s = {n: "constexpr" if n in const else t for n, t in sig.items()}
    triton.compile(ASTSource(fn, s, const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print("compiled", const)
"""


@needs_triton
def test_triton_gae_kernel_compiles_for_sm90a():
    """The interpreter accepts code the GPU compiler rejects: compile the kernel, every estimator, to sm_90a
    cubin (ptxas ships with triton; no GPU needed)."""
    import os
    import sys

    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("compiled") == 5


# ---------------------------------------------------------------- non-finite inputs (both)


@pytest.mark.parametrize("impl", GAE_IMPLS)
def test_gae_nan_at_valid_position_propagates(impl):
    B, T = 2, 20
    r, v, m = torch.randn(B, T), torch.randn(B, T), torch.ones(B, T)
    m[:, 5] = 0
    r[0, 12] = float("nan")  # reaches adv at t <= 12 (valid), not t > 12
    v[1, 8] = float("nan")  # delta at 8 and at the previous valid step (7) see it, so all t <= 8
    adv, ret = impl(r, v, m, 0.99, 0.95, block_t=8)
    assert torch.isnan(adv[0, :13][m[0, :13] != 0]).all() and torch.isfinite(adv[0, 13:]).all()
    assert torch.isnan(adv[1, :9][m[1, :9] != 0]).all() and torch.isfinite(adv[1, 9:]).all()
    assert (adv[:, 5] == 0).all()  # masked: skipped, adv = 0 even with NaN around it
    assert torch.isnan(ret[0, :13][m[0, :13] != 0]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the interpreter's numpy: expected
@pytest.mark.parametrize("impl", GAE_IMPLS)
def test_gae_inf_is_never_silently_finite(impl):
    r, v, m = make_gae_inputs(3, 17, "holes")
    r[0, 10], v[2, 4] = float("inf"), float("-inf")
    m[0, 10], m[2, 4] = 1, 1
    adv, _ = impl(r, v, m, 0.99, 0.95, block_t=8)
    r_adv, _ = gae_ref(r, v, m, 0.99, 0.95)
    assert torch.equal(torch.isfinite(adv), torch.isfinite(r_adv))
    assert torch.isfinite(r_adv).any() and not torch.isfinite(r_adv).all()


@pytest.mark.parametrize("impl", GAE_IMPLS)
def test_gae_nan_at_masked_position_does_not_leak(impl):
    r, v, m = make_gae_inputs(3, 17, "holes")
    hole = m == 0
    r_nan, v_nan = r.masked_fill(hole, float("nan")), v.masked_fill(hole, float("nan"))
    adv, ret = impl(r_nan, v_nan, m, 0.99, 0.95, block_t=8)
    r_adv, r_ret = gae_ref(r, v, m, 0.99, 0.95)
    assert_close(adv, r_adv, torch.float32)
    assert_close(ret, r_ret, torch.float32)


@pytest.mark.parametrize("impl", KL_IMPLS)
def test_kl_penalized_gae_nan(impl):
    lp, ref, v, scores, m = make_kl_inputs(3, 17, "holes")
    hole = m == 0
    # NaN at masked positions and in the score of the all-zero row: none of it may appear.
    scores[1] = float("nan")
    args = (lp.masked_fill(hole, float("nan")), ref, v, scores, m, 0.1, 0.99, 0.95, 2)
    out = impl(*args, block_t=8)
    for got, want in zip(out, kl_gae_ref(lp, ref, v, scores, m, 0.1, 0.99, 0.95, 2)):
        assert_close(got, want, torch.float32)
    assert (out[0][1] == 0).all() and (out[2][1] == 0).all()  # the empty row is all zeros
    # NaN in the logprob of a valid position: its reward and every earlier valid advantage are NaN.
    t = int((m[0] != 0).nonzero()[-2, 0])  # the second-to-last valid position of row 0
    lp2 = lp.clone()
    lp2[0, t] = float("nan")
    adv, _, rew = impl(lp2, ref, v, scores, m, 0.1, 0.99, 0.95, 2, block_t=8)
    assert torch.isnan(rew[0, t]) and torch.isnan(rew[0]).sum() == 1
    assert torch.isnan(adv[0, : t + 1][m[0, : t + 1] != 0]).all() and torch.isfinite(adv[0, t + 1:]).all()


# ---------------------------------------------------------------- bad arguments to rlhf_fast._C


def _gae_args():
    return [torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5), 0.99, 0.95]


def _kl_args():
    return [torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2), torch.ones(2, 5), 0.1, 0.99,
            0.95, 0]


@needs_native
@pytest.mark.parametrize("index,bad,exc,match", [
    (0, torch.randn(2, 5, dtype=torch.float64), TypeError, "rewards must be float32"),
    (1, torch.randn(2, 5).half(), TypeError, "values must be float32"),
    (2, torch.ones(2, 5, dtype=torch.bool), TypeError, "mask must be float32"),
    (1, torch.randn(2, 4), ValueError, r"values must have shape \[2, 5\]"),
    (0, torch.randn(10), ValueError, "rewards must be 2-D"),
    (2, torch.ones(5, 2).t(), ValueError, "mask must be contiguous"),
    (0, torch.randn(2, 5, device="meta"), ValueError, "values is on cpu but the first argument is on meta"),
])
def test_native_gae_bad_arguments(index, bad, exc, match):
    args = _gae_args()
    args[index] = bad
    with pytest.raises(exc, match=match):
        C.gae(*args)


@needs_native
@pytest.mark.parametrize("index,bad,exc,match", [
    (1, torch.randn(2, 5, dtype=torch.float64), TypeError, "ref_logprobs must be float32"),
    (2, torch.randn(3, 5), ValueError, r"values must have shape \[2, 5\]"),
    (3, torch.randn(3), ValueError, r"scores must have shape \(2,\)"),
    (3, torch.randn(2, 1), ValueError, r"scores must have shape \(2,\)"),
    (3, torch.randn(2).double(), TypeError, "scores must be float32"),
    (4, torch.ones(2, 6), ValueError, r"mask must have shape \[2, 5\]"),
    (8, 4, ValueError, "estimator must be 0"),
    (8, -1, ValueError, "estimator must be 0"),
])
def test_native_kl_penalized_gae_bad_arguments(index, bad, exc, match):
    args = _kl_args()
    args[index] = bad
    with pytest.raises(exc, match=match):
        C.kl_penalized_gae(*args)


@needs_native
def test_native_rejects_unsupported_device():
    args = [torch.randn(2, 5, device="meta") for _ in range(3)] + [0.99, 0.95]
    with pytest.raises(ValueError, match="gae: tensors on meta are not supported"):
        C.gae(*args)


# ---------------------------------------------------------------- the CUDA kernel's logic, without a GPU
#
# csrc/gae.cu's device code is compiled by the host C++ compiler under a small warp emulation: each block
# runs as 128 std::threads, __shfl_*_sync and __syncwarp go through a per-warp barrier, __shared__ becomes
# static (blocks run one after another). This checks the kernel's indexing, tiling, carries and lane scans
# on every CI machine; only the GPU test below checks the compiled CUDA itself.

_EMULATION = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>
struct EmuDim { unsigned x; };
thread_local EmuDim emu_thread, emu_block;
#define threadIdx emu_thread
#define blockIdx emu_block
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
struct EmuWarp { std::barrier<> bar{32}; uint32_t slot[32]; };
static EmuWarp* emu_warps;
template <class T> T emu_exchange(T v, int src) {
  EmuWarp& w = emu_warps[emu_thread.x / 32];
  uint32_t u;
  std::memcpy(&u, &v, 4);
  w.slot[emu_thread.x % 32] = u;
  w.bar.arrive_and_wait();
  u = w.slot[src];
  w.bar.arrive_and_wait();
  std::memcpy(&v, &u, 4);
  return v;
}
template <class T> T __shfl_down_sync(unsigned, T v, int o) {
  const int lane = emu_thread.x % 32;
  return emu_exchange(v, lane + o < 32 ? lane + o : lane);
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_exchange(v, src); }
inline void __syncwarp() { emu_warps[emu_thread.x / 32].bar.arrive_and_wait(); }
#include "kl_estimators.h"  // gae.cu includes it above its device code
#include "device_code.inc"
template <bool KL, int E> void emu_launch(const rlhf_fast::Params& p) {
  for (int64_t b = 0; b < (p.B + rlhf_fast::kWarpsPerBlock - 1) / rlhf_fast::kWarpsPerBlock; ++b) {
    std::vector<EmuWarp> warps(rlhf_fast::kWarpsPerBlock);
    emu_warps = warps.data();
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 32 * rlhf_fast::kWarpsPerBlock; ++t)
      threads.emplace_back([&p, t, b] { emu_thread.x = t; emu_block.x = unsigned(b); rlhf_fast::gae_fwd_kernel<KL, E>(p); });
    for (auto& th : threads) th.join();
  }
}
extern "C" void emu_run(int kl, int est, const float* r, const float* ref, const float* v, const float* m,
                        const float* scores, float* adv, float* ret, float* rew, int64_t B, int64_t T,
                        float kl_coef, float gamma, float lam) {
  rlhf_fast::Params p{r, ref, v, m, scores, adv, ret, rew, B, T, kl_coef, gamma, lam};
  if (!kl) return emu_launch<false, 0>(p);
  if (est == 0) emu_launch<true, 0>(p);
  if (est == 1) emu_launch<true, 1>(p);
  if (est == 2) emu_launch<true, 2>(p);
  if (est == 3) emu_launch<true, 3>(p);
}
"""


@pytest.fixture(scope="module")
def cuda_emulation(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler for the warp emulation")
    d = tmp_path_factory.mktemp("gae_cuda_emulation")
    (d / "probe.cpp").write_text("#include <barrier>\nint main() { std::barrier<> b{1}; b.arrive_and_wait(); }\n")
    probe = subprocess.run([cxx, "-std=c++20", "-pthread", "probe.cpp", "-o", "probe"], cwd=d, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the host C++ compiler has no C++20 <barrier>")
    cu = (CSRC / "gae.cu").read_text()
    begin, end = cu.index("// ---- device code begins"), cu.index("// ---- device code ends")
    (d / "device_code.inc").write_text("namespace rlhf_fast {\nnamespace {\n" + cu[begin:end] + "}\n}\n")
    (d / "emu.cpp").write_text(_EMULATION)
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", f"-I{CSRC}", "emu.cpp",
                            "-o", "libemu.so"], cwd=d, capture_output=True, text=True)
    assert build.returncode == 0, f"csrc/gae.cu device code does not build under the emulation:\n{build.stderr[-3000:]}"
    lib = ctypes.CDLL(str(d / "libemu.so"))
    lib.emu_run.restype = None
    lib.emu_run.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + \
        [ctypes.c_float] * 3

    def run(kl, est, x, ref, v, m, scores, kl_coef, gamma, lam):
        adv, ret, rew = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        ptr = lambda t: None if t is None else t.data_ptr()
        lib.emu_run(kl, est, ptr(x), ptr(ref), ptr(v), ptr(m), ptr(scores), ptr(adv), ptr(ret), ptr(rew),
                    x.shape[0], x.shape[1], kl_coef, gamma, lam)
        return adv, ret, rew

    return run


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (5, 512), (5, 513), (7, 1500)])
def test_cuda_kernel_under_warp_emulation(cuda_emulation, B, T):
    # B = 5, 7: the last block has warps past B that leave early; T = 512 is one 512-position tile exactly.
    r, v, m = make_gae_inputs(B, T, "holes")
    hole = m == 0
    r_nan, v_nan = r.masked_fill(hole, float("nan")), v.masked_fill(hole, float("nan"))  # must not leak
    adv, ret, _ = cuda_emulation(0, 0, r_nan, None, v_nan, m, None, 0.0, 0.99, 0.95)
    r_adv, r_ret = gae_ref(r, v, m, 0.99, 0.95)
    check(adv, r_adv, 0.99, 0.95, T)
    check(ret, r_ret, 0.99, 0.95, T)
    for est in ESTIMATORS:
        lp, ref, v, scores, m = make_kl_inputs(B, T, "holes")
        out = cuda_emulation(1, est, lp, ref, v, m, scores, 0.1, 1.0, 0.95)
        for got, want in zip(out, kl_gae_ref(lp, ref, v, scores, m, 0.1, 1.0, 0.95, est)):
            check(got, want, 1.0, 0.95, T)


def test_cuda_kernel_under_warp_emulation_nan_at_valid_position(cuda_emulation):
    r, v, m = torch.randn(2, 1100), torch.randn(2, 1100), torch.ones(2, 1100)
    r[0, 700] = float("nan")  # in the second of three tiles: every t <= 700 is NaN, t > 700 finite
    adv, ret, _ = cuda_emulation(0, 0, r, None, v, m, None, 0.0, 0.99, 0.95)
    assert torch.isnan(adv[0, :701]).all() and torch.isfinite(adv[0, 701:]).all()
    assert torch.isfinite(adv[1]).all() and torch.isnan(ret[0, :701]).all()


def test_cuda_kernel_under_warp_emulation_kl_precision(cuda_emulation):
    """csrc/kl_estimators.h as the CUDA kernel uses it: every estimator within 1e-3 of float64 for |d| from 1e-6
    to 10 (tests/ops/test_kl_precision.py checks the public ops; this is the device code)."""
    ds = torch.tensor([[1e-6, 1e-4, 1e-2, 1.0, 10.0, -1e-6, -1e-4, -1e-2, -1.0, -10.0]])
    lp = -ds.abs()
    ref, zeros, mask = lp - ds, torch.zeros_like(ds), torch.ones_like(ds)
    for est in ESTIMATORS:
        _, _, rew = cuda_emulation(1, est, lp, ref, zeros, mask, torch.zeros(1), 1.0, 1.0, 0.95)
        _, _, want = kl_gae_ref(lp, ref, zeros, torch.zeros(1), mask, 1.0, 1.0, 0.95, est)
        assert ((rew.double() - want).abs() <= 1e-3 * want.abs()).all(), (est, rew, want)


# ---------------------------------------------------------------- GPU (skipped without one)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (5, 1025), (9, 3001)])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_kernels_match_reference(B, T, backend):
    if backend == "native" and (C is None or not C.with_cuda()):
        pytest.skip("rlhf_fast._C was built without CUDA")
    r, v, m = make_gae_inputs(B, T, "holes")
    impl = native_gae if backend == "native" else triton_gae
    adv, ret = impl(r.cuda(), v.cuda(), m.cuda(), 0.99, 0.95)
    r_adv, r_ret = gae_ref(r, v, m, 0.99, 0.95)
    check(adv.cpu(), r_adv, 0.99, 0.95, T)
    check(ret.cpu(), r_ret, 0.99, 0.95, T)
    for est in ESTIMATORS:
        args = make_kl_inputs(B, T, "holes") + (0.1, 1.0, 0.95, est)
        cuda_args = tuple(x.cuda() if torch.is_tensor(x) else x for x in args)
        kl_impl = native_kl_gae if backend == "native" else triton_kl_gae
        for got, want in zip(kl_impl(*cuda_args), kl_gae_ref(*args)):
            check(got.cpu(), want, 1.0, 0.95, T)

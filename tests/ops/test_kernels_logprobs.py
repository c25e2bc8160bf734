"""kernels/logprobs.py launchers against a float64 reference on materialised logits (Triton interpreter on CPU)."""

import pytest
import torch

from tests.tolerances import assert_close

K = pytest.importorskip("rlhf_fast.kernels.logprobs")
GPU_CONFIG = dict(K.CONFIG)  # the shipped defaults, before the fixture below shrinks them



@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Interpreter-sized tiles (tl.dot needs >= 16) and one-tile chunks: the backward takes V = 37 as 32 + 5
    columns (N <= V) or N = 40 as 16 + 16 + 8 rows (N > V; one test widens them)."""
    for key, val in dict(block_n=16, block_v=32, block_h=16, mm_block_m=16, mm_block_n=16, mm_block_k=16,
                         mm_group_m=2, row_block_n=4, row_block_v=32, chunk_bytes=1, ppo_chunk_bytes=1,
                         target_programs=4).items():
        monkeypatch.setitem(K.CONFIG, key, val)


def ref_logprobs(logits, targets, temperature, ignore_index):
    """log_softmax(logits / T)[target] and -sum p log p, float64, 0 on ignored rows."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # p log p -> 0 where p = 0 (a masked vocabulary)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0), torch.logsumexp(logits / temperature, -1)


def make_inputs(N, H, V, dtype, bias, ignore_index, scale=1.0):
    hidden = torch.randn(N, H).to(dtype)
    weight = (scale * torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    if N > 2:
        targets[1] = ignore_index
        targets[N - 3] = ignore_index
    return hidden, weight, b, targets


# (N, H, V, dtype, bias, temperature, ignore_index)
LINEAR_CASES = [
    (1, 16, 37, torch.float32, False, 1.0, -100),
    (17, 24, 301, torch.float32, True, 0.7, -100),
    (17, 16, 37, torch.float32, True, 1.3, -1),
    (17, 24, 301, torch.bfloat16, True, 0.7, -100),
    (1, 24, 37, torch.bfloat16, False, 1.0, -100),
    (17, 16, 37, torch.float16, False, 0.7, -100),
    (40, 16, 37, torch.float32, True, 0.7, -100),  # N > V: the backward chunks rows instead of columns
    (40, 16, 37, torch.bfloat16, True, 1.0, -100),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"N{c[0]}H{c[1]}V{c[2]}-{c[3]}-b{c[4]}-T{c[5]}")
def test_linear_logprobs_fwd_bwd(case, monkeypatch):
    N, H, V, dtype, bias, temperature, ignore = case
    hidden, weight, b, targets = make_inputs(N, H, V, dtype, bias, ignore, scale=3.0)
    if N > V:  # row chunks of 32 + 8: two row tiles (and two bias partial sums) in the first
        monkeypatch.setitem(K.CONFIG, "chunk_bytes", 32 * V * hidden.element_size())
    lp, ent, lse = K.linear_logprobs_fwd(hidden, weight, targets, b, temperature, ignore, True)
    assert lp.dtype == ent.dtype == lse.dtype == torch.float32 and lp.shape == (N,)

    leaves = [x.double().requires_grad_(True) for x in (hidden, weight, b) if x is not None]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias else 0.0)
    r_lp, r_ent, r_lse = ref_logprobs(logits, targets, temperature, ignore)
    assert_close(lp, r_lp, dtype)
    assert_close(ent, r_ent, dtype)
    valid = targets != ignore
    assert_close(lse[valid], r_lse[valid], dtype)

    g_lp, g_ent = torch.randn(N), torch.randn(N)
    gh, gw, gb = K.linear_logprobs_bwd(hidden, weight, targets, b, lse, ent, g_lp, g_ent, temperature, ignore,
                                       True, True)
    r_grads = torch.autograd.grad((r_lp * g_lp + r_ent * g_ent).sum(), leaves)
    assert gh.dtype == dtype and gh.shape == hidden.shape
    assert gw.dtype == torch.float32 and gw.shape == weight.shape
    # grad_hidden comes back in the input dtype (one rounding); grad_weight/bias are fp32 but are reductions of
    # the logit gradient rounded to the input dtype (as PyTorch's own low-precision backward does): input tol.
    assert_close(gh, r_grads[0], dtype)
    assert_close(gw, r_grads[1], dtype)
    if bias:
        assert gb.dtype == torch.float32
        assert_close(gb, r_grads[2], dtype)
    else:
        assert gb is None
    assert (gh[~valid] == 0).all()


@pytest.mark.parametrize("target_programs", [1, 64])
def test_linear_logprobs_split_and_flags(monkeypatch, target_programs):
    """One V split and one split per V tile give the same answers; optional outputs are honoured."""
    monkeypatch.setitem(K.CONFIG, "target_programs", target_programs)
    N, H, V, T = 5, 16, 301, 0.9
    hidden, weight, b, targets = make_inputs(N, H, V, torch.float32, True, -100, scale=3.0)
    lp, ent, lse = K.linear_logprobs_fwd(hidden, weight, targets, b, T, -100, False)
    assert ent is None
    leaves = [x.double().requires_grad_(True) for x in (hidden, weight, b)]
    r_lp, _, _ = ref_logprobs(leaves[0] @ leaves[1].T + leaves[2], targets, T, -100)
    assert_close(lp, r_lp)
    g_lp = torch.randn(N)
    gh, gw, gb = K.linear_logprobs_bwd(hidden, weight, targets, b, lse, None, g_lp, None, T, -100, False, False)
    assert gw is None and gb is None
    assert_close(gh, torch.autograd.grad((r_lp * g_lp).sum(), leaves[0], retain_graph=True)[0])
    # an expanded (stride-0) upstream gradient, as autograd hands in after lp.sum()
    ones = torch.ones(1).expand(N)
    gh, _, _ = K.linear_logprobs_bwd(hidden, weight, targets, b, lse, None, ones, None, T, -100, False, False)
    assert_close(gh, torch.autograd.grad(r_lp.sum(), leaves[0])[0])


def test_linear_logprobs_all_ignored():
    hidden, weight, b, _ = make_inputs(4, 16, 37, torch.float32, True, -100)
    targets = torch.full((4,), -100)
    lp, ent, lse = K.linear_logprobs_fwd(hidden, weight, targets, b, 1.0, -100, True)
    assert (lp == 0).all() and (ent == 0).all() and torch.isfinite(lse).all()
    gh, gw, gb = K.linear_logprobs_bwd(hidden, weight, targets, b, lse, ent, torch.ones(4), torch.ones(4), 1.0,
                                       -100, True, True)
    assert (gh == 0).all() and (gw == 0).all() and (gb == 0).all()


# (N, V, dtype, temperature)
LOGITS_CASES = [
    (1, 37, torch.float32, 1.0),
    (17, 301, torch.float32, 0.7),
    (17, 37, torch.bfloat16, 1.3),
    (17, 301, torch.float16, 1.0),
]


@pytest.mark.parametrize("case", LOGITS_CASES, ids=lambda c: f"N{c[0]}V{c[1]}-{c[2]}-T{c[3]}")
def test_logits_logprobs_fwd_bwd(case):
    N, V, dtype, temperature = case
    logits = (4 * torch.randn(N, V)).to(dtype)
    targets = torch.randint(0, V, (N,))
    if N > 2:
        targets[[0, 7]] = -100
    lp, ent, lse = K.logits_logprobs_fwd(logits, targets, temperature, -100, True)
    x = logits.double().requires_grad_(True)
    r_lp, r_ent, r_lse = ref_logprobs(x, targets, temperature, -100)
    assert_close(lp, r_lp, dtype)
    assert_close(ent, r_ent, dtype)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    gl = K.logits_logprobs_bwd(logits, targets, lse, ent, g_lp, g_ent, temperature, -100)
    assert gl.dtype == dtype and gl.shape == logits.shape
    assert_close(gl, torch.autograd.grad((r_lp * g_lp + r_ent * g_ent).sum(), x, retain_graph=True)[0], dtype)
    # no entropy term
    gl = K.logits_logprobs_bwd(logits, targets, lse, None, g_lp, None, temperature, -100)
    assert_close(gl, torch.autograd.grad((r_lp * g_lp).sum(), x)[0], dtype)


def test_logits_masked_vocab_and_nan():
    """-inf logits (a masked vocabulary) are exact zeros of p, not NaN; a NaN logit makes its row NaN."""
    N, V = 6, 37
    logits = 3 * torch.randn(N, V)
    targets = torch.randint(0, V // 2, (N,))
    logits[:, V // 2:] = float("-inf")
    logits[2, 0:3] = float("-inf")
    targets[2] = 5
    lp, ent, lse = K.logits_logprobs_fwd(logits, targets, 0.8, -100, True)
    x = logits.double().requires_grad_(True)
    r_lp, r_ent, _ = ref_logprobs(x, targets, 0.8, -100)
    assert_close(lp, r_lp)
    assert_close(ent, r_ent)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    gl = K.logits_logprobs_bwd(logits, targets, lse, ent, g_lp, g_ent, 0.8, -100)
    assert_close(gl, torch.autograd.grad((r_lp * g_lp + r_ent * g_ent).sum(), x)[0])

    logits = torch.randn(N, V)
    logits[3, 10] = float("nan")
    lp, ent, _ = K.logits_logprobs_fwd(logits, targets, 1.0, -100, True)
    assert torch.isnan(lp[3]) and torch.isnan(ent[3])
    assert torch.isfinite(lp[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_strided_accumulate(dtype):
    """The GEMM behind grad_hidden/grad_weight: transposed operand by strides, bias, scale, fp32 accumulation."""
    a = torch.randn(37, 21).to(dtype)
    b = torch.randn(33, 37).to(dtype)
    bias = torch.randn(33).to(dtype)
    out = torch.randn(21, 33)
    expect = out.double() + 0.5 * (a.double().T @ b.double().T + bias.double())
    K.matmul(a.t(), b.t(), out, bias=bias, scale=0.5, accumulate=True)
    assert_close(out, expect, dtype)


def test_gpu_default_config_and_empty(monkeypatch):
    """The shipped (GPU) block sizes run too (tiles larger than N, V and H), and N = 0 gives empty outputs."""
    monkeypatch.setattr(K, "CONFIG", dict(GPU_CONFIG))
    N, H, V = 3, 24, 37
    hidden, weight, b, targets = make_inputs(N, H, V, torch.float32, True, -100, scale=3.0)
    lp, ent, lse = K.linear_logprobs_fwd(hidden, weight, targets, b, 0.7, -100, True)
    leaves = [x.double().requires_grad_(True) for x in (hidden, weight, b)]
    r_lp, r_ent, _ = ref_logprobs(leaves[0] @ leaves[1].T + leaves[2], targets, 0.7, -100)
    assert_close(lp, r_lp)
    assert_close(ent, r_ent)
    g_lp = torch.randn(N)
    gh, gw, gb = K.linear_logprobs_bwd(hidden, weight, targets, b, lse, ent, g_lp, None, 0.7, -100, True, True)
    for got, want in zip((gh, gw, gb), torch.autograd.grad((r_lp * g_lp).sum(), leaves)):
        assert_close(got, want)

    empty = torch.zeros(0, dtype=torch.long)
    lp, ent, lse = K.linear_logprobs_fwd(hidden[:0], weight, empty, b, 1.0, -100, True)
    assert lp.shape == ent.shape == (0,)
    gh, gw, gb = K.linear_logprobs_bwd(hidden[:0], weight, empty, b, lse, ent, lp, ent, 1.0, -100, True, True)
    assert gh.shape == (0, H) and (gw == 0).all() and (gb == 0).all()


_SM90_COMPILE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels import logprobs as K, ppo_loss as P

C = K.CONFIG
HINT = {"M", "N", "K", "H", "V", "stride_x", "stride_w", "stride_g", "stride_am", "stride_bk", "stride_cm"}


def build(fn, types, const, warps, stages):
    const = {**const, **({"stride_ak": 1, "stride_bn": 1, "stride_cn": 1} if fn is K._matmul_kernel else {})}
    sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in fn.arg_names}
    # pointers and the dimensions/strides a real launch would see as multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (n in HINT and sig[n] == "i32")}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    assert k.metadata.shared <= 200 * 1024, (fn.__name__, k.metadata.shared)
    print(fn.__name__, const, "shared", k.metadata.shared)


f32 = "*fp32"
for dt, bk, prec in (("*bf16", C["block_h"], "ieee"), (f32, C["block_h"] // 2, K.FP32_DOT_PRECISION)):
    for linear in (True, False):
        bn, bv, w, st = ((C["block_n"], C["block_v"], C["num_warps"], C["num_stages"]) if linear else
                         (C["row_block_n"], C["row_block_v"], C["row_num_warps"], 1))
        x = dt if linear else f32
        types = dict(x_ptr=x, w_ptr=dt, b_ptr=dt, tgt_ptr="*i64", inv_t="fp32", g_scale="fp32", g_ptr=dt)
        types.update({n: f32 for n in ("m_ptr", "s_ptr", "t_ptr", "zt_ptr", "lse_ptr", "ent_ptr", "glp_ptr",
                                       "gent_ptr", "gb_ptr")})
        dot = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bk, UPCAST=False, PREC=prec, LINEAR=linear, HAS_BIAS=linear)
        build(K._logprobs_partials_kernel, types, dot, w, st)
        build(K._logprobs_grad_kernel, types, dict(dot, HAS_ENT=True, BIAS_GRAD=True), w, st)
    mm_types = dict(a_ptr=dt, b_ptr=dt, bias_ptr=dt, tgt_ptr="*i64", m_ptr=f32, s_ptr=f32, t_ptr=f32, zt_ptr=f32,
                    scale="fp32")
    # grad_hidden (out in the input dtype), grad_weight (fp32 +=), PPO logits chunk (fp32 + row statistics)
    for out, acc, stats in ((dt, False, False), (f32, True, False), (f32, False, True)):
        build(K._matmul_kernel, dict(mm_types, c_ptr=out),
              dict(ACCUMULATE=acc, HAS_BIAS=True, STATS=stats, BLOCK_M=C["mm_block_m"], BLOCK_N=C["mm_block_n"],
                   BLOCK_K=bk, GROUP_M=C["mm_group_m"], UPCAST=False, PREC=prec), C["num_warps"], C["num_stages"])
build(K._logprobs_combine_kernel, {n: f32 for n in K._logprobs_combine_kernel.arg_names[:8]} | {"tgt_ptr": "*i64"},
      dict(NEED_ENT=True, BLOCK_N=64, BLOCK_S=64), 4, 1)
build(P._ppo_token_kernel, {n: f32 for n in P._ppo_token_kernel.arg_names[:10]} | {"tgt_ptr": "*i64"}
      | {n: "fp32" for n in ("kl_coef", "entropy_coef", "ratio_low", "ratio_high", "dual_clip")},
      dict(HAS_REF=True, KL_EST=2, HAS_DUAL=True, NEED_GRAD=True, BLOCK=1024), 4, 1)
'''


def test_kernels_compile_for_sm90a():
    """The interpreter accepts code the GPU compiler rejects (non-constexpr globals, dot shapes, shared memory):
    compile every kernel with the shipped configs to sm_90a cubin (ptxas ships with triton; no GPU needed)."""
    import os
    import subprocess
    import sys

    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_combine_stats_many_splits():
    """The per-split merge loops over splits in blocks of 64: 70 column groups of 3 logits, merged."""
    N, S, W = 5, 70, 3
    z = 3 * torch.randn(N, S * W, dtype=torch.float64)
    z[1, :W] = float("-inf")  # a whole split masked
    targets = torch.tensor([0, 100, 209, -100, 57])
    zs = z.view(N, S, W)
    m = zs.amax(-1).clamp(min=-1e30)
    e = torch.exp(zs - m[..., None])
    t = (e * torch.where(torch.isfinite(zs), zs - m[..., None], 0.0)).sum(-1)
    zt = torch.zeros(N, S, dtype=torch.float64)
    for r in range(N):
        if targets[r] >= 0:
            zt[r, targets[r] // W] = z[r, targets[r]]
    part = torch.stack([m, e.sum(-1), t, zt]).transpose(1, 2).reshape(4, S * N).float().contiguous()
    lp, ent, lse = (torch.empty(N) for _ in range(3))
    K.combine_stats(part, S, targets, -100, lp, ent, lse)
    r_lp, r_ent, r_lse = ref_logprobs(z, targets, 1.0, -100)
    assert_close(lp, r_lp)
    assert_close(ent, r_ent)
    assert_close(lse, r_lse)

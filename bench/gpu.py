"""The GPU benchmark, in one run (one 10-minute device call on an H100):

(a) builds rlhf_fast._C in place when a fresh interpreter cannot import it (with CUDA where torch has it),
(b) checks every op on the GPU against a float64 reference, per backend (triton, native, torch): pass/fail table,
(c) measures the ceilings: bf16 GEMM TFLOP/s at 8192^3, device-to-device copy GB/s (read + write),
(d) times (median of triton.testing.do_bench) fused_linear_logprobs and fused_linear_ppo_loss against eager
    PyTorch (materialised logits + log_softmax + gather), torch.compile of the same, and Liger-Kernel
    (LigerFusedLinearCrossEntropyLoss, LigerFusedLinearGRPOLoss) when importable, with peak memory, at
    bf16 N=8192, H=4096, V=151936; and GAE at B=1024, T=8192 fp32 against the Python loop on the same GPU,
(e) runs RoleModel.experience() against the four-model recipe through rlhf_fast/bench/role_model.py:gpu_compare,
(f) prints a markdown table last (sections run in the order check, ceilings, gae, role_model, logprobs,
    ppo, so a run cut short by --budget-s loses only the slowest rows) and writes <out>/<device>-<date>.md and .json.

The measurements live in rlhf_fast/bench/ (measure.py, sections.py) (`rlhf-fast bench` runs the same).

Liger-Kernel on the device machine (no internet there): here, in the repo root, once,
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl liger-kernel==0.8.5
(.whl/ is git-ignored; the wheel is pure Python and needs only torch and triton, which the image has), then in
the device command, with `.whl` carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    export RLHF_FAST_GIT_COMMIT=<`git rev-parse --short=12 HEAD` here; the device's copy has no .git>
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT 2>&1 | tee $OUT/log.txt
and copy $OUT/*.md, $OUT/*.json into bench/results/ and commit them.

Flags: --smoke (tiny shapes; without CUDA, on the CPU under TRITON_INTERPRET=1, do_bench -> perf_counter
median, memory n/a, torch.compile skipped; Liger runs under the interpreter when importable), --out DIR, --only SECTION[,SECTION] (check, ceilings,
logprobs, ppo, gae, role_model), --budget-s (default 540). Exit status 1 when a correctness check fails.
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_fast.bench import cli as bench_cli  # noqa: E402 - stdlib-only at import; torch is imported inside main


def main(argv: list[str]) -> int:
    args = ["--mode", "gpu", *argv]
    if "--build-status" not in argv and os.environ.get("RLHF_FAST_BENCH_BUILT") is None:
        os.environ.setdefault("RLHF_FAST_BENCH_T0", str(time.time()))  # the build counts against --budget-s
        import torch

        build = bench_cli.ensure_built(require_cuda=torch.cuda.is_available())
        print(f"rlhf_fast._C: {build['status']}\n{build['log']}", flush=True)
        # Re-exec so a fresh interpreter sees the freshly built extension.
        os.environ["RLHF_FAST_BENCH_BUILT"] = build["status"]
        os.execv(sys.executable, [sys.executable, __file__, *argv, "--build-status", build["status"]])
    return bench_cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

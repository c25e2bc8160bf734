"""The CPU comparisons, once, into bench/results/cpu-<date>.md and .json (and printed as markdown):

- GAE at B=64, T=4096 fp32: native C++ and the torch-vectorised backend against the Python loop over time
  (the GAE engineer's bench/test_bench_gae_cpu.py:python_loop_gae when it imports);
- fused_linear_logprobs (torch backend) against materialised logits at N=4096, H=256, V=32768 fp32: forward +
  backward time, and peak extra memory measured in a fresh process per variant.

Usage: python bench/cpu_report.py [--out DIR] [--only gae,logprobs] [--note "2-core CPU, shared with ..."]
Same as `rlhf-fast bench --mode cpu`; the measurements live in rlhf_fast/bench/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_fast.bench import cli as bench_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_cli.main(["--mode", "cpu", *sys.argv[1:]]))

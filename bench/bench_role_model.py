"""RoleModel.experience() against the four-model PPO recipe on the CPU (run from the repo root):

    python bench/bench_role_model.py [--batch 8 --seq 256 --reps 3 --threads 1]
        -> bench/results/cpu-role-model-<date>.{md,json}

The measurement lives in rlhf_fast/bench/role_model.py (also behind `rlhf-fast bench`'s role_model section).
"""

from rlhf_fast.bench.role_model import main

if __name__ == "__main__":
    main()

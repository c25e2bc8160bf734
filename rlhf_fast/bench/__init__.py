"""Measurement code behind `rlhf-fast bench`, bench/gpu.py and bench/cpu_report.py (installed with the package;
it loads no repository file by path).

    measure.py     timing, peak memory, inputs, baselines (the peers' Python GAE loop, eager log-probs)
    sections.py    one function per report section (check, ceilings, logprobs, ppo, gae, role_model, ...)
    role_model.py  RoleModel.experience() against the four-model recipe
    cli.py         the runner: sections in order, a time budget, the markdown + JSON report
"""

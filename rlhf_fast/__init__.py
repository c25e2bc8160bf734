"""rlhf_fast: fused-kernel RLHF on one model copy.

Submodules: rlhf_fast.ops (fused ops), rlhf_fast.models (RoleModel), rlhf_fast.trainers (SFT, RM, PPO).
"""

__version__ = "0.1.0"


def env_report(print_it: bool = True) -> str:
    """Which backends are available here, and why not. Also `python -m rlhf_fast.env`."""
    from rlhf_fast.env import format_report

    text = format_report()
    if print_it:
        print(text)
    return text

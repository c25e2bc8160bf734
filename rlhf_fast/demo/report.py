"""The demo's report: plots (matplotlib, Agg) and report.md from the run's figures."""

from __future__ import annotations

import os


def plots(out: str, curves: dict[str, list[dict]], points: dict[str, dict] | None = None,
          best_of_n: list[dict] | None = None) -> list[str]:
    """reward_vs_step.png, kl_vs_step.png and gold_vs_kl.png (the frontier: the PPO curves, `points`, final
    policies of other methods as {"kl", "gold_score", "proxy_reward"}, as single markers, and the Best-of-N curve
    as rows {"n", "kl", "gold_score"})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, c in curves.items():
        steps = [r["step"] for r in c]
        for ax, key in ((axes[0], "proxy_reward"), (axes[1], "gold_score")):
            line, = ax.plot(steps, [r[key] for r in c], marker="o", label=label)
            kept = [r for r in c if r.get("kept")]  # the checkpoint the run kept (run_ppo, ppo_keep)
            ax.scatter([r["step"] for r in kept], [r[key] for r in kept], marker="D", s=70, facecolors="none",
                       edgecolors=line.get_color(), linewidths=1.5, zorder=3)
    axes[0].set(title="proxy reward (reward model); diamond: the kept checkpoint", xlabel="PPO step")
    axes[1].set(title="gold score (hidden labeler)", xlabel="PPO step")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_vs_step.png"), dpi=110)
    names.append("reward_vs_step.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, c in curves.items():
        ax.plot([r["step"] for r in c], [r["kl"] for r in c], marker="o", label=label)
    ax.set(title="KL(policy || SFT reference) per response", xlabel="PPO step", ylabel="nats")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kl_vs_step.png"), dpi=110)
    names.append("kl_vs_step.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    for label, c in curves.items():
        ax.plot([r["kl"] for r in c], [r["gold_score"] for r in c], marker="o", label=f"{label}: gold")
        ax.plot([r["kl"] for r in c], [r["proxy_reward"] for r in c], ls="--", marker="x", alpha=0.6,
                label=f"{label}: proxy")
    if best_of_n:
        ax.plot([r["kl"] for r in best_of_n], [r["gold_score"] for r in best_of_n], marker="s", color="black",
                label="Best-of-N (N = " + ",".join(str(r["n"]) for r in best_of_n) + "): gold")
    for label, p in (points or {}).items():
        ax.scatter([p["kl"]], [p["gold_score"]], marker="*", s=120, zorder=3, label=f"{label}: gold")
    ax.set(title="over-optimisation frontier", xlabel="KL to SFT (nats per response)", ylabel="score")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the low-KL corner stays visible
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gold_vs_kl.png"), dpi=110)
    names.append("gold_vs_kl.png")
    plt.close(fig)
    return names


def _ppo_rows(r: dict) -> list[tuple[str, dict]]:
    """(row name, block) of the PPO runs in a report: the KL run, the no-KL run and its control (KL on, the no-KL
    run's learning rate and steps)."""
    def name(b: dict, what: str) -> str:
        extra = f", lr {b['lr']:g}, {b['steps']} steps" if "lr" in b else ""
        kept = f", kept step {b['kept_step']}" if "kept_step" in b else ""
        return what + extra + kept

    def penalty(b: dict) -> str:  # reports before the adaptive controller carry kl_coef only
        return b.get("kl_label") or f"kl_coef={b['kl_coef']}"

    rows = [(name(r["ppo"], penalty(r["ppo"])), r["ppo"]),
            (name(r["ppo_no_kl"], "no KL penalty"), r["ppo_no_kl"])]
    if r.get("ppo_kl_control"):
        rows.append((name(r["ppo_kl_control"], f"{penalty(r['ppo_kl_control'])} (control)"), r["ppo_kl_control"]))
    return rows


_KEEP_WORDS = {"best_proxy": "the checkpoint with the highest proxy reward on the monitor prompts (the eval points "
                             "after step 0; the choice reads no gold)",
               "best_proxy_late": "the checkpoint with the highest proxy reward on the monitor prompts among the eval "
                                  "points of the run's last quarter (the choice reads no gold)",
               "last": "the run's last checkpoint"}


def _kept_sentence(r: dict) -> str:
    cfg = r.get("config") or {}
    keep = cfg.get("ppo_keep", "last")
    no_kl = cfg.get("no_kl_keep", keep)  # reports before no_kl_keep: the no-KL run kept as the others
    if no_kl == keep:
        return f"Each PPO row is {_KEEP_WORDS[keep]}, evaluated on the held-out prompts."
    return (f"Each PPO row is {_KEEP_WORDS[keep]}; the no-KL row {_KEEP_WORDS[no_kl]}: where the unpenalised run "
            "ends up. Each evaluated on the held-out prompts.")


def write_markdown(out: str, report: dict, examples: list[tuple[str, str, str, str]]) -> None:
    r = report
    lines = [
        "# rlhf-fast demo", "",
        f"Synthetic language, tiny Llama ({r['params']['base']:,} base parameters), all four roles on one base "
        f"(params.total = {r['params']['total']:,} = {r['params']['total'] / r['params']['base']:.3f} x base). "
        f"Wall time {r['wall_seconds']:.0f} s ({r.get('cpu_seconds', float('nan')):.0f} s of CPU). Gold = the hidden preference the labeler follows; proxy = the "
        "reward model. Evaluated on "
        f"{r['eval_prompts']} held-out prompts, one sample each at temperature 1. " + _kept_sentence(r), "",
        "| policy | gold score | win rate vs SFT (gold) | proxy reward | KL to SFT |",
        "|---|---|---|---|---|",
        f"| SFT | {r['sft']['gold_score']:.3f} | 0.500 | {r['sft']['proxy_reward']:.3f} | 0 |",
        *[f"| PPO, {name} | {b['gold_score']:.3f} | {b['gold_win_rate_vs_sft']:.3f} | {b['proxy_reward']:.3f} "
          f"| {b['kl']:.2f} |" for name, b in _ppo_rows(r)],
        *[f"| DPO (sigmoid), beta={d['beta']:g} | {d['gold_score']:.3f} | {d['gold_win_rate_vs_sft']:.3f} "
          f"| {d['proxy_reward']:.3f} | {d['kl']:.2f} |" for d in r.get("dpo_sweep") or []],
        f"| best possible | {r['max_gold_score']:.3f} | | | |", "",
        "DPO learns from the reward model's own labeled pairs, with no reward model and no sampling; its proxy "
        "column is that reward model's score of its samples, for comparison only.", "",
        f"Reward model: held-out accuracy {r['rm']['heldout_accuracy']:.3f} against the labels (labeler agreement "
        f"with the noiseless gold order, its ceiling: {r['rm']['labeler_agreement']:.3f}); "
        f"{r['rm']['heldout_gold_accuracy']:.3f} against the gold order. {r['rm']['train_pairs']} training pairs.", "",
        *best_of_n_lines(r.get("best_of_n")),
        *all_stages_lines(r),
        *grpo_lines(r.get("grpo")),
        "![proxy and gold reward against step](reward_vs_step.png)", "",
        "![KL against step](kl_vs_step.png)", "",
        "![gold score against KL](gold_vs_kl.png)", "",
        "## Samples (held-out prompts)", "",
        "| prompt | SFT | PPO | PPO, no KL |", "|---|---|---|---|",
    ]
    lines += [f"| {p} | {a} | {b} | {c} |" for p, a, b, c in examples]
    lines += ["", "Stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()), ""]
    if r.get("stage_cpu_seconds"):
        lines += ["Stage CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_cpu_seconds"].items()), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def grpo_lines(g: dict | None) -> list[str]:
    """The RLVR stage: held-out accuracy of the counting task before and after GRPO."""
    if not g:
        return []
    return [
        f"RL with a verifiable reward (GRPO, {g['steps']} steps, the checker `task.count_accuracy`): held-out "
        f"accuracy on {g['heldout_prompts']} counting prompts, one sample at temperature 1: "
        f"{g['accuracy_before']:.3f} (SFT) -> **{g['accuracy_after']:.3f}**; greedy: "
        f"{g['greedy_accuracy_before']:.3f} -> {g['greedy_accuracy_after']:.3f}.", ""]


def best_of_n_lines(rows: list[dict] | None) -> list[str]:
    """Best-of-N from the SFT model against N: gold, proxy, measured KL and the closed form."""
    if not rows:
        return []
    return ["Best-of-N from the SFT model, picked by the reward model (gold and KL exact on the empirical "
            "distribution of the samples per prompt; the closed form log N - (N - 1)/N assumes no two samples tie):",
            "", "| N | gold score | proxy reward | KL measured | log N - (N-1)/N |", "|---|---|---|---|---|",
            *[f"| {r['n']} | {r['gold_score']:.3f} | {r['proxy_reward']:.3f} | {r['kl']:.3f} | {r['kl_bound']:.3f} |"
              for r in rows], ""]


def all_stages_lines(r: dict) -> list[str]:
    """`--all`: the AI labeler and the reward-model ensemble."""
    lines = []
    a = r.get("ai_labeler")
    if a:
        p = a["ppo"]
        lines += [f"AI labeler (the pre-trained base asked for the user's rating, RLAIF): agrees with the gold order on "
                  f"{a['labeler_agreement']:.3f} of the {a['pairs']} training pairs (the noisy human labeler: "
                  f"{r['rm']['labeler_agreement']:.3f}). A reward model on its labels orders held-out pairs as the gold "
                  f"does {a['rm_heldout_gold_accuracy']:.3f} of the time (on the human labels: "
                  f"{r['rm']['heldout_gold_accuracy']:.3f}); PPO on it: gold score {p['gold_score']:.3f}, win rate vs "
                  f"SFT {p['gold_win_rate_vs_sft']:.3f}, KL {p['kl']:.2f}.", ""]
    e = r.get("ensemble")
    if e:
        p, s = e["ppo_no_kl"], r["ppo_no_kl"]
        lines += [f"Reward-model ensemble ({e['members']} reward adapters on the one base, bootstrap resamples; "
                  f"held-out accuracy of their mean {e['rm_heldout_accuracy']:.3f}), PPO without KL on "
                  f"{e['reduce']} (penalty {e['penalty']:g}) against the single reward model's no-KL run:", "",
                  "| no-KL PPO on | gold score | proxy reward | KL to SFT |", "|---|---|---|---|",
                  f"| one reward model | {s['gold_score']:.3f} | {s['proxy_reward']:.3f} | {s['kl']:.2f} |",
                  f"| the ensemble | {p['gold_score']:.3f} | {p['proxy_reward']:.3f} (members' mean) | {p['kl']:.2f} |",
                  ""]
    return lines

"""Peak memory of one real TRL 1.16 step (GRPOTrainer and DPOTrainer) on the CPU at V = 32768, three ways:

    trl           TRL's own fused LM head (trl.trainer.utils._ChunkedLogProbFunction, unpatched)
    rlhf_fast     after rlhf_fast.integrations.trl.patch_trl(): fused_linear_logprobs scores the tokens
    materialised  the same slot given full (N, V) fp32 logits + TRL's selective_log_softmax and
                  entropy_from_logits: the recipe before TRL had a fused head, as a reference point

Run from the repo root (needs trl, see docs/trl.md):

    .venv/bin/python bench/bench_trl_memory.py [--reps 3] [--out bench/results]
        -> bench/results/cpu-trl-memory-<date>.{md,json}

Each (trainer, variant, repetition) is a fresh process with one thread; the variants alternate within a
repetition (rotated order). In it: build the trainer, then one `trainer.train()` (max_steps=1) for the RSS
figure: ru_maxrss after the step minus the RSS before it (glibc's mmap threshold fixed at 128 KiB so freed
blocks leave the RSS, as in rlhf_fast/bench/measure.py); then a second one-step `train()` under
torch.profiler for the peak of live tensor bytes beyond those alive before it (rlhf_fast.bench.measure.
tensor_peak_extra_bytes). Both figures include what every variant allocates alike (AdamW state, gradients,
the backbone's activations, GRPO's generation); the model is tiny (hidden 64, 2 layers) so the LM head's
share dominates. The measurement code lives here rather than in rlhf_fast/bench/ because TRL is an optional
test dependency.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rlhf_fast.bench.measure import cpu_name, git_commit

VOCAB = 32768
HIDDEN = 64
VARIANTS = ("trl", "rlhf_fast", "materialised")
TRAINERS = ("grpo", "dpo")
# Shapes: GRPO scores B x (prompt + completion - 1) positions per forward; DPO 2B x (max_length - 1).
GRPO = dict(batch=8, num_generations=4, prompt_words=16, max_completion_length=128)
DPO = dict(batch=8, prompt_words=32, answer_words=96, max_length=128)
MiB = 1 << 20


# --------------------------------------------------------------------------------------- model and data


def _build_model(folder: str) -> None:
    """Random tiny Llama with V = 32768 and a WordLevel tokenizer over as many words (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def _words(rng, n: int) -> str:
    return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(n))


def _reward(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def _trainer(kind: str, folder: str, out_dir: str):
    import random

    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(folder)  # the model's class would pick LlamaTokenizer
    rng = random.Random(0)
    common = dict(output_dir=out_dir, max_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no",
                  logging_steps=1, bf16=False, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if kind == "grpo":
        g = GRPO
        args = GRPOConfig(**common, per_device_train_batch_size=g["batch"], num_generations=g["num_generations"],
                          max_completion_length=g["max_completion_length"], temperature=0.7, beta=0.04,
                          use_vllm=False)
        data = Dataset.from_list([{"prompt": _words(rng, g["prompt_words"])} for _ in range(8)])
        return GRPOTrainer(model=folder, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok)
    d = DPO
    args = DPOConfig(**common, per_device_train_batch_size=d["batch"], max_length=d["max_length"], beta=0.1)
    data = Dataset.from_list([{"prompt": _words(rng, d["prompt_words"]), "chosen": " " + _words(rng, d["answer_words"]),
                               "rejected": " " + _words(rng, d["answer_words"])} for _ in range(16)])
    return DPOTrainer(model=folder, args=args, train_dataset=data, processing_class=tok)


class MaterialisedHead:
    """TRL's kernel slot filled with the pre-fused-head recipe: the whole (N, V) fp32 logits, then TRL's
    selective_log_softmax and entropy_from_logits. Reference point only."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=()):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale / temperature  # (N, V)
        logps = selective_log_softmax(logits, targets)
        entropy = entropy_from_logits(logits) if "entropy" in outputs else None
        with torch.no_grad():
            log_p = torch.log_softmax(logits, dim=-1) if "log_sum_sq_probs" in outputs else None
            extra = (torch.logsumexp(2 * log_p, dim=-1) if log_p is not None else None,
                     logits.mean(-1) if "mean_logits" in outputs else None,
                     logits.argmax(-1) == targets if "is_top1" in outputs else None)
        return (logps, entropy, *extra)


# ------------------------------------------------------------------------------------------------ child


def _child(kind: str, variant: str, folder: str) -> None:
    """One fresh process: prints a JSON line with the step's peak extra RSS and peak of live tensor bytes."""
    import trl.trainer.utils as trl_utils

    from rlhf_fast.bench.measure import _maxrss_bytes, _rss_bytes, tensor_peak_extra_bytes
    from rlhf_fast.integrations.trl import patch_trl

    torch.set_num_threads(1)
    if variant == "rlhf_fast":
        patch_trl()
    elif variant == "materialised":
        trl_utils._ChunkedLogProbFunction = MaterialisedHead
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _trainer(kind, folder, out_dir)
        losses, scored = [], []
        compute_loss, head = trainer.compute_loss, trl_utils._ChunkedLogProbFunction

        class CountingHead:  # records N, the positions scored per call
            @staticmethod
            def apply(hidden, *a):
                scored.append(hidden.shape[0])
                return head.apply(hidden, *a)

        trl_utils._ChunkedLogProbFunction = CountingHead
        trainer.compute_loss = lambda *a, **k: losses.append(compute_loss(*a, **k)) or losses[-1]
        gc.collect()
        base = _rss_bytes()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        rss_peak = _maxrss_bytes() - base
        loss, n_scored = float(losses[0].detach()), max(scored)
        grad_norm = next(float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h)
        gc.collect()
        tensor_peak, _ = tensor_peak_extra_bytes(trainer.train)
    print(json.dumps(dict(trainer=kind, variant=variant, peak_extra_rss_bytes=rss_peak,
                          rss_before_step_bytes=base, tensor_peak_extra_bytes=tensor_peak, loss=loss, grad_norm=grad_norm,
                          step_seconds=seconds, scored_positions_per_call=n_scored)))


# ----------------------------------------------------------------------------------------------- parent


def _heads_alone(n: int, outputs: tuple[str, ...]) -> dict[str, int]:
    """Each head alone (no trainer): peak live tensor bytes of forward + backward of sum(log_probs) +
    sum(entropy) at N positions, gradients (N x H + V x H fp32) included. Shows where the step's figures
    come from."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from rlhf_fast.bench.measure import tensor_peak_extra_bytes
    from rlhf_fast.integrations.trl import FusedLinearLogprobsHead

    heads = {"trl": ChunkedLogProbFunction, "rlhf_fast": FusedLinearLogprobsHead, "materialised": MaterialisedHead}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, HIDDEN, generator=g).requires_grad_()  # (N, H)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).requires_grad_()  # (V, H)
    targets = torch.randint(0, VOCAB, (n,), generator=g)  # (N,)
    out = {}
    for name, head in heads.items():
        def step(head=head):
            lp, ent, *_ = head.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)
            return torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))

        out[name] = tensor_peak_extra_bytes(step)[0]
    return out


def _run_child(kind, variant, folder, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, variant, folder]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{kind}/{variant} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        out[pkg] = md.version(pkg)
    out["git_commit"] = git_commit(os.getcwd())  # short hash, "+dirty" with uncommitted changes
    out["git_worktree_dirty"] = out["git_commit"].endswith("+dirty")
    return out


def _markdown(report) -> str:
    m = report["meta"]
    lines = [f"# TRL 1.16 step peak memory: TRL's fused head vs patch_trl() (CPU, {m['date']})", "",
             f"Model: random tiny Llama, hidden {HIDDEN}, 2 layers, **V = {VOCAB}**, fp32, 1 thread, CPU "
             f"({m['cpu']}); {m['reps']} fresh processes per (trainer, variant), variants alternating. "
             "`peak RSS` = ru_maxrss after one `trainer.train()` step minus the RSS before it; `peak tensors` = "
             "peak of live tensor bytes during a second one-step `train()` beyond those alive before it "
             "(torch.profiler memory events). Medians (min - max) in MiB. Both include what every variant "
             "allocates alike (AdamW state, gradients, activations, generation).", "",
             f"GRPO: {GRPO['batch']} completions ({GRPO['num_generations']} per prompt), prompt "
             f"{GRPO['prompt_words']} tokens, up to {GRPO['max_completion_length']} new tokens, beta 0.04 "
             f"(reference forward), temperature 0.7. DPO: {DPO['batch']} pairs, max_length {DPO['max_length']}.",
             "", "| trainer | variant | N scored / call | peak RSS MiB | peak tensors MiB | vs TRL (tensors) "
             "| loss | grad norm | step s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in TRAINERS:
        s = report["summary"][kind]
        ref = s["trl"]["tensor_peak_extra_bytes"]["median"]
        for v in VARIANTS:
            r = s[v]
            rss, ten = r["peak_extra_rss_bytes"], r["tensor_peak_extra_bytes"]
            lines.append(
                f"| {kind} | {v} | {r['scored_positions_per_call']} | {rss['median'] / MiB:.1f} "
                f"({rss['min'] / MiB:.1f} - {rss['max'] / MiB:.1f}) | {ten['median'] / MiB:.1f} "
                f"({ten['min'] / MiB:.1f} - {ten['max'] / MiB:.1f}) | {ten['median'] / ref:.3f}x "
                f"| {r['loss']['median']:.6g} | {r['grad_norm']['median']:.6g} | {r['step_seconds']['median']:.2f} |")
    lines += ["", "Step seconds are indicative only: the 2-core machine is shared with other work.", "",
              "The heads alone (no trainer), forward + backward of sum(log_probs) + sum(entropy) with the outputs "
              "each trainer asks for, at the step's N; peak live tensor MiB, gradients included:", "",
              "| outputs (trainer) | N | " + " | ".join(VARIANTS) + " |", "|---|---:|" + "---:|" * len(VARIANTS)]
    for kind, h in report["heads_alone"].items():
        lines.append(f"| {', '.join(h['outputs'])} ({kind}) | {h['positions']} | "
                     + " | ".join(f"{h['tensor_peak_extra_bytes'][v] / MiB:.1f}" for v in VARIANTS) + " |")
    lines += ["", "On the CPU TRL 1.16's kernel has no Triton: it folds each (N, 32768) vocabulary tile with "
              "whole-tile torch temporaries (trl/kernels/chunked_logprob.py, `_forward_tile` / `_backward_tile`), "
              "so there it peaks above plain materialised logits. On CUDA it runs Triton kernels over one "
              "(min(N, 4096), 32768) tile; no GPU was available for this run, so that case is not measured here.",
              "",
              "versions: " + ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "trl", "peft", "accelerate",
                                                               "datasets", "python"))
              + f"; commit {m['git_commit']}" + (" (working tree with uncommitted changes)"
                                                if m.get("git_worktree_dirty") else ""), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per (trainer, variant)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--child", nargs=3, metavar=("TRAINER", "VARIANT", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(*a.child)
        return
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        _build_model(folder)
        for rep in range(a.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
            for kind in TRAINERS:
                for v in order:
                    r = _run_child(kind, v, folder, a.timeout)
                    r["rep"] = rep
                    runs.append(r)
                    print(f"rep {rep} {kind:4s} {v:12s} rss {r['peak_extra_rss_bytes'] / MiB:8.1f} MiB  tensors "
                          f"{r['tensor_peak_extra_bytes'] / MiB:8.1f} MiB  loss {r['loss']:.6g}  "
                          f"{r['step_seconds']:.2f} s", flush=True)
    summary = {}
    for kind in TRAINERS:
        summary[kind] = {}
        for v in VARIANTS:
            rs = [r for r in runs if r["trainer"] == kind and r["variant"] == v]
            summary[kind][v] = {k: _stats([r[k] for r in rs]) for k in
                                ("peak_extra_rss_bytes", "tensor_peak_extra_bytes", "loss", "grad_norm", "step_seconds")}
            summary[kind][v]["scored_positions_per_call"] = rs[0]["scored_positions_per_call"]
    torch.set_num_threads(1)
    heads = {kind: {"outputs": outs, "positions": summary[kind]["trl"]["scored_positions_per_call"],
                    "tensor_peak_extra_bytes": _heads_alone(summary[kind]["trl"]["scored_positions_per_call"], outs)}
             for kind, outs in (("grpo", ("log_probs", "entropy")),
                                ("dpo", ("log_probs", "entropy", "mean_logits", "is_top1")))}
    meta = dict(_versions(), date=a.date, device="cpu", cpu=cpu_name(), threads=1, reps=a.reps, vocab=VOCAB,
                hidden=HIDDEN, grpo=GRPO, dpo=DPO)
    report = {"meta": meta, "summary": summary, "heads_alone": heads, "runs": runs}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"cpu-trl-memory-{a.date}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(report))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()

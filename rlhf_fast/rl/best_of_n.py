"""Best-of-N sampling: N samples per prompt from the policy, scored, the best kept (Nakano et al. 2021, WebGPT;
Stiennon et al. 2020), and the exact KL of the Best-of-N policy against the base on M samples (Beirami et al.
2024, "Theoretical guarantees on the best-of-n alignment policy").

    best_of_n            prompts -> N samples each in one batched generate (each prompt prefilled once, its KV
                         cache shared by its N samples) -> scores -> the kept picks, as JSON-ready dicts
    best_of_n_kl         KL(BoN_n || base) of the empirical distribution of M base samples per prompt
    best_of_n_kl_bound   log n - (n - 1) / n, the closed form for continuous, distinct scores
    main                 the `rlhf-fast best-of-n` command (writes the picks as JSONL, atomically)

Prompts are rendered as the trainers render them (rlhf_fast.data.jsonl.encode_prompt: the chat template with the
generation prompt when the tokenizer has one). RAFT (rlhf_fast.trainers.raft) fine-tunes on these picks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_fast.data.collate import collate_prompts
from rlhf_fast.data.jsonl import DataError, encode_prompt, load_prompt_examples, write_jsonl_atomic
from rlhf_fast.errors import ConfigError
from rlhf_fast.models.conventions import resolve_device
from rlhf_fast.models.io import load_reward
from rlhf_fast.rl import rewards as R
from rlhf_fast.rl import rollout
from rlhf_fast.rl.judge import load_judge_model

KEEP = ("best", "top-k", "all")


def best_of_n(model, prompts: Sequence[str | list[dict]], n: int, *, reward_model: str | os.PathLike | None = None,
              reward_funcs: str | R.RewardFunctions | Sequence[Any] | None = None, tokenizer=None,
              sampling: rollout.SamplingConfig | None = None, keep: str = "best", top_k: int = 1,
              batch_size: int = 8, seed: int = 0, progress: bool = False,
              columns: Mapping[str, Sequence[Any]] | None = None, return_ids: bool = False,
              engine=None) -> list[dict]:
    """Sample n completions per prompt from the policy adapter of `model`, score them, keep the best.

    Args:
        model: a RoleModel. Its policy adapter samples; its reward adapter + score head score when neither
            reward_funcs nor reward_model says otherwise.
        prompts: P prompts: strings (wrapped as one user message for a chat template) or message lists.
        n: samples per prompt N >= 1, drawn in one generate call per batch with num_samples=n.
        reward_model: a folder written by `rlhf-fast rm` (its out_dir/model), loaded into the model's reward
            adapter and score head (which it replaces). None: the model's own reward adapter, which must have
            been trained (model.trained_roles holds "reward"), unless reward_funcs is given.
        reward_funcs: instead of a reward model: a spec ("accuracy,format", "pkg.mod:fn", "reward_model" = the
            model's reward adapter), an rlhf_fast.rl.RewardFunctions, or a list of callables with TRL's contract.
            Give reward_model or reward_funcs, not both.
        tokenizer: renders the prompts and decodes the completions; default model.tokenizer.
        sampling: temperature, top_p, top_k, max_new_tokens (its n is replaced by `n`); default
            SamplingConfig(max_new_tokens=64) (temperature 1).
        keep: which samples come back, each as one row {"prompt", "completion", "score", "n", "rank"}:
            "best"  one row per prompt, its highest-scored sample, plus "all": every sample of the prompt in
                    sampling order, [{"completion", "score"}, ...] (rank 0).
            "top-k" min(top_k, n) rows per prompt, best first (ranks 0, 1, ...).
            "all"   n rows per prompt, best first: every sample (for a score threshold, or rankings).
            Ties keep sampling order (the first sample wins); an unscorable sample (every reward function
            returned None) has score None and ranks last.
        top_k: rows per prompt for keep="top-k".
        batch_size: prompts per generate call (batch_size * n sequences decode together).
        seed: seeds the sampling generator: the same call gives the same samples.
        progress: a progress bar over the prompts.
        columns: the prompts' other dataset fields for the reward functions, each a list of P values.
        return_ids: also return "prompt_ids" and "completion_ids" (the sampled tokens, up to and including EOS).
        engine: an rl.vllm_engine.VLLMEngine serving `model`: vLLM samples (the same seed then gives vLLM's
            samples, not the native loop's).

    Returns:
        The rows, prompt by prompt in input order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if keep == "top-k" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 with keep='top-k', got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if reward_model is not None and reward_funcs is not None:
        raise ValueError("give reward_model or reward_funcs, not both")
    prompts = list(prompts)
    columns = {k: list(v) for k, v in (columns or {}).items()}
    for k, v in columns.items():
        if len(v) != len(prompts):
            raise ValueError(f"column {k!r} has {len(v)} values for {len(prompts)} prompts")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("best_of_n needs a tokenizer (tokenizer= or model.tokenizer) for prompts and completions")
    sampling = dataclasses.replace(sampling or rollout.SamplingConfig(max_new_tokens=64), n=n)
    if reward_model is not None:
        load_reward(model, reward_model)
    funcs = _reward_functions(model, reward_funcs)
    if funcs is not None:
        funcs.check_columns(columns)

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pad_id = next((v for v in (getattr(tokenizer, "pad_token_id", None), model.pad_token_id) if v is not None), 0)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    rows: list[dict] = []
    bar = tqdm(total=len(prompts), desc=f"best-of-{n}", unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(prompts), batch_size):
            end = min(start + batch_size, len(prompts))
            p = collate_prompts([{"prompt_ids": x} for x in ids[start:end]], pad_id)
            ro = rollout.sample(model, p["prompt_ids"].to(device), p["prompt_mask"].to(device), sampling,
                                eos_token_id=model.eos_token_id, generator=generator, engine=engine)
            texts = R.completion_texts(tokenizer, ro.sequences, ro.response_mask)
            if funcs is None:
                scores = rollout.score(model, ro)
            else:
                scores, _ = funcs(_repeat(prompts, start, end, n), texts,
                                  {k: _repeat(v, start, end, n) for k, v in columns.items()}, rollout=ro)
            scores = scores.float().cpu().view(-1, n)  # (b, n)
            for i in range(end - start):
                mine = slice(i * n, (i + 1) * n)  # the prompt's n rows
                sampled = None
                if return_ids:
                    sampled = (ids[start + i], [s[m.bool()].tolist() for s, m in
                                                zip(ro.sequences[mine], ro.response_mask[mine])])
                rows += _keep(prompts[start + i], texts[mine], scores[i], sampled, keep=keep, top_k=top_k)
            bar.update(end - start)
    finally:
        bar.close()
    return rows


def _repeat(xs: list, start: int, end: int, n: int) -> list:
    # xs[start:end], each n times: aligned with the rollout's rows (row i answers prompt i // n)
    return [x for x in xs[start:end] for _ in range(n)]


def _reward_functions(model, reward_funcs) -> R.RewardFunctions | None:
    # None: score with the reward adapter (rollout.score); else the functions, where "reward_model" is the adapter
    def reward_model(prompts, completions, rollout=None, **_):
        return model.scores(rollout.sequences, rollout.attention_mask).tolist()

    uses_adapter = reward_funcs is None or (isinstance(reward_funcs, str) and "reward_model" in
                                            [s.strip() for s in reward_funcs.split(",")])
    if uses_adapter and "reward" not in model.trained_roles:
        raise ValueError("the model's reward adapter was never trained: pass reward_model (a folder written by "
                         "`rlhf-fast rm`) or reward_funcs")
    if reward_funcs is None or isinstance(reward_funcs, R.RewardFunctions):
        return reward_funcs
    if isinstance(reward_funcs, str):
        return R.load_reward_functions(reward_funcs, functions={"reward_model": reward_model})
    return R.RewardFunctions(list(reward_funcs))


def _keep(prompt, texts: list[str], scores: torch.Tensor, ids=None, *, keep: str, top_k: int) -> list[dict]:
    # One prompt's n samples -> its kept rows. A stable sort on the scores (NaN last): ties keep sampling order.
    n = len(texts)
    order = torch.sort(scores.nan_to_num(float("-inf")), descending=True, stable=True).indices.tolist()
    value = lambda j: None if math.isnan(scores[j]) else float(scores[j])  # noqa: E731
    count = {"best": 1, "top-k": min(top_k, n), "all": n}[keep]
    out = []
    for rank, j in enumerate(order[:count]):
        row = {"prompt": prompt, "completion": texts[j], "score": value(j), "n": n, "rank": rank}
        if keep == "best":
            row["all"] = [{"completion": t, "score": value(k)} for k, t in enumerate(texts)]
        if ids is not None:
            row["prompt_ids"], row["completion_ids"] = list(ids[0]), ids[1][j]
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------ KL
def best_of_n_kl(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Exact KL(BoN_n || base) of the empirical distribution of M base samples per prompt.

    Args:
        scores: (P, M) finite scores of M base samples for each of P prompts (any real dtype).
        n: N >= 1, the samples Best-of-N draws (with replacement, from the M).

    Returns:
        (P,) the KL per prompt, in float64 for float64 (or integer) scores, else in the scores' dtype; the
        arithmetic is float64.

    Samples with equal scores form one class (Best-of-N cannot tell them apart). With F the empirical CDF over
    the distinct score values v and p(v) = F(v) - F(v^-) the base probability of a class:

        P_bon(v) = F(v)^n - F(v^-)^n,      KL = sum_v P_bon(v) log(P_bon(v) / p(v))

    For distinct continuous scores and M -> infinity this tends to best_of_n_kl_bound(n) = log n - (n - 1)/n
    from below (Beirami et al. 2024 show that bound is the limit, and an upper bound, not the KL in general).
    """
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (P, M) with M >= 1, got shape {tuple(scores.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite (leave unscorable samples out)")
    p_bon, p = _class_probabilities(scores, n)  # (P, M) each, > 0
    # each class appears p * M times among the samples: weight its term by 1 / (p * M)
    kl = (p_bon * (p_bon.log() - p.log()) / (p * scores.shape[1])).sum(1)  # (P,)
    return kl if not scores.is_floating_point() else kl.to(scores.dtype)


def best_of_n_weights(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(P, M) float64: the probability that Best-of-n over the M equally likely samples of each prompt picks each one,
    P_bon(v) of its score class shared evenly by the class's samples (ties broken uniformly). scores: (P, M).
    Expected values under Best-of-n follow as sums of these weights times per-sample values."""
    p_bon, p = _class_probabilities(scores, n)
    return p_bon / (p * scores.shape[1])


def _class_probabilities(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # per sample, its score class's P_bon(v) = F(v)^n - F(v^-)^n and base probability p(v) = F(v) - F(v^-)
    s = scores.double()
    srt = s.sort(dim=1).values  # (P, M)
    f_hi = torch.searchsorted(srt, s, right=True).double() / s.shape[1]  # (P, M) F(v) of each sample's class
    f_lo = torch.searchsorted(srt, s, right=False).double() / s.shape[1]  # (P, M) F(v^-)
    return f_hi.pow(n) - f_lo.pow(n), f_hi - f_lo


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1) / n: the KL of Best-of-N against the base for continuous, distinct scores (Stiennon et
    al. 2020, appendix G.3; an upper bound, Beirami et al. 2024)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------------------------- command
class UsageError(Exception):
    """Bad command line or input file: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, instead of argparse's usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-fast best-of-n", description="Best-of-N sampling: N samples per prompt from --model, "
                "scored by a reward model or reward functions, the picks written to --out as JSONL.")
    a = p.add_argument
    a("--model", default="", help="the sampling model: a local transformers folder, a .gguf file, or a saved RoleModel "
                                  "folder (its policy adapter samples)")
    a("--data", default="", help='prompts, JSONL {"prompt" | "messages", ...columns for the reward functions}')
    a("--n", type=int, default=8, help="samples per prompt N >= 1 (default: 8)")
    a("--reward_model", default="", help="folder written by `rlhf-fast rm` (its out_dir/model)")
    a("--reward_funcs", default="", help="instead of --reward_model: comma-separated reward functions (accuracy, "
                                         "format, code, pkg.module:function)")
    a("--out", default="", help="output JSONL (written atomically: nothing on error)")
    a("--keep", default="best", help="best (one row per prompt + all samples), top-k (--top_k rows per prompt) "
                                     "or all (every sample, best first) (default: best)")
    a("--top_k", type=int, default=1, help="rows per prompt with --keep top-k (default: 1)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    a("--top_p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    a("--top_k_sampling", type=int, default=0, help="top-k sampling, 0: off (default: 0)")
    a("--max_new_tokens", type=int, default=64, help="new tokens per sample (default: 64)")
    a("--max_length", type=int, default=512, help="context length: prompt + new tokens (default: 512)")
    a("--batch_size", type=int, default=8, help="prompts per generate call (default: 8)")
    a("--seed", type=int, default=0, help="sampling seed (default: 0)")
    a("--device", default="auto", help="auto, cpu or cuda[:n] (default: auto)")
    a("--rollout", default="native", help="native (the KV-cached loop) or vllm (a vLLM engine serving the model's "
                                          "base with its policy adapter; `make install-vllm`) (default: native)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)")
    return p


def _check_args(args) -> None:
    if args.n < 1:
        raise UsageError(f"--n (samples per prompt) must be >= 1, got {args.n}")
    if args.keep not in KEEP:
        raise UsageError(f"--keep must be one of {', '.join(KEEP)}, got {args.keep!r}")
    if args.keep == "top-k" and args.top_k < 1:
        raise UsageError(f"--top_k must be >= 1 with --keep top-k, got {args.top_k}")
    if bool(args.reward_model) == bool(args.reward_funcs.strip()):
        raise UsageError("give exactly one of --reward_model DIR or --reward_funcs NAMES")
    if not args.out:
        raise UsageError("--out is required: the JSONL file to write")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a folder, expected a file name")
    if args.rollout not in ("native", "vllm"):
        raise UsageError(f"--rollout must be native or vllm, got {args.rollout!r}")
    if args.batch_size < 1 or args.max_length < 2:
        raise UsageError("--batch_size must be >= 1 and --max_length >= 2")
    if args.reward_model and not os.path.isdir(args.reward_model):
        raise UsageError(f"--reward_model {args.reward_model!r}: no such folder")
    rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k_sampling)  # ValueError on a bad value


def main(argv: list[str] | None = None) -> int:
    """`rlhf-fast best-of-n`: every check (options, data, model, reward model) before anything is written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        if not args.data:  # data checks before the model loads
            raise DataError("no data file given (--data, a JSONL file)")
        if not os.path.exists(args.data):
            raise DataError(f"--data {args.data}: no such file")
        # a base folder, a .gguf file, or a RoleModel folder (e.g. out/ppo/model: its trained policy adapter samples)
        model = load_judge_model(args.model, device=resolve_device(args.device))
        tokenizer = model.tokenizer
        examples = load_prompt_examples(args.data, tokenizer, args.max_length, args.max_new_tokens)
        sampling = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k_sampling)
        keys = sorted({k for e in examples for k in e["columns"]})
        columns = {k: [e["columns"].get(k) for e in examples] for k in keys}
        engine = None
        if args.rollout == "vllm":
            from rlhf_fast.rl.vllm_engine import VLLMEngine, vllm_unavailable_reason

            reason = vllm_unavailable_reason()
            if reason is not None:
                raise ConfigError(f"--rollout vllm: {reason}")
            engine = VLLMEngine(model, max_model_len=args.max_length, seed=args.seed)
        try:
            rows = best_of_n(model, [e["text"] for e in examples], args.n, reward_model=args.reward_model or None,
                             reward_funcs=args.reward_funcs.strip() or None, tokenizer=tokenizer, sampling=sampling,
                             keep=args.keep, top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                             progress=args.progress, columns=columns, engine=engine)
        finally:
            if engine is not None:
                engine.close()
        write_jsonl_atomic(args.out, rows)
    except (UsageError, ConfigError, DataError, ValueError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, R.RewardFunctionError) as e:
        code = 1 if isinstance(e, R.RewardFunctionError) else 2  # a reward function failing mid-run: exit 1
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"rlhf-fast best-of-n: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    scores = [r["score"] for r in rows if r["score"] is not None]
    mean = sum(scores) / len(scores) if scores else float("nan")
    print(f"rlhf-fast best-of-n: wrote {len(rows)} rows for {len(examples)} prompts (N = {args.n}, mean kept "
          f"score {mean:.4g}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

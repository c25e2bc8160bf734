"""`rlhf-fast label`: RLAIF preference labels from a written constitution (Bai et al. 2022; Lee et al. 2023).

    rlhf-fast label --judge MODEL --constitution principles.txt --data pairs_or_prompts.jsonl --out prefs.jsonl

Input rows: {"prompt", "chosen", "rejected"} or {"prompt", "responses": [a, b]} are judged as they are (the given
order is ignored); {"prompt"} rows first get two responses sampled from --policy. The judge (rl/judge.py) gives
p = P(a better), in pairwise mode with both orders averaged. Output, the preference JSONL `rlhf-fast rm` and
`rlhf-fast dpo` read, one line per pair:

    {"prompt", "chosen": the judge's preferred response, "rejected", "margin": log(p_c / (1 - p_c)), "p_chosen": p_c}

where p_c = max(p, 1 - p) >= 0.5, so margin >= 0 is the judge's log-odds, the Bradley-Terry reward gap its
verdict implies (--margin none leaves it out). confidence = 2 p_c - 1 in [0, 1]; rows with confidence <
--min_confidence are dropped, as are pairs of two identical responses; both counts are reported. The file is
written atomically (a temporary sibling, then os.replace) once every row is judged: a failed run leaves none.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from rlhf_fast.data.collate import pad
from rlhf_fast.data.jsonl import DataError, encode_prompt, read_jsonl, write_jsonl_atomic
from rlhf_fast.errors import ConfigError
from rlhf_fast.models.conventions import resolve_device
from rlhf_fast.rl import judge as J
from rlhf_fast.rl import rollout
from rlhf_fast.rl.rewards import completion_texts


@dataclass
class LabelConfig:
    """The options of `rlhf-fast label` (see the module docstring)."""

    judge: str = ""                 # judge model: local folder, .gguf, or RoleModel folder
    constitution: str = ""          # principles, one per line
    data: str = ""                  # pairs or prompts JSONL
    out: str = ""                   # preference JSONL to write
    template: str = ""              # judge template file; "": the shipped judge_<mode>.txt
    mode: str = "pairwise"          # pairwise (answer tokens) or rating (rating words)
    answer_tokens: str = ",".join(J.DEFAULT_ANSWER_TOKENS)
    rating_words: str = J.DEFAULT_RATING_WORDS
    judge_role: str = "reference"   # RoleModel role that judges: reference (adapters off) or policy
    min_confidence: float = 0.0     # drop pairs with 2 p_c - 1 below it, in [0, 1)
    margin: str = "log_odds"        # log_odds or none
    policy: str = ""                # samples two responses for prompt-only rows
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    max_length: int = 0             # longest judge prompt in tokens; 0: the judge's max_position_embeddings
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for name in ("judge", "constitution", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        checks = [
            (self.mode in ("pairwise", "rating"), f"--mode must be pairwise or rating, got {self.mode!r}"),
            (self.margin in ("log_odds", "none"), f"--margin must be log_odds or none, got {self.margin!r}"),
            (math.isfinite(self.min_confidence) and 0 <= self.min_confidence < 1,
             f"--min_confidence must lie in [0, 1) (confidence = 2 p - 1 of the preferred response), got "
             f"{self.min_confidence}"),
            (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "--temperature must be >= 0"),
            (0 < self.top_p <= 1, f"--top_p must lie in (0, 1], got {self.top_p}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.max_length >= 0, f"--max_length must be >= 0, got {self.max_length}"),
            (0 <= self.seed < 2**32, f"--seed must lie in [0, 2**32), got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_out_file(self.out)


# ----------------------------------------------------------------------------------------------- helpers
# (shared with rl/revise.py)

def check_out_file(path: str) -> None:
    """ConfigError before any work when `path` cannot become a file (a folder, or a missing parent folder)."""
    if os.path.isdir(path):
        raise ConfigError(f"--out {path!r} is a folder, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {path!r}: its folder {parent!r} does not exist")


@torch.no_grad()
def generate_texts(model, tokenizer, prompt_ids: list[list[int]], sampling: rollout.SamplingConfig,
                   batch_size: int) -> list[list[str]]:
    """sampling.n responses (decoded, stripped) to each tokenised prompt, from the model's policy adapter,
    batch_size prompts per generate call (each prefilled once, its KV cache shared by its n samples)."""
    device = model.lm_head.weight.device
    pad_id = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        ids, mask = pad(prompt_ids[s:s + batch_size], pad_id, left=True)  # (b, P)
        ro = rollout.sample(model, ids.to(device), mask.to(device), sampling, eos_token_id=tokenizer.eos_token_id)
        texts = [t.strip() for t in completion_texts(tokenizer, ro.sequences, ro.response_mask)]
        out += [texts[i:i + sampling.n] for i in range(0, len(texts), sampling.n)]
    return out


def check_prompt_room(ids: list[int], max_new_tokens: int, model, where: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) + max_new_tokens > limit:
        raise DataError(f"{where}: the prompt has {len(ids)} tokens; with --max_new_tokens={max_new_tokens} it "
                        f"exceeds the model's context of {limit}")


def run_command(name: str, fn, argv) -> int:
    """Run a command's body: bad input (ConfigError, DataError, a missing file) is one line and exit 2. No
    transformers progress bars or info logs meanwhile (as trainers/config.py's quiet_libraries, which rl/ may
    not import); the previous state is restored."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # transformers' and peft's deprecation notices about each other
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            return int(fn(argv) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"rlhf-fast {name}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------- labelling

def read_label_rows(path: str, *, have_policy: bool) -> list[dict]:
    """{"line", "prompt", "pair": [a, b] | None} per row; DataError for a malformed row, or a row without
    responses when no --policy can sample them."""
    rows = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: needs a string 'prompt' (fields present: {sorted(obj)})")
        if "responses" in obj:
            pair = obj["responses"]
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(r, str) and r for r in pair):
                raise DataError(f"{where}: 'responses' must be a list of exactly 2 non-empty strings to judge")
        elif "chosen" in obj or "rejected" in obj:
            pair = [obj.get("chosen"), obj.get("rejected")]
            if not all(isinstance(r, str) and r for r in pair):
                raise DataError(f"{where}: 'chosen' and 'rejected' must both be non-empty strings")
        else:
            if not have_policy:
                raise DataError(f"{where}: the row has no responses ('chosen'/'rejected' or 'responses'); give "
                                "--policy MODEL to sample two responses for prompt-only rows")
            pair = None
        rows.append({"line": no, "prompt": prompt, "pair": pair})
    return rows


def label_pairs(judge: J.Judge, prompts: list[str], pairs: list[list[str]], *, min_confidence: float = 0.0,
                margin: str = "log_odds") -> tuple[list[dict], dict]:
    """Judge each pair and write it as a preference row (module docstring). Returns (rows, counts) with counts
    {"judged", "kept", "low_confidence", "identical"}."""
    keep = [i for i, (a, b) in enumerate(pairs) if a != b]
    p = judge.compare([prompts[i] for i in keep], [pairs[i][0] for i in keep], [pairs[i][1] for i in keep])
    rows, low = [], 0
    for i, pa in zip(keep, p.double().tolist()):
        first = pa >= 0.5
        pc = pa if first else 1.0 - pa
        if 2 * pc - 1 < min_confidence:
            low += 1
            continue
        a, b = pairs[i]
        row = {"prompt": prompts[i], "chosen": a if first else b, "rejected": b if first else a}
        if margin == "log_odds":
            pcc = min(pc, 1 - 1e-7)
            row["margin"] = math.log(pcc / (1 - pcc))
        row["p_chosen"] = pc
        rows.append(row)
    return rows, {"judged": len(keep), "kept": len(rows), "low_confidence": low,
                  "identical": len(pairs) - len(keep)}


def run_label(cfg: LabelConfig) -> dict:
    """The whole command: check inputs, load the models, sample missing responses, judge, write cfg.out.
    Returns the counts of label_pairs plus "sampled" (prompt-only rows that got two responses)."""
    cfg.validate()
    principles = J.load_constitution(cfg.constitution)
    template = J.load_template(f"judge_{cfg.mode}", cfg.template)
    rows = read_label_rows(cfg.data, have_policy=bool(cfg.policy))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = J.load_judge_model(cfg.judge, device=device)
    kw = {"pairwise_template": template} if cfg.mode == "pairwise" else {"rating_template": template}
    judge = J.Judge(model, model.tokenizer, principles, answer_tokens=cfg.answer_tokens,
                    rating_words=cfg.rating_words, role=cfg.judge_role, batch_size=cfg.batch_size,
                    max_length=cfg.max_length or None, mode=cfg.mode, **kw)
    todo = [r for r in rows if r["pair"] is None]
    if todo:
        same = os.path.realpath(cfg.policy) == os.path.realpath(cfg.judge)
        policy = model if same else J.load_judge_model(cfg.policy, device=device)
        tok = policy.tokenizer
        ids = [encode_prompt(tok, r["prompt"]) for r in todo]
        for r, e in zip(todo, ids):
            check_prompt_room(e, cfg.max_new_tokens, policy, f"{cfg.data}:{r['line']}")
        sampling = rollout.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_p=cfg.top_p, n=2)
        for r, pair in zip(todo, generate_texts(policy, tok, ids, sampling, cfg.batch_size)):
            r["pair"] = pair
        if not same:
            del policy
    out, counts = label_pairs(judge, [r["prompt"] for r in rows], [r["pair"] for r in rows],
                              min_confidence=cfg.min_confidence, margin=cfg.margin)
    counts["sampled"] = len(todo)
    if not out:
        raise DataError(f"no pair left to write to {cfg.out}: {counts['low_confidence']} below --min_confidence="
                        f"{cfg.min_confidence}, {counts['identical']} with two identical responses")
    write_jsonl_atomic(cfg.out, out)
    return counts


def build_parser() -> argparse.ArgumentParser:
    d = LabelConfig()
    p = argparse.ArgumentParser(prog="rlhf-fast label", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--judge", required=True, help="judge model: a local transformers folder (with its tokenizer), a .gguf file "
                                     "or a RoleModel folder; the policy's own base works")
    a("--constitution", required=True, help="text file of principles, one per line ('#' lines are comments)")
    a("--data", required=True, help="JSONL of {prompt, chosen, rejected}, {prompt, responses: [a, b]} or {prompt}")
    a("--out", required=True, help="preference JSONL to write (atomically)")
    a("--template", default=d.template, help="judge template file (default: the shipped rlhf_fast/rl/templates/"
                                             "judge_<mode>.txt; fields in docs/rlaif.md)")
    a("--mode", default=d.mode, choices=("pairwise", "rating"), help="pairwise: P(A) vs P(B), both orders "
      "averaged; rating: each response rated, P(a > b) from the two rating distributions (default: pairwise)")
    a("--answer_tokens", default=d.answer_tokens, help="the two answer strings, comma-separated, each one token "
                                                       "of the judge's vocabulary (default: ' A, B')")
    a("--rating_words", default=d.rating_words, help=f"rating mode: word=value,... each word one token (default: "
                                                     f"{d.rating_words!r})")
    a("--judge_role", default=d.judge_role, choices=("reference", "policy"),
      help="RoleModel role that judges: reference = adapters off (default), policy = its policy adapter")
    a("--min_confidence", type=float, default=d.min_confidence,
      help="drop pairs whose confidence 2 p - 1 (p: the judge's probability for its preferred response) is "
           "below it, in [0, 1) (default: 0, keep all)")
    a("--margin", default=d.margin, choices=("log_odds", "none"),
      help="write margin = log(p / (1 - p)) of the preferred response, or no margin (default: log_odds)")
    a("--policy", default=d.policy, help="model that samples two responses for prompt-only rows (required then)")
    a("--max_new_tokens", type=int, default=d.max_new_tokens, help="sampling: new tokens per response")
    a("--temperature", type=float, default=d.temperature, help="sampling temperature")
    a("--top_p", type=float, default=d.top_p, help="sampling: nucleus")
    a("--batch_size", type=int, default=d.batch_size, help="prompts per generate call and rows per judge forward")
    a("--max_length", type=int, default=d.max_length, help="longest judge prompt, tokens (0: the judge's context)")
    a("--seed", type=int, default=d.seed, help="sampling seed")
    a("--device", default=d.device, help="auto, cpu or cuda[:n]")
    return p


def _main(argv) -> int:
    cfg = LabelConfig(**vars(build_parser().parse_args(argv)))
    c = run_label(cfg)
    print(f"rlhf-fast label: wrote {c['kept']} preference pairs to {cfg.out} ({c['judged']} judged, "
          f"{c['sampled']} sampled from --policy; dropped {c['low_confidence']} below --min_confidence, "
          f"{c['identical']} with identical responses)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("label", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

"""`rlhf-fast revise`: Constitutional AI's supervised stage (Bai et al. 2022, "critique -> revision").

    rlhf-fast revise --model M --constitution principles.txt --data prompts.jsonl --out sft.jsonl

For each {"prompt"} row, in batches: the model samples a response (the prompt through the tokenizer's chat
template when it has one); then it is asked for a critique of that response against one principle (row i
takes principle i mod K, cycling through the constitution) with the critique template; then for a revision
with the revision template. Templates (rlhf_fast/rl/templates/critique.txt, revision.txt; fields in
docs/rlaif.md) are fed as plain text and end where the model must continue; --critique_template and
--revision_template override them. Output, the SFT format `rlhf-fast sft` reads, plus the intermediate texts:

    {"prompt", "completion": revision, "response": the first response, "critique", "principle"}

(a {"messages"} prompt gives {"messages": [..., {"role": "assistant", "content": revision}], ...} instead).

Rows whose revision comes out empty are dropped (counted). Written atomically once every row is done.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from rlhf_fast.data.jsonl import DataError, encode_prompt, load_prompts, write_jsonl_atomic
from rlhf_fast.errors import ConfigError
from rlhf_fast.models.conventions import resolve_device
from rlhf_fast.rl import judge as J
from rlhf_fast.rl import rollout
from rlhf_fast.rl.label import (
    check_out_file,
    check_prompt_room,
    generate_texts,
    run_command,
)


@dataclass
class ReviseConfig:
    """The options of `rlhf-fast revise` (see the module docstring)."""

    model: str = ""
    constitution: str = ""
    data: str = ""
    out: str = ""
    critique_template: str = ""
    revision_template: str = ""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for name in ("model", "constitution", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("--max_new_tokens and --batch_size must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top_p lie in (0, 1]")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must lie in [0, 2**32), got {self.seed}")
        check_out_file(self.out)


def revise(model, tokenizer, prompts: list, principles: list[str], *, critique_template: str,
           revision_template: str, sampling: rollout.SamplingConfig, batch_size: int = 8,
           where: str = "prompts") -> list[dict]:
    """Sample, critique against principle i mod K, revise; one dict per prompt (module docstring's keys, the
    completion possibly empty). `prompts` are strings or message lists; sampling.n must be 1."""
    if sampling.n != 1:
        raise ValueError("revise samples one response per prompt (sampling.n = 1)")
    first = [encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(first):
        check_prompt_room(ids, sampling.max_new_tokens, model, f"{where}: prompt {i}")
    responses = [r[0] for r in generate_texts(model, tokenizer, first, sampling, batch_size)]
    chosen = [principles[i % len(principles)] for i in range(len(prompts))]
    texts = [critique_template.format(principle=c, prompt=J.prompt_text(p), response=r)
             for p, r, c in zip(prompts, responses, chosen)]
    critiques = [r[0] for r in generate_texts(model, tokenizer, _encode(tokenizer, texts, model, sampling, where),
                                              sampling, batch_size)]
    texts = [revision_template.format(principle=c, prompt=J.prompt_text(p), response=r, critique=k)
             for p, r, c, k in zip(prompts, responses, chosen, critiques)]
    revisions = [r[0] for r in generate_texts(model, tokenizer, _encode(tokenizer, texts, model, sampling, where),
                                              sampling, batch_size)]
    return [({"messages": p + [{"role": "assistant", "content": v}]} if isinstance(p, list)  # SFT's chat form
             else {"prompt": p, "completion": v}) | {"response": r, "critique": k, "principle": c}
            for p, r, k, v, c in zip(prompts, responses, critiques, revisions, chosen)]


def _encode(tokenizer, texts: list[str], model, sampling, where: str) -> list[list[int]]:
    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    for i, e in enumerate(ids):
        check_prompt_room(e, sampling.max_new_tokens, model, f"{where}: the critique/revision prompt of row {i}")
    return ids


def run_revise(cfg: ReviseConfig) -> dict:
    """The whole command; returns {"prompts", "kept", "empty"}."""
    cfg.validate()
    principles = J.load_constitution(cfg.constitution)
    critique = J.load_template("critique", cfg.critique_template)
    revision = J.load_template("revision", cfg.revision_template)
    records = load_prompts(cfg.data)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = J.load_judge_model(cfg.model, device=device)
    sampling = rollout.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, n=1)
    rows = revise(model, model.tokenizer, [r["prompt"] for r in records], principles, critique_template=critique,
                  revision_template=revision, sampling=sampling, batch_size=cfg.batch_size, where=cfg.data)
    kept = [r for r in rows if r.get("completion", r.get("messages", [{}])[-1].get("content"))]
    if not kept:
        raise DataError(f"every revision came out empty: nothing to write to {cfg.out}")
    write_jsonl_atomic(cfg.out, kept)
    return {"prompts": len(rows), "kept": len(kept), "empty": len(rows) - len(kept)}


def build_parser() -> argparse.ArgumentParser:
    d = ReviseConfig()
    p = argparse.ArgumentParser(prog="rlhf-fast revise", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", required=True, help="the model that answers, critiques and revises: a local transformers folder "
                                     "(with its tokenizer), a .gguf file or a RoleModel folder (policy adapter)")
    a("--constitution", required=True, help="text file of principles, one per line ('#' lines are comments)")
    a("--data", required=True, help="prompts JSONL: {prompt} or {messages}")
    a("--out", required=True, help="SFT JSONL to write (atomically): {prompt, completion, response, critique, "
                                   "principle}")
    a("--critique_template", default="", help="critique template file (fields {principle}, {prompt}, {response}; "
                                              "default: the shipped critique.txt)")
    a("--revision_template", default="", help="revision template file (fields {principle}, {prompt}, {response}, "
                                              "{critique}; default: the shipped revision.txt)")
    a("--max_new_tokens", type=int, default=d.max_new_tokens, help="new tokens per generation (each of 3 stages)")
    a("--temperature", type=float, default=d.temperature, help="sampling temperature (0: greedy)")
    a("--top_p", type=float, default=d.top_p, help="nucleus sampling")
    a("--batch_size", type=int, default=d.batch_size, help="prompts per generate call")
    a("--seed", type=int, default=d.seed, help="sampling seed")
    a("--device", default=d.device, help="auto, cpu or cuda[:n]")
    return p


def _main(argv) -> int:
    cfg = ReviseConfig(**vars(build_parser().parse_args(argv)))
    c = run_revise(cfg)
    print(f"rlhf-fast revise: wrote {c['kept']} revisions to {cfg.out} ({c['empty']} empty revisions dropped)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("revise", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

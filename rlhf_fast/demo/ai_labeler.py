"""The demo's RLAIF stage: an AI labeler that no one hand-codes the gold into.

The judge is the demo's pre-trained base itself, before any fine-tuning. Its pre-training text holds users'
one-word ratings after chats (`... <eos> good <eos>`, demo/task.py), so it has learnt which answers users rate
well; nobody shows it the gold preference. Through `rlhf_fast.rl.judge.Judge` in rating mode it reads
`<bos> <user> PROMPT <bot> RESPONSE <eos>` and its next-token distribution over the rating words is its
verdict; a pair's preference is P(rating of a beats rating of b), ties counted half. The demo's small
language has no words for written principles, so here the "constitution" is only what the users' ratings
taught the base; the label command (`rlhf-fast label`) takes a written one for a model that can read it.
"""

from __future__ import annotations

from rlhf_fast.demo import task
from rlhf_fast.rl.judge import Judge

# The chat as the base met it in pre-training, up to where a user's rating would follow.
RATING_TEMPLATE = "<bos> <user> {prompt} <bot> {response} <eos>"
RATING_WORDS = "great=3,good=2,ok=1,bad=0"
PRINCIPLES = ["rate the answer as the users in the pre-training text did"]


def judge(lm, tokenizer, batch_size: int = 256) -> Judge:
    """The pre-trained base (a transformers causal LM) as a rating judge over task.RATINGS."""
    return Judge(lm, tokenizer, PRINCIPLES, rating_template=RATING_TEMPLATE, rating_words=RATING_WORDS,
                 mode="rating", batch_size=batch_size)


def relabel(j: Judge, rows: list[dict]) -> tuple[list[dict], float]:
    """The judge's labels for the pairs `rows` ({"prompt", "chosen", "rejected"}: the human labels are ignored,
    only the two responses are read) and its agreement with the noiseless gold order on them.

    Returns rows {"prompt", "chosen", "rejected"} (a tie, P = 0.5, keeps the given order) and the share of pairs where the judge prefers the response of higher gold (pairs of equal gold are not in `rows`:
    the human labeler declined them)."""
    prompts = [r["prompt"] for r in rows]
    a = [r["chosen"] for r in rows]
    b = [r["rejected"] for r in rows]
    p = j.compare(prompts, a, b).tolist()  # P(a better)
    out, agree = [], 0
    for prompt, x, y, pa in zip(prompts, a, b, p):
        first = pa >= 0.5
        chosen, rejected = (x, y) if first else (y, x)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        g = task.gold_scores([prompt, prompt], [x + " " + task.EOS, y + " " + task.EOS])
        agree += int(first == (g[0] > g[1]))
    return out, agree / max(1, len(rows))

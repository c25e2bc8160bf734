"""The embedded demo task: a small synthetic language, a hidden gold preference and a noisy labeler.

The language. A user asks about two to four topics; the assistant answers with a list of clauses:

    <bos> <user> tell me about moon river bread <bot> very bright moon , calm river <eos>

A clause is `[very] ADJ NOUN`; clauses are separated by ",". There are 16 nouns and 16 adjectives;
every noun has two adjectives that fit it (a hidden piece of world knowledge that the pre-training text
teaches: "the moon is bright ."). Chats in the pre-training text are of every quality and carry the
user's one-word rating after the answer (`... <eos> good <eos>`): users count missing, off-topic and
repeated topics, not adjectives, and one in ten rates at random.

The gold preference (hidden; only `Labeler` and `gold_scores` read it). Per response, cut at <eos>:
    +1    for every prompt topic mentioned            (helpfulness)
    +0.5  for every prompt topic whose first mention carries a fitting adjective  (correctness)
    -1    for every distinct noun that is not a prompt topic                      (off-topic)
    -1    for every repeated mention of a noun                                     (degenerate repetition)
    -0.5  for every token that breaks the grammar (a second "very", a stray word, a clause without noun)
    -2    when the answer never ends (no <eos> within the response budget)
The best answer to k topics scores 1.5 k.

The proxy a policy can exploit. Careful demonstrators write "very" only before an adjective that fits,
and they mention each topic once, so among model samples "very" and mentioning a topic go with higher gold.
A reward model trained on labeled pairs of such samples can learn the cheap feature ("very", repeated
topic words, longer lists) instead of the costly one (which adjective fits which noun, no repeats). The
gold score does not pay for "very" and charges for repeats, so a policy that optimises the reward model
without a KL anchor drifts to answers the reward model over-rates: "very" everywhere, or, with the
default settings, the users' own rating words ("... great great great"), which the base learned to
associate with good answers. See docs/demo.md for the measured runs.

The labeler plays the human: for a pair of responses it says which is better with Bradley-Terry noise,
P(a > b) = sigmoid((gold(a) - gold(b)) / beta), and it declines pairs of equal gold (a tie carries no
preference to learn).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

PAD, BOS, EOS, UNK, USER, BOT = "<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<bot>"
SPECIALS = [PAD, BOS, EOS, UNK, USER, BOT]
NOUNS = ["apple", "river", "tree", "stone", "cloud", "horse", "bread", "lamp",
         "ship", "bird", "snow", "fire", "book", "road", "moon", "fish"]
ADJECTIVES = ["red", "sweet", "calm", "cold", "tall", "green", "grey", "heavy",
              "white", "soft", "fast", "wild", "warm", "bright", "old", "dark"]
FUNCTION_WORDS = ["tell", "me", "about", "the", "is", "and", ",", ".", "very"]
RATINGS = ["great", "good", "ok", "bad"]
# The counting task (the demo's RLVR stage): "count moon river bread" -> "three". Appended last so the ids of
# the words above do not move.
NUMBERS = ["one", "two", "three", "four", "five"]
VOCAB = SPECIALS + FUNCTION_WORDS + NOUNS + ADJECTIVES + RATINGS + ["count"] + NUMBERS

# The hidden world knowledge: which two adjectives fit each noun.
FITS: dict[str, tuple[str, str]] = {
    "apple": ("red", "sweet"), "river": ("calm", "cold"), "tree": ("tall", "green"),
    "stone": ("grey", "heavy"), "cloud": ("white", "soft"), "horse": ("fast", "wild"),
    "bread": ("warm", "soft"), "lamp": ("bright", "old"), "ship": ("old", "heavy"),
    "bird": ("fast", "wild"), "snow": ("white", "cold"), "fire": ("warm", "bright"),
    "book": ("old", "heavy"), "road": ("dark", "grey"), "moon": ("bright", "white"),
    "fish": ("cold", "fast"),
}

MIN_TOPICS, MAX_TOPICS = 2, 4


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    """A word-level transformers tokenizer for the language, built in-process (no downloads).

    Returns a PreTrainedTokenizerFast with pad/bos/eos/unk set and a chat template:
    user turns render as `<user> TEXT <bot>`, assistant turns as `TEXT <eos>`, the whole
    conversation starts with `<bos>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Word pieces are whole words: decode joins them with spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, BOT], padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user> {{ m['content'] }} <bot>"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def format_prompt(topics: list[str] | tuple[str, ...]) -> str:
    """The user's request for `topics` (plain text, no chat markup)."""
    return "tell me about " + " ".join(topics)


def render_prompt(prompt: str) -> str:
    """The chat-rendered prompt the model continues: `<bos> <user> PROMPT <bot>`."""
    return f"{BOS} {USER} {prompt} {BOT}"


def topics_of(prompt: str) -> list[str]:
    """Topics named in a prompt (plain or chat-rendered)."""
    words = prompt.split()
    if "about" in words:
        words = words[words.index("about") + 1:]
    return [w for w in words if w in FITS]


# ----------------------------------------------------------------------------------------- prompts
def _is_heldout(topics: tuple[str, ...]) -> bool:
    # A stable split by content: about one prompt in eight is held out, never seen in training.
    return zlib.crc32(" ".join(topics).encode()) % 8 == 0


def sample_topics(rng: random.Random) -> tuple[str, ...]:
    k = rng.randint(MIN_TOPICS, MAX_TOPICS)
    return tuple(rng.sample(NOUNS, k))


def make_prompts(n: int, *, split: str, seed: int) -> list[str]:
    """`n` prompts from the train or held-out split (disjoint by topic tuple), deterministic in `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        t = sample_topics(rng)
        if _is_heldout(t) == (split == "heldout"):
            out.append(format_prompt(t))
    return out


# ----------------------------------------------------------------------------------------- text
def _clause(noun: str, adj: str, very: bool) -> list[str]:
    return (["very"] if very else []) + [adj, noun]


def demonstration(topics: tuple[str, ...] | list[str], rng: random.Random) -> str:
    """One demonstrator answer: mostly helpful and correct, not always (headroom for RLHF).

    Each topic is covered with p=0.75 (at least one), with a fitting adjective with p=0.6;
    "very" goes before a fitting adjective with p=0.5 and never before a wrong one; an off-topic
    noun slips in with p=0.15. Nouns are never repeated.
    """
    covered = [t for t in topics if rng.random() < 0.75] or [rng.choice(list(topics))]
    if rng.random() < 0.15:
        others = [n for n in NOUNS if n not in topics]
        covered.insert(rng.randint(0, len(covered)), rng.choice(others))
    clauses = []
    for noun in covered:
        if rng.random() < 0.6:
            adj, very = rng.choice(FITS[noun]), rng.random() < 0.5
        else:
            adj, very = rng.choice([a for a in ADJECTIVES if a not in FITS[noun]]), False
        clauses.append(" ".join(_clause(noun, adj, very)))
    return " , ".join(clauses)


def _random_answer(topics: tuple[str, ...], rng: random.Random) -> list[str]:
    # Pre-training chat text of any quality: half the answers walk the topics in order (skipping some,
    # sometimes repeating one), half pick nouns at random; adjectives fit half the time; rare "very".
    if rng.random() < 0.5:
        nouns = []
        for t in topics:
            if rng.random() < 0.7:
                nouns.append(t)
                if rng.random() < 0.1:
                    nouns.append(t)
        nouns = nouns or [rng.choice(list(topics))]
    else:
        nouns = [rng.choice(list(topics)) if rng.random() < 0.5 else rng.choice(NOUNS)
                 for _ in range(rng.randint(1, 5))]
    return nouns


def _answer_text(nouns: list[str], rng: random.Random, fit: float = 0.5) -> str:
    clauses = []
    for noun in nouns:
        adj = rng.choice(FITS[noun]) if rng.random() < fit else rng.choice(ADJECTIVES)
        clauses.append(" ".join(_clause(noun, adj, rng.random() < 0.1)))
    return " , ".join(clauses)


def _rating(topics: tuple[str, ...], nouns: list[str], rng: random.Random) -> str:
    # The user's one-word rating after an answer, as chats and reviews in the wild carry them. Users count
    # what is missing, off-topic or repeated (not which adjective fits, not "very"), and one in ten rates
    # at random. It is what gives the base model's state at <eos> (where a reward model reads its score)
    # a sense of answer quality; the reward model still has to learn from the labeled pairs what it means.
    if rng.random() < RANDOM_RATING:
        return rng.choice(RATINGS)
    missing = sum(t not in nouns for t in topics)
    faults = missing + (len(nouns) - len(set(nouns))) + len(set(nouns) - set(topics))
    return RATINGS[min(faults, len(RATINGS) - 1)]


# The pre-training mix. The reward model reads its score at <eos>, where the base predicts the user's rating, so
# how well the base learned to rate decides where the reward model starts. With 40% descriptions, 70% of chats
# rated and one rating in five at random, 6000 steps, the bases' ratings ordered held-out SFT pairs 0.59 / 0.63 /
# 0.73 of the time on seeds 0-2 and the reward models reached 0.62 / 0.78 / 0.79 (at 2500 steps 0.76 / 0.56 /
# 0.81: a seed whose base rated badly left its reward model near chance); with the mix below, 0.86 / 0.89 / 0.88.
DESCRIPTION_SHARE = 0.3   # documents that are descriptions (the rest are chats)
RATED_SHARE = 1.0         # chats followed by the user's rating
RANDOM_RATING = 0.1       # ratings given at random


RECITE_SHARE = 0.1        # description sentences that are the number words recited in order


def _description(rng: random.Random) -> str:
    # Pre-training prose that teaches which adjectives fit which noun (80% of the time). One sentence in ten
    # recites the number words ("one two three four five ."): the base knows them and their order, each
    # predictable from the one before, but not counting. Without them the number words' tied embeddings stayed at
    # their small initial values, which capped the probability any final hidden state can give one of them at
    # 0.46-0.75 (seed 2: 0.50-0.60) and with it the counting stage's sampled accuracy; used interchangeably (a
    # number word in place of "the") they became near-synonyms, capped at 0.25-0.33 (docs/demo.md).
    if rng.random() < RECITE_SHARE:
        return " ".join(NUMBERS) + " ."
    noun = rng.choice(NOUNS)
    adj = rng.choice(FITS[noun]) if rng.random() < 0.8 else rng.choice(ADJECTIVES)
    if rng.random() < 0.5:
        return f"the {noun} is {adj} ."
    other = rng.choice(FITS[noun])
    return f"the {noun} is {adj} and {other} ."


def pretraining_text(n: int, *, seed: int) -> list[str]:
    """`n` documents of the language: descriptions, and chats (train-split prompts only) followed by the user's
    rating (`... <eos> good <eos>`). The counting task is not in it: descriptions recite the number words, never
    count with them, and counting is first met in SFT.

    (A version with one counting chat in ten here gave reward models of held-out accuracy 0.66, 0.66, 0.58 on seeds
    0-2 against 0.76, 0.56, 0.81 without: docs/demo.md.)"""
    rng = random.Random(seed)
    docs = []
    while len(docs) < n:
        if rng.random() < DESCRIPTION_SHARE:
            sents = " ".join(_description(rng) for _ in range(rng.randint(2, 4)))
            docs.append(f"{BOS} {sents} {EOS}")
        else:
            t = sample_topics(rng)
            if _is_heldout(t):
                continue
            nouns = _random_answer(t, rng)
            doc = f"{render_prompt(format_prompt(t))} {_answer_text(nouns, rng)} {EOS}"
            if rng.random() < RATED_SHARE:
                doc += f" {_rating(t, nouns, rng)} {EOS}"
            docs.append(doc)
    return docs


def sft_examples(n: int, *, seed: int) -> list[dict[str, str]]:
    """`n` demonstrations as {"prompt", "completion"} (train split), the SFT JSONL format."""
    rng = random.Random(seed)
    out = []
    for p in make_prompts(n, split="train", seed=seed + 1):
        out.append({"prompt": p, "completion": demonstration(topics_of(p), rng)})
    return out


# ----------------------------------------------------------------------------------------- gold
def _gold(prompt: str, response: str) -> float:
    """The hidden gold score of one response (text; ends at <eos>, no <eos> = never finished)."""
    topics = set(topics_of(prompt))
    words = response.split()
    finished = EOS in words
    if finished:
        words = words[:words.index(EOS)]
    words = [w for w in words if w != PAD]
    seen: list[str] = []
    fit = junk = 0
    prev_adj = None
    prev = None
    for w in words:
        if w in FITS:
            if prev_adj is None:
                junk += 1                        # a noun without its adjective
            elif w in topics and w not in seen and prev_adj in FITS[w]:
                fit += 1
            seen.append(w)
            prev_adj = None
        elif w in ADJECTIVES:
            if prev_adj is not None:
                junk += 1                        # two adjectives in a row
            prev_adj = w
        elif w == "very":
            if prev == "very" or prev_adj is not None:
                junk += 1                        # "very very", "red very"
        elif w == ",":
            if prev in (None, ",") or prev_adj is not None:
                junk += 1
            prev_adj = None
        else:
            junk += 1                            # stray words: "the", "tell", specials
        prev = w
    if prev_adj is not None or prev in ("very", ","):
        junk += 1                                # dangling clause
    distinct = set(seen)
    cover = len(distinct & topics)
    off = len(distinct - topics)
    rep = len(seen) - len(distinct)
    return cover + 0.5 * fit - off - rep - 0.5 * junk - (0.0 if finished else 2.0)


def max_gold(prompt: str) -> float:
    return 1.5 * len(set(topics_of(prompt)))


def gold_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold scores for the final evaluation (the only reader of the gold besides the labeler)."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_scores: {len(prompts)} prompts but {len(responses)} responses")
    return [_gold(p, r) for p, r in zip(prompts, responses)]


def win_rate(a: list[float], b: list[float]) -> float:
    """P(a > b) + 0.5 P(a == b), pairwise by index."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win_rate needs two equal non-empty lists, got {len(a)} and {len(b)}")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@dataclass
class Labeler:
    """The noisy human: Bradley-Terry comparisons of a utility u, P(a > b) = sigmoid((u_a - u_b) / beta).

    u is the hidden gold plus `mention_bonus` for every repeated mention of a prompt topic: a hurried labeler
    who counts how often the asked-about topics come up rather than how many distinct ones do (the gold takes
    1 off per repeat). With mention_bonus = 0 the labels follow the gold alone; above 1 a repeat raises the
    labeler's utility while it lowers the gold: a flaw the reward model learns from the labels and a policy can
    exploit (reward hacking), though demonstrations never repeat a noun.

    `label` returns (chosen, rejected) or None for a tie in u (declined). `agreement` is how often a label
    agreed with the noiseless gold order, over the labels of pairs whose gold differs: the ceiling for any
    reward model's accuracy on such labels when mention_bonus is 0.
    """

    beta: float = 0.3
    seed: int = 0
    mention_bonus: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"Labeler.beta must be > 0, got {self.beta}")
        if not self.mention_bonus >= 0:
            raise ValueError(f"Labeler.mention_bonus must be >= 0, got {self.mention_bonus}")
        self._rng = random.Random(self.seed)
        self.n_labels = 0
        self.n_agree = 0

    def utility(self, prompt: str, response: str) -> float:
        """What this labeler prefers by: the gold + mention_bonus x (mentions of prompt topics - distinct ones)."""
        u = _gold(prompt, response)
        if self.mention_bonus:
            topics = set(topics_of(prompt))
            words = response.split()
            if EOS in words:
                words = words[:words.index(EOS)]
            mentions = [w for w in words if w in topics]
            u += self.mention_bonus * (len(mentions) - len(set(mentions)))
        return u

    def label(self, prompt: str, a: str, b: str) -> tuple[str, str] | None:
        ua, ub = self.utility(prompt, a), self.utility(prompt, b)
        if ua == ub:
            return None
        p_a = 1.0 / (1.0 + math.exp(-(ua - ub) / self.beta))
        a_wins = self._rng.random() < p_a
        ga, gb = _gold(prompt, a), _gold(prompt, b)
        if ga != gb:
            self.n_labels += 1
            self.n_agree += int(a_wins == (ga > gb))
        return (a, b) if a_wins else (b, a)

    @property
    def agreement(self) -> float:
        return self.n_agree / max(1, self.n_labels)


# ----------------------------------------------------------------------------------------- counting (RLVR)
# The demo's task with a verifiable answer: "count moon river bread" -> "three". A checker (count_accuracy), not
# a learned reward model, scores it, as in RL with verifiable rewards. Demonstrators count short lists right and
# lose track of long ones, undercounting by one: the SFT model imitates that (pre-training shows the number words
# but never counting), and only a reward that checks the answer can take it past its demonstrators.
MAX_COUNT = len(NUMBERS)
# P(a demonstrator's count is right) for a list of k = 1..5 nouns; otherwise k - 1 (k + 1 for one noun).
COUNT_RIGHT = (0.9, 0.8, 0.55, 0.35, 0.3)


def count_prompt(nouns: tuple[str, ...] | list[str]) -> str:
    return "count " + " ".join(nouns)


def count_answer(k: int) -> str:
    return NUMBERS[k - 1]


def _sloppy_count(k: int, rng: random.Random) -> str:
    if rng.random() < COUNT_RIGHT[k - 1]:
        return count_answer(k)
    return count_answer(k - 1 if k > 1 else 2)


def count_examples(n: int, *, split: str, seed: int) -> list[dict[str, str]]:
    """`n` counting prompts {"prompt", "answer"} of 1..5 distinct nouns, from the train or held-out split (the
    same split by noun tuple as the chat prompts), deterministic in `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nouns = tuple(rng.sample(NOUNS, rng.randint(1, MAX_COUNT)))
        if _is_heldout(nouns) == (split == "heldout"):
            out.append({"prompt": count_prompt(nouns), "answer": count_answer(len(nouns))})
    return out


def count_demonstrations(n: int, *, seed: int) -> list[dict[str, str]]:
    """`n` SFT demonstrations {"prompt", "completion"} of the counting task by sloppy demonstrators (train split)."""
    rng = random.Random(seed)
    return [{"prompt": e["prompt"], "completion": _sloppy_count(len(e["prompt"].split()) - 1, rng)}
            for e in count_examples(n, split="train", seed=seed + 1)]


def count_accuracy(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """The verifiable reward (TRL's reward-function signature): 1 when the completion is exactly the right number
    word, else 0. `answer` is the example's column."""
    return [float(c.split() == [a]) for c, a in zip(completions, answer)]

"""An AI judge guided by a written constitution (RLAIF, Bai et al. 2022; Lee et al. 2023): a causal LM reads a
judging prompt and its next-token distribution over a few answer tokens is the verdict (log-probs, never free
text).

    Judge                 compare(prompts, a, b) -> P(a better) (B,); rate(prompts, responses) -> score (B,)
    load_constitution     principles.txt -> list of principles
    load_template         a shipped template (rlhf_fast/rl/templates/) or a file, checked for its fields
    judge_reward          a Judge as a reward function with TRL's contract
    JudgeReward           `--reward_funcs judge` of GRPO / PPO (judge_functions, bind_judges: the trainers' hooks)
    load_judge_model      --judge PATH -> RoleModel (a base folder, a .gguf, or a RoleModel folder)

Pairwise mode. The template (fields {principles}, {prompt}, {response_a}, {response_b}) ends where the judge
must answer; p_A(x, y) = softmax(l_A, l_B)[0], the logits of the two answer tokens at the last position. Both
orders are scored and averaged to cancel position bias (Zheng et al. 2023):

    P(a better) = (p_A(a, b) + p_B(b, a)) / 2 = (p_A(a, b) + 1 - p_A(b, a)) / 2

so compare(a, b) = 1 - compare(b, a) exactly, and compare(a, a) = 0.5.

Rating mode. The template (fields {principles}, {prompt}, {response}) ends where the judge gives a rating word;
q = softmax over the logits of the K rating words (renormalised over them), score = sum_k q_k v_k (the
expected rating). A pair's preference from two independent ratings:

    P(a better) = sum_{i,j} q_a(i) q_b(j) ([v_i > v_j] + 0.5 [v_i = v_j])

(the probability that a's rating beats b's, ties split), again with P(a, b) = 1 - P(b, a).

Each answer string must encode to exactly one token of the judge's vocabulary (not its unknown token), since
the verdict is read off one next-token distribution; a BPE vocabulary usually wants the leading space
(" A", " B"). The prompt is the rendered template as plain text (the tokenizer's usual special tokens, e.g. BOS,
no chat template: write one into the template file if the judge wants it).
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.models.conventions import position_ids
from rlhf_fast.models.role_model import RoleModel

TEMPLATE_FIELDS = {
    "judge_pairwise": ("principles", "prompt", "response_a", "response_b"),
    "judge_rating": ("principles", "prompt", "response"),
    "critique": ("principle", "prompt", "response"),
    "revision": ("principle", "prompt", "response", "critique"),
}
DEFAULT_ANSWER_TOKENS = (" A", " B")
DEFAULT_RATING_WORDS = " excellent=4, good=3, fair=2, poor=1, bad=0"


# ----------------------------------------------------------------------------------------------- inputs

def load_constitution(path: str) -> list[str]:
    """The principles of a constitution file: one per non-blank line; lines starting with '#' are comments and
    a leading bullet ('-', '*', '1.', '1)') is dropped. ConfigError when the file is missing, unreadable or
    holds no principle."""
    if not path:
        raise ConfigError("--constitution is required: a text file with one principle per line")
    if os.path.isdir(path):
        raise ConfigError(f"constitution {path!r} is a folder, expected a text file with one principle per line")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"constitution file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"constitution file {path!r} is unreadable: {e}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        if rest and (head in ("-", "*") or (head[:-1].isdigit() and head[-1:] in (".", ")"))):
            line = rest.strip()
        out.append(line)
    if not out:
        raise ConfigError(f"constitution file {path!r} holds no principles (one per line; '#' lines are comments)")
    return out


def format_principles(principles: Sequence[str]) -> str:
    """The {principles} field of the judge templates: a numbered list, one principle per line."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))


def load_template(kind: str, path: str = "") -> str:
    """Template `kind` (judge_pairwise, judge_rating, critique, revision): the file `path` when given, else the
    one shipped in rlhf_fast/rl/templates/<kind>.txt. Trailing newlines are removed (the rendered text ends
    where the model must continue). ConfigError when the file is missing or its {fields} are not exactly
    the kind's (write a literal brace as {{ or }})."""
    need = TEMPLATE_FIELDS[kind]
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{kind} template {path!r} is unreadable: {getattr(e, 'strerror', None) or e}") from None
    else:
        text = resources.files("rlhf_fast.rl").joinpath("templates", f"{kind}.txt").read_text(encoding="utf-8")
    text = text.rstrip("\r\n")
    where = path or f"the shipped {kind}.txt"
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{kind} template {where}: {e} (write a literal brace as {{{{ or }}}})") from None
    unknown, missing = sorted(names - set(need)), [f for f in need if f not in names]
    if unknown or missing:
        raise ConfigError(f"{kind} template {where}: fields must be {{{'}, {'.join(need)}}}; "
                          + (f"unknown {unknown}" if unknown else "") + ("; " if unknown and missing else "")
                          + (f"missing {missing}" if missing else ""))
    return text


def parse_answer_tokens(spec: str | Sequence[str]) -> tuple[str, str]:
    """"A,B" (or a pair) -> the two answer strings, kept verbatim (a leading space is part of a BPE token)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if len(items) != 2 or not all(isinstance(s, str) and s.strip() for s in items) or items[0] == items[1]:
        raise ConfigError(f"answer_tokens must be two different non-empty strings, e.g. ' A',' B'; got {spec!r}")
    return items[0], items[1]


def parse_rating_words(spec: str | Sequence[tuple[str, float]]) -> tuple[list[str], list[float]]:
    """"great=3,good=2,bad=0" -> (words, values); words kept verbatim (a leading space included)."""
    pairs = []
    if isinstance(spec, str):
        for item in spec.split(","):
            word, eq, value = item.rpartition("=")
            try:
                pairs.append((word, float(value)))
            except ValueError:
                raise ConfigError(f"rating_words must read word=value,... (e.g. ' good=1, bad=0'); bad item "
                                  f"{item!r}") from None
            if not eq or not word.strip():
                raise ConfigError(f"rating_words must read word=value,...; bad item {item!r}")
    else:
        pairs = [(w, float(v)) for w, v in spec]
    words = [w for w, _ in pairs]
    if len(pairs) < 2 or len(set(words)) != len(words):
        raise ConfigError(f"rating_words needs at least two different words, got {spec!r}")
    if len({v for _, v in pairs}) < 2:
        raise ConfigError(f"rating_words must give at least two different values, got {spec!r}")
    return words, [v for _, v in pairs]


def single_token_ids(tokenizer, words: Sequence[str], option: str, example: str) -> list[int]:
    """The one token id of each word; ConfigError naming the word when it is several tokens or unknown."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for w in words:
        enc = list(tokenizer(w, add_special_tokens=False)["input_ids"])
        if len(enc) != 1 or (unk is not None and enc[0] == unk):
            what = (f"encodes to {len(enc)} tokens {tokenizer.convert_ids_to_tokens(enc)}" if len(enc) != 1
                    else "is not in the vocabulary (it encodes to the unknown token)")
            raise ConfigError(f"{option} {w!r} {what} in the judge's vocabulary; the verdict is read off one "
                              f"next-token distribution, so each must be exactly one token: configure them with "
                              f"--{option} (e.g. --{option} {example}; a BPE vocabulary usually wants the leading "
                              f"space)")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{option} {list(words)} map to the same token id(s) {ids}: they must be distinct tokens")
    return ids


def prompt_text(prompt) -> str:
    """A prompt as text: a conversational one (a list of messages) as "role: content" lines."""
    # a conversational prompt (a list of messages) is shown to the judge as "role: content" lines
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


# ----------------------------------------------------------------------------------------------- the judge

class Judge:
    """A causal LM as a judge.

    Args:
        model: a RoleModel (run under `role`; "reference" = the base with the adapters off, so a policy's own
            base can judge without a second copy) or a plain transformers causal LM.
        tokenizer: the judge's tokenizer (required: it renders the template and finds the answer tokens).
        principles: the constitution, one string per principle (rendered as a numbered list).
        pairwise_template, rating_template: template texts (load_template); None: the shipped ones.
        answer_tokens: the two answer strings of pairwise mode, each one token (default " A", " B").
        rating_words: "word=value,..." or (word, value) pairs of rating mode, each word one token.
        role: the RoleModel role that judges ("reference" or "policy").
        batch_size: rows per forward (a pairwise comparison is 2 rows, one per order).
        max_length: longest rendered prompt in tokens (default: the model's max_position_embeddings); a longer
            one is a ValueError naming the row.
        mode: "pairwise" (compare() asks for A or B) or "rating" (compare() = compare_by_rating); the mode's
            answer strings are checked here, the other mode's on first use.
    Only the answer tokens' rows of the lm_head are used: logits (N, 2) or (N, K), never (N, V).
    """

    def __init__(self, model, tokenizer, principles: Sequence[str], *, pairwise_template: str | None = None,
                 rating_template: str | None = None, answer_tokens: str | Sequence[str] = DEFAULT_ANSWER_TOKENS,
                 rating_words: str | Sequence = DEFAULT_RATING_WORDS, role: str = "reference",
                 batch_size: int = 8, max_length: int | None = None, mode: str = "pairwise"):
        if tokenizer is None:
            raise ConfigError("the judge model has no tokenizer (its folder holds no tokenizer files): a judge "
                              "must render text, so give it a model folder with its tokenizer")
        if not principles or not all(isinstance(p, str) and p.strip() for p in principles):
            raise ConfigError("the judge needs at least one non-empty principle (the constitution)")
        if role not in ("reference", "policy"):
            raise ConfigError(f"judge role must be 'reference' or 'policy', got {role!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"judge batch_size must be >= 1, got {batch_size!r}")
        self.model, self.tokenizer, self.role, self.batch_size = model, tokenizer, role, batch_size
        self.principles = list(principles)
        self.pairwise_template = pairwise_template or load_template("judge_pairwise")
        self.rating_template = rating_template or load_template("judge_rating")
        self.mode = mode
        if mode not in ("pairwise", "rating"):
            raise ConfigError(f"judge mode must be 'pairwise' or 'rating', got {mode!r}")
        self.answer_tokens = parse_answer_tokens(answer_tokens)
        self.rating_words, values = parse_rating_words(rating_words)
        self.rating_values = torch.tensor(values, dtype=torch.float32)  # (K,)
        self._ids: dict[str, list[int]] = {}
        _ = self.answer_ids if mode == "pairwise" else self.rating_ids  # the mode's tokens checked now
        self.max_length = max_length or getattr(self._lm.config, "max_position_embeddings", None)
        self.pad_id = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)

    @property
    def answer_ids(self) -> list[int]:
        """The token ids of the two answer strings (checked on first use: ConfigError unless single tokens)."""
        if "answer" not in self._ids:
            self._ids["answer"] = single_token_ids(self.tokenizer, self.answer_tokens, "answer_tokens", "' A',' B'")
        return self._ids["answer"]

    @property
    def rating_ids(self) -> list[int]:
        """The token ids of the rating words (checked on first use)."""
        if "rating" not in self._ids:
            self._ids["rating"] = single_token_ids(self.tokenizer, self.rating_words, "rating_words",
                                                   "' good=1,' bad=0'")
        return self._ids["rating"]

    @property
    def _lm(self):
        return self.model.lm if isinstance(self.model, RoleModel) else self.model

    # -- rendering ------------------------------------------------------------------------------------------

    def render_pairwise(self, prompt, response_a: str, response_b: str) -> str:
        return self.pairwise_template.format(principles=format_principles(self.principles),
                                             prompt=prompt_text(prompt), response_a=response_a, response_b=response_b)

    def render_rating(self, prompt, response: str) -> str:
        return self.rating_template.format(principles=format_principles(self.principles),
                                           prompt=prompt_text(prompt), response=response)

    # -- scoring --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def next_token_logits(self, texts: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
        """(N, K) fp32 logits of `token_ids` as the next token after each text, batch_size rows per forward:
        the backbone's final hidden state at the last position times those K rows of the lm_head."""
        lm = self._lm
        head = lm.get_output_embeddings()
        device = head.weight.device
        ids_k = torch.tensor(list(token_ids), device=device)
        w = head.weight[ids_k].float()  # (K, H)
        b = head.bias[ids_k].float() if getattr(head, "bias", None) is not None else None
        encoded = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        for i, e in enumerate(encoded):
            if not e:
                raise ValueError(f"judge prompt {i} encodes to no tokens")
            if self.max_length and len(e) > self.max_length:
                raise ValueError(f"judge prompt {i} has {len(e)} tokens, more than the judge's context "
                                 f"max_length={self.max_length}: shorten the responses or the template")
        out = []
        ctx = self.model.role(self.role) if isinstance(self.model, RoleModel) else _nothing()
        was = lm.training
        lm.eval()
        try:
            with ctx:
                for s in range(0, len(encoded), self.batch_size):
                    chunk = encoded[s:s + self.batch_size]
                    width = max(len(e) for e in chunk)
                    ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (n, T) left-padded
                    mask = torch.zeros_like(ids)
                    for r, e in enumerate(chunk):
                        ids[r, width - len(e):] = torch.tensor(e)
                        mask[r, width - len(e):] = 1
                    ids, mask = ids.to(device), mask.to(device)
                    hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                           use_cache=False)[0]  # (n, T, H)
                    h = hidden[:, -1].float()  # (n, H): left padding puts every row's last token in the last column
                    logits = h @ w.T  # (n, K)
                    out.append(logits + b if b is not None else logits)
        finally:
            lm.train(was)
        return torch.cat(out).cpu()

    def compare(self, prompts: Sequence, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(B,) fp32 P(a[i] better than b[i]): in pairwise mode both orders averaged, in rating mode
        compare_by_rating (module docstring)."""
        if self.mode == "rating":
            return self.compare_by_rating(prompts, a, b)
        B = _check_lengths(prompts, a, b)
        if B == 0:
            return torch.zeros(0)
        texts = [self.render_pairwise(p, x, y) for p, x, y in zip(prompts, a, b)]
        texts += [self.render_pairwise(p, y, x) for p, x, y in zip(prompts, a, b)]
        probs = self.next_token_logits(texts, self.answer_ids).softmax(-1)  # (2B, 2): [p(A), p(B)]
        return 0.5 * (probs[:B, 0] + probs[B:, 1])

    def rating_distribution(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        """(B, K) fp32: the judge's distribution over the K rating words, renormalised over them."""
        _check_lengths(prompts, responses)
        texts = [self.render_rating(p, r) for p, r in zip(prompts, responses)]
        return self.next_token_logits(texts, self.rating_ids).softmax(-1)

    def rate(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        """(B,) fp32: the expected rating value sum_k q_k v_k of each response."""
        if len(responses) == 0:
            return torch.zeros(0)
        return self.rating_distribution(prompts, responses) @ self.rating_values

    def compare_by_rating(self, prompts: Sequence, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(B,) fp32 P(a's rating beats b's), ties counted half (module docstring)."""
        B = _check_lengths(prompts, a, b)
        if B == 0:
            return torch.zeros(0)
        q = self.rating_distribution(list(prompts) * 2, list(a) + list(b))  # (2B, K)
        return rating_preference(q[:B], q[B:], self.rating_values)


def rating_preference(qa: torch.Tensor, qb: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """P(rating_a > rating_b) + 0.5 P(rating_a = rating_b) for independent ratings: qa, qb (B, K), values (K,)."""
    v = values.float()
    win = (v[:, None] > v[None, :]).float() + 0.5 * (v[:, None] == v[None, :]).float()  # (K, K)
    return torch.einsum("bi,ij,bj->b", qa.float(), win, qb.float())


def _check_lengths(*cols) -> int:
    n = {len(c) for c in cols}
    if len(n) != 1:
        raise ValueError(f"prompts and responses must be aligned, got lengths {[len(c) for c in cols]}")
    return n.pop()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------- loading

def load_judge_model(path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> RoleModel:
    """--judge / --policy / --model PATH as a RoleModel on `device`: a RoleModel folder (role_model.json: its
    adapters loaded), else a base folder or .gguf file. ConfigError when it does not load or has no tokenizer."""
    if not path:
        raise ConfigError("a model path is required (a local transformers folder, .gguf file or RoleModel folder)")
    is_folder = os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
    if is_folder and not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"model {path!r} has no tokenizer (no tokenizer.json / tokenizer_config.json in its "
                          "folder): it must read and write text")
    try:
        if os.path.isfile(os.path.join(path, "role_model.json")):
            model = RoleModel.load(path, dtype=dtype)
        else:
            model = RoleModel.from_pretrained(path, dtype=dtype)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {path!r}: {e}") from e
    if model.tokenizer is None:
        raise ConfigError(f"model {path!r} has no tokenizer (no tokenizer.json / tokenizer_config.json in its "
                          "folder): it must read and write text")
    return model.to(device)


def judge_reward(judge: Judge, name: str = "judge"):
    """A Judge as a reward function with TRL's contract: f(prompts, completions, **_) -> rating-mode scores
    (the expected rating value, `Judge.rate`)."""

    def judge_fn(prompts, completions, **_):
        return judge.rate(list(prompts), [prompt_text(c) for c in completions]).tolist()

    judge_fn.__name__ = name
    return judge_fn


class JudgeReward:
    """`--reward_funcs judge` of GRPO and PPO: the judge's rating-mode score of each completion, sum_k q_k v_k.

    Rating mode because it needs one response per sample (pairwise would need a reference response to compare
    against). Built from the trainer's options before any model is loaded, so a missing --judge, a missing or
    empty constitution or a bad template fails first (ConfigError); bind() then gives it its model: the policy's
    own RoleModel under the reference role (adapters off, no second copy of the base) when judge_path names the
    policy's --model folder, else judge_path loaded once on the policy's device. Called before bind(), it binds
    itself to a model loaded from judge_path.
    """

    def __init__(self, judge_path: str, constitution: str, *, template: str = "",
                 rating_words: str = DEFAULT_RATING_WORDS, batch_size: int = 8):
        if not judge_path:
            raise ConfigError("--reward_funcs judge needs --judge MODEL (a local model folder; --judge equal to "
                              "--model reuses the policy's base)")
        self.judge_path, self.batch_size, self.rating_words = judge_path, batch_size, rating_words
        self.principles = load_constitution(constitution)
        self.template = load_template("judge_rating", template)
        parse_rating_words(rating_words)
        self.judge: Judge | None = None
        self.__name__ = "judge"

    def bind(self, policy=None, policy_path: str = "", tokenizer=None) -> Judge:
        same = policy is not None and bool(policy_path) and \
            os.path.realpath(self.judge_path) == os.path.realpath(policy_path)
        if same:
            model, tokenizer = policy, tokenizer or policy.tokenizer
        else:
            device = next(policy.parameters()).device if policy is not None else "cpu"
            model = load_judge_model(self.judge_path, device=device)
            tokenizer = model.tokenizer
        self.judge = Judge(model, tokenizer, self.principles, rating_template=self.template, mode="rating",
                           rating_words=self.rating_words, role="reference", batch_size=self.batch_size)
        return self.judge

    def __call__(self, prompts, completions, **_):
        judge = self.judge or self.bind()
        return judge.rate(list(prompts), [prompt_text(c) for c in completions]).tolist()


def judge_functions(reward_funcs: str, judge: str, constitution: str, template: str = "",
                    rating_words: str = DEFAULT_RATING_WORDS) -> dict:
    """{"judge": JudgeReward(...)} when the comma-separated reward_funcs name `judge`, else {}: the trainers'
    `functions=` entry for load_reward_functions."""
    if "judge" not in [f.strip() for f in reward_funcs.split(",")]:
        return {}
    return {"judge": JudgeReward(judge, constitution, template=template, rating_words=rating_words)}


def bind_judges(funcs, policy, policy_path: str = "", tokenizer=None) -> None:
    """Give every JudgeReward among a RewardFunctions' functions its model (JudgeReward.bind)."""
    for f in getattr(funcs, "funcs", []):
        if isinstance(f, JudgeReward):
            f.bind(policy, policy_path, tokenizer)

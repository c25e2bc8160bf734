"""The constitutional judge (rlhf_fast/rl/judge.py) on a tiny word-level model: its answer-token probabilities
against a plain transformers forward with materialised logits, the order averaging, rating-mode expectations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_fast.errors import ConfigError
from rlhf_fast.rl import judge as J
from rlhf_fast.rl.judge import Judge
from rlhf_fast.rl.rewards import load_reward_functions
from tests import tiny

# templates in the tiny vocabulary (w0..w92), so every word is a real token
PAIR = "w3 {principles} w4 {prompt} w5 {response_a} w6 {response_b} w7"
RATE = "w3 {principles} w4 {prompt} w5 {response} w8"
PRINCIPLES = ["w20 w21", "w22"]
PROMPTS = ["w10 w11", "w12", "w13 w14 w15"]
A = ["w30 w31", "w32", "w33 w34 w35 w36"]
B = ["w40", "w41 w42 w43", "w44"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny.build_tiny_model(tmp_path_factory.mktemp("judge-llama"), "llama"))


@pytest.fixture(scope="module")
def role_model(model_dir):
    return J.load_judge_model(model_dir)


def _judge(role_model, **kw):
    kw = dict(pairwise_template=PAIR, rating_template=RATE, answer_tokens="w50,w51",
              rating_words="w60=3,w61=2,w62=1,w63=0", batch_size=2) | kw
    return Judge(role_model, role_model.tokenizer, PRINCIPLES, **kw)


def _plain_next_logits(model_dir, tok, text):
    # the independent path: a plain transformers forward, full (1, T, V) logits at the last position
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return lm(input_ids=ids).logits[0, -1].double()  # (V,)


def test_pairwise_matches_plain_forward(model_dir, role_model):
    judge = _judge(role_model)
    tok = role_model.tokenizer
    a_id, b_id = tok.convert_tokens_to_ids(["w50", "w51"])
    got = judge.compare(PROMPTS, A, B)
    for i in range(len(PROMPTS)):
        l1 = _plain_next_logits(model_dir, tok, judge.render_pairwise(PROMPTS[i], A[i], B[i]))
        l2 = _plain_next_logits(model_dir, tok, judge.render_pairwise(PROMPTS[i], B[i], A[i]))
        p_first = torch.softmax(l1[[a_id, b_id]], 0)[0]
        p_second = torch.softmax(l2[[a_id, b_id]], 0)[1]
        torch.testing.assert_close(got[i].double(), (p_first + p_second) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, torch.full_like(got, 0.5))  # a random model has opinions


def test_order_averaging_is_symmetric(role_model):
    judge = _judge(role_model)
    ab, ba = judge.compare(PROMPTS, A, B), judge.compare(PROMPTS, B, A)
    torch.testing.assert_close(ab + ba, torch.ones_like(ab), atol=1e-6, rtol=0)
    torch.testing.assert_close(judge.compare(PROMPTS, A, A), torch.full((3,), 0.5), atol=1e-6, rtol=0)


def test_batching_does_not_change_results(role_model):
    torch.testing.assert_close(_judge(role_model, batch_size=1).compare(PROMPTS, A, B),
                               _judge(role_model, batch_size=6).compare(PROMPTS, A, B), atol=1e-5, rtol=1e-5)


def test_reference_role_ignores_the_policy_adapter(role_model):
    before = _judge(role_model).compare(PROMPTS, A, B)
    with torch.no_grad():
        for n, p in role_model.peft.named_parameters():
            if ".policy." in n and "lora_B" in n:
                p.add_(0.5)
    try:
        torch.testing.assert_close(_judge(role_model).compare(PROMPTS, A, B), before)
        assert not torch.allclose(_judge(role_model, role="policy").compare(PROMPTS, A, B), before)
    finally:
        with torch.no_grad():
            for n, p in role_model.peft.named_parameters():
                if ".policy." in n and "lora_B" in n:
                    p.zero_()


def test_rating_mode_expected_values(model_dir, role_model):
    judge = _judge(role_model, mode="rating")
    tok = role_model.tokenizer
    ids = tok.convert_tokens_to_ids(["w60", "w61", "w62", "w63"])
    values = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    scores = judge.rate(PROMPTS, A)
    qa, qb = [], []
    for i in range(len(PROMPTS)):
        qa.append(torch.softmax(_plain_next_logits(model_dir, tok, judge.render_rating(PROMPTS[i], A[i]))[ids], 0))
        qb.append(torch.softmax(_plain_next_logits(model_dir, tok, judge.render_rating(PROMPTS[i], B[i]))[ids], 0))
        torch.testing.assert_close(scores[i].double(), (qa[i] * values).sum(), atol=1e-5, rtol=1e-5)
    # P(a > b) + 0.5 P(tie), written as a double loop
    want = torch.tensor([sum(float(qa[r][i] * qb[r][j]) * (1.0 if i < j else 0.5 if i == j else 0.0)
                             for i in range(4) for j in range(4)) for r in range(3)], dtype=torch.float64)
    got = judge.compare(PROMPTS, A, B)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got + judge.compare(PROMPTS, B, A), torch.ones(3), atol=1e-6, rtol=0)


def test_judge_reward_function(role_model):
    judge = _judge(role_model, mode="rating")
    funcs = load_reward_functions("judge", functions={"judge": J.judge_reward(judge)})
    rewards, per = funcs(PROMPTS, A)
    torch.testing.assert_close(rewards, judge.rate(PROMPTS, A))
    assert set(per) == {"judge"}


def test_bad_answer_tokens(role_model):
    with pytest.raises(ConfigError, match=r"answer_tokens ' A' is not in the vocabulary.*--answer_tokens"):
        _judge(role_model, answer_tokens=J.DEFAULT_ANSWER_TOKENS)
    with pytest.raises(ConfigError, match=r"answer_tokens 'w50 w51' encodes to 2 tokens"):
        _judge(role_model, answer_tokens=["w50 w51", "w52"])
    with pytest.raises(ConfigError, match="rating_words"):
        _judge(role_model, mode="rating", rating_words="w60=1,zzz=0")
    _judge(role_model, mode="rating", answer_tokens=J.DEFAULT_ANSWER_TOKENS)  # pairwise tokens unused: fine
    with pytest.raises(ConfigError, match="two different"):
        J.parse_answer_tokens("A")
    with pytest.raises(ConfigError, match="word=value"):
        J.parse_rating_words("good,bad")


def test_judge_without_tokenizer(role_model):
    with pytest.raises(ConfigError, match="no tokenizer"):
        Judge(role_model, None, PRINCIPLES)


def test_constitution_and_templates(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# comment\n\n- Be honest.\n2. Be kind.\nBe brief.\n")
    assert J.load_constitution(str(f)) == ["Be honest.", "Be kind.", "Be brief."]
    f.write_text("# only comments\n\n")
    with pytest.raises(ConfigError, match="holds no principles"):
        J.load_constitution(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        J.load_constitution(str(tmp_path / "missing.txt"))
    for kind in J.TEMPLATE_FIELDS:
        assert J.load_template(kind)  # the shipped ones are valid
    t = tmp_path / "t.txt"
    t.write_text("{principles} {prompt} {response_a}\n")
    with pytest.raises(ConfigError, match="missing.*response_b"):
        J.load_template("judge_pairwise", str(t))
    t.write_text("{principles} {prompt} {response_a} {response_b} {extra}")
    with pytest.raises(ConfigError, match="unknown.*extra"):
        J.load_template("judge_pairwise", str(t))

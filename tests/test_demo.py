"""The embedded demo: the task's hidden gold and labeler, and a miniature of `rlhf-fast demo` end to end."""

import json
import random

import pytest
import torch

from rlhf_fast.demo import task

REPORT_KEYS = {"sft": {"gold_score"}, "rm": {"heldout_accuracy", "labeler_agreement"},
               "ppo": {"gold_score", "gold_win_rate_vs_sft", "kl", "proxy_reward", "lr", "steps", "kept_step"},
               "ppo_no_kl": {"gold_score", "gold_win_rate_vs_sft", "kl", "proxy_reward", "lr", "steps", "kept_step"},
               "ppo_kl_control": {"gold_score", "gold_win_rate_vs_sft", "kl", "proxy_reward", "lr", "steps", "kept_step"},
               "grpo": {"accuracy_before", "accuracy_after", "heldout_prompts"},
               "dpo": {"gold_score", "gold_win_rate_vs_sft", "kl", "proxy_reward", "beta"},
               "params": {"base", "trainable", "total"}}


# ----------------------------------------------------------------------------------------- the task
def test_tokenizer_round_trip_and_chat_template():
    tok = task.build_tokenizer()
    assert len(tok) == len(task.VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "<bos> <user> tell me about moon river <bot> very bright moon , calm river <eos>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "tell me about moon river"},
                                    {"role": "assistant", "content": "very bright moon , calm river"}], tokenize=False)
    assert tok(chat, add_special_tokens=False)["input_ids"] == ids
    gen = tok.apply_chat_template([{"role": "user", "content": "tell me about moon"}], tokenize=False,
                                  add_generation_prompt=True)
    assert tok(gen, add_special_tokens=False)["input_ids"][-1] == tok.convert_tokens_to_ids(task.BOT)


@pytest.mark.parametrize("response, expected", [
    ("bright moon , calm river <eos>", 3.0),          # both topics, both adjectives fit
    ("very bright moon , very calm river <eos>", 3.0),  # "very" earns nothing
    ("red moon <eos>", 1.0),                           # covered, wrong adjective
    ("bright moon , bright moon <eos>", 0.5),          # a repeat costs 1
    ("bright moon , old lamp <eos>", 0.5),             # off-topic noun costs 1
    ("very very bright moon <eos>", 1.0),              # a second "very" is junk (-0.5)
    ("bright moon , calm river", 1.0),                 # never finished: -2
    ("the moon is bright <eos>", -1.0),                # prose, not an answer: 1 - 4 junk * 0.5
    ("<eos>", 0.0),
])
def test_gold_components(response, expected):
    assert task.gold_scores(["tell me about moon river"], [response]) == [expected]


def test_best_answer_reaches_max_gold():
    rng = random.Random(0)
    for _ in range(50):
        topics = task.sample_topics(rng)
        p = task.format_prompt(topics)
        best = " , ".join(f"{task.FITS[t][0]} {t}" for t in topics) + " <eos>"
        assert task.gold_scores([p], [best]) == [task.max_gold(p)]


def test_splits_are_disjoint_and_pretraining_has_no_heldout_prompt():
    held = set(task.make_prompts(300, split="heldout", seed=1))
    train = set(task.make_prompts(3000, split="train", seed=2))
    assert held and train and not held & train
    docs = task.pretraining_text(2000, seed=3)
    assert not any(task.render_prompt(p) in d for d in docs for p in list(held)[:50])
    with pytest.raises(ValueError, match="split"):
        task.make_prompts(1, split="test", seed=0)


def test_pretraining_shows_the_number_words_but_not_counting():
    words = [w for d in task.pretraining_text(2000, seed=3) for w in d.split()]
    share = {n: words.count(n) / len(words) for n in task.NUMBERS}
    assert all(v > 1e-3 for v in share.values()), share  # their embeddings get trained
    assert "count" not in words


def test_demonstrations_are_useful_but_imperfect():
    ex = task.sft_examples(500, seed=0)
    gold = task.gold_scores([e["prompt"] for e in ex], [e["completion"] + " <eos>" for e in ex])
    best = [task.max_gold(e["prompt"]) for e in ex]
    mean_gold, mean_best = sum(gold) / len(gold), sum(best) / len(best)
    assert 0.3 * mean_best < mean_gold < 0.8 * mean_best  # headroom for RLHF
    for e in ex:  # demonstrators never repeat a noun
        nouns = [w for w in e["completion"].split() if w in task.FITS]
        assert len(nouns) == len(set(nouns))


def test_labeler_noise_and_ties():
    p = "tell me about moon river"
    good, bad = "bright moon , calm river <eos>", "red moon <eos>"
    sharp, noisy = task.Labeler(beta=0.05, seed=0), task.Labeler(beta=50.0, seed=0)
    for _ in range(400):
        assert sharp.label(p, good, bad)[0] == good
        noisy.label(p, good, bad)
    assert sharp.agreement == 1.0
    assert 0.4 < noisy.agreement < 0.6
    assert sharp.label(p, good, "very bright moon , very calm river <eos>") is None  # equal gold: declined
    with pytest.raises(ValueError, match="beta"):
        task.Labeler(beta=0.0)


def test_labeler_mention_bonus_prefers_repeats_the_gold_punishes():
    p = "tell me about moon river"
    honest, padded = "bright moon , calm river <eos>", "bright moon , calm river , white moon , calm river <eos>"
    assert task.gold_scores([p, p], [honest, padded]) == [3.0, 1.0]  # two repeats: -1 each
    fair, hurried = task.Labeler(beta=0.05, seed=0), task.Labeler(beta=0.05, seed=0, mention_bonus=1.5)
    assert fair.utility(p, padded) == 1.0 and hurried.utility(p, padded) == 4.0
    assert hurried.utility(p, honest) == 3.0  # no repeat: no bonus
    off_topic = "bright moon , white bird , white bird <eos>"  # repeats of an off-topic noun earn nothing
    assert hurried.utility(p, off_topic) == task.gold_scores([p], [off_topic])[0]
    for _ in range(50):
        assert fair.label(p, honest, padded)[0] == honest
        assert hurried.label(p, honest, padded)[0] == padded
    assert fair.agreement == 1.0 and hurried.agreement == 0.0  # agreement is with the gold order
    with pytest.raises(ValueError, match="mention_bonus"):
        task.Labeler(mention_bonus=-1.0)


def test_win_rate_counts_ties_half():
    assert task.win_rate([2, 1, 0], [1, 1, 1]) == pytest.approx(0.5)
    assert task.win_rate([3, 3], [1, 2]) == 1.0
    with pytest.raises(ValueError):
        task.win_rate([], [])


# ----------------------------------------------------------------------------------------- counting (RLVR)
def test_count_task_checker_and_sloppy_demonstrators():
    ex = task.count_examples(400, split="train", seed=0)
    held = task.count_examples(200, split="heldout", seed=1)
    assert not {e["prompt"] for e in ex} & {e["prompt"] for e in held}
    for e in ex[:50]:
        k = len(e["prompt"].split()) - 1
        assert 1 <= k <= task.MAX_COUNT and e["answer"] == task.NUMBERS[k - 1]
    acc = task.count_accuracy(["count moon river"] * 4, ["two", "three", "two two", ""], ["two"] * 4)
    assert acc == [1.0, 0.0, 0.0, 0.0]
    demos = task.count_demonstrations(2000, seed=0)
    right = task.count_accuracy([d["prompt"] for d in demos], [d["completion"] for d in demos],
                                [task.NUMBERS[len(d["prompt"].split()) - 2] for d in demos])
    by_k = {}
    for d, r in zip(demos, right):
        by_k.setdefault(len(d["prompt"].split()) - 1, []).append(r)
    # short lists counted right, long ones mostly not: a checker can take a policy past its demonstrators
    assert sum(by_k[1]) / len(by_k[1]) > 0.8 and sum(by_k[5]) / len(by_k[5]) < 0.45
    assert 0.45 < sum(right) / len(right) < 0.7


# ----------------------------------------------------------------------------------------- the shipped base
def test_shipped_base_is_current():
    """The committed pre-trained base of seed 0 was made from today's language and default settings: a change to
    either must regenerate it (the command is in rlhf_fast/demo/base.py), or the demo silently pre-trains again."""
    from rlhf_fast.demo import base
    from rlhf_fast.demo.run import DemoConfig, build_base

    cfg = DemoConfig()
    model = build_base(cfg, task.build_tokenizer())
    assert base.load(base.shipped_path(0), model, cfg) is None
    assert base.read_metadata(base.shipped_path(0))["pretrain_loss"] < 1.5


def test_base_file_round_trip_and_fingerprint(tmp_path):
    from rlhf_fast.demo import base
    from rlhf_fast.demo.run import DemoConfig, build_base

    cfg = DemoConfig.tiny(seed=3)
    tok = task.build_tokenizer()
    a = build_base(cfg, tok)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)  # not the seeded initialisation
    base.save(tmp_path / "b.safetensors", a, cfg, 1.25)
    b = build_base(cfg, tok)
    assert base.load(tmp_path / "b.safetensors", b, cfg) is None
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()  # still tied
    other = DemoConfig.tiny(seed=3, pretrain_steps=31)
    why = base.load(tmp_path / "b.safetensors", build_base(other, tok), other)
    assert why is not None and "pretrain_steps" in why
    assert base.load(tmp_path / "missing.safetensors", b, cfg).startswith("no file")


def test_bad_pretrained_file_exits_2_and_writes_nothing(tmp_path, capsys):
    from rlhf_fast.demo import run as demo

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.main(["--tiny", "--pretrained", str(tmp_path / "missing.safetensors"), "--out", str(out)])
    assert e.value.code == 2
    assert "--pretrained" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------- the miniature
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from rlhf_fast.demo import run as demo

    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--tiny", "--out", str(out)]) == 0
    return out


def test_demo_writes_its_files(demo_dir):
    for f in ("report.json", "report.md", "reward_vs_step.png", "kl_vs_step.png", "gold_vs_kl.png",
              "model/base/config.json", "model/base/model.safetensors", "model/base/tokenizer.json"):
        assert (demo_dir / f).is_file(), f
    for role in ("policy", "critic", "reward"):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (demo_dir / "model" / "adapters" / role / f).is_file(), (role, f)
    md = (demo_dir / "report.md").read_text()
    for png in ("reward_vs_step.png", "kl_vs_step.png", "gold_vs_kl.png"):
        assert f"({png})" in md


def test_demo_report_keys_and_sanity(demo_dir):
    r = json.loads((demo_dir / "report.json").read_text())
    for block, keys in REPORT_KEYS.items():
        assert keys <= set(r[block]), (block, keys - set(r[block]))
    assert r["wall_seconds"] > 0
    assert set(r["stage_cpu_seconds"]) == set(r["stage_seconds"]) - {"report"}
    assert sum(r["stage_cpu_seconds"].values()) <= r["cpu_seconds"] + 1e-6
    assert 0.5 < r["rm"]["labeler_agreement"] <= 1.0
    assert 0.0 <= r["rm"]["heldout_accuracy"] <= 1.0
    for run in ("ppo", "ppo_no_kl", "ppo_kl_control", "dpo"):
        assert 0.0 <= r[run]["gold_win_rate_vs_sft"] <= 1.0
        assert all(v == v for v in r[run].values())  # no NaN
    c, n = r["config"], r["ppo_no_kl"]
    # the control differs from the no-KL run in the penalty (and its length, control_steps)
    assert (n["kl_coef"], n["lr"], n["steps"]) == (0.0, c["no_kl_lr"], c["no_kl_steps"])
    assert (r["ppo_kl_control"]["kl_coef"], r["ppo_kl_control"]["lr"], r["ppo_kl_control"]["steps"]) == (
        c["kl_coef"], c["no_kl_lr"], c["control_steps"])
    assert (r["ppo"]["lr"], r["ppo"]["steps"]) == (c["ppo_lr"], c["ppo_steps"])
    assert [p["step"] for p in r["curves"]["ppo_kl_control"]][-1] == c["control_steps"]
    assert [p["step"] for p in r["curves"]["ppo_no_kl"]][-1] == c["no_kl_steps"]
    p = r["params"]
    assert p["trainable"] > 0 and p["total"] == p["base"] + p["trainable"]
    bon = r["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 8]
    assert bon[0]["kl"] == pytest.approx(0.0, abs=1e-12)  # Best-of-1 is the policy itself
    assert all(b["kl"] <= b["kl_bound"] + 1e-9 for b in bon)  # ties only lower the KL below the closed form
    assert bon[-1]["proxy_reward"] >= bon[0]["proxy_reward"] - 1e-9  # picking by the RM cannot lower its score
    assert p["total"] <= 1.05 * p["base"]
    assert r["eval_prompts"] >= 200
    assert r["sft"]["gold_score"] <= r["max_gold_score"] and r["ppo"]["gold_score"] <= r["max_gold_score"]
    g = r["grpo"]
    assert g["heldout_prompts"] >= 200 and 0 <= g["accuracy_before"] <= 1 and 0 <= g["accuracy_after"] <= 1
    assert len(g["train_reward"]) == r["config"]["grpo_steps"]
    steps = [c["step"] for c in r["curves"]["ppo"]]
    assert steps[0] == 0 and steps[-1] == r["config"]["ppo_steps"]
    assert r["curves"]["ppo_no_kl"][0]["kl"] == 0.0
    assert c["ppo_keep"] == "best_proxy" and c["no_kl_keep"] == "best_proxy_late"
    for run in ("ppo", "ppo_no_kl", "ppo_kl_control"):
        curve = r["curves"][run]
        kept = [p for p in curve if p.get("kept")]
        # never step 0 (the SFT model itself is not a PPO checkpoint); the no-KL run: its last quarter only
        first = c["no_kl_steps"] - c["no_kl_steps"] // 4 if run == "ppo_no_kl" else 1
        later = [p for p in curve if p["step"] >= first]
        assert len(kept) == 1 and kept[0]["step"] == r[run]["kept_step"] >= first, run
        assert kept[0]["proxy_reward"] == max(p["proxy_reward"] for p in later), run


def test_demo_kl_runs_use_the_adaptive_controller(demo_dir):
    """The KL run and its control steer their coefficient to kl_target (the demo's default); the no-KL run has no
    penalty to steer. Read back from each run's config and metrics, and the report's row names."""
    cfgs = {run: json.loads((demo_dir / "work" / run / "config.json").read_text())
            for run in ("ppo", "ppo_no_kl", "ppo_kl_control")}
    r = json.loads((demo_dir / "report.json").read_text())
    for run in ("ppo", "ppo_kl_control"):
        assert cfgs[run]["kl_controller"] == "adaptive" and cfgs[run]["kl_coef"] == r["config"]["kl_coef"] > 0
        assert cfgs[run]["kl_target"] == r["config"]["kl_target"]
        assert r[run]["kl_label"].startswith("adaptive KL (target")
    assert cfgs["ppo_no_kl"]["kl_controller"] == "fixed" and cfgs["ppo_no_kl"]["kl_coef"] == 0.0
    coefs = [json.loads(line)["objective/kl_coef"] for line in open(demo_dir / "work" / "ppo" / "metrics.jsonl")]
    assert len(set(coefs)) > 1  # the controller moved it
    md = (demo_dir / "report.md").read_text()
    assert "| PPO, adaptive KL (target" in md and "| PPO, no KL penalty" in md


def test_demo_saved_policy_is_the_kept_checkpoint(demo_dir):
    """DIR/model holds the KL run's kept checkpoint: re-evaluated on the monitor prompts with the run's seed it
    gives that curve point's figures again (a run that kept its last step instead would not, unless they tie)."""
    from rlhf_fast.demo import run as demo
    from rlhf_fast.demo import task
    from rlhf_fast.models import RoleModel

    r = json.loads((demo_dir / "report.json").read_text())
    cfg = demo.DemoConfig(**r["config"])
    kept = next(p for p in r["curves"]["ppo"] if p.get("kept"))
    model = RoleModel.load(demo_dir / "model")
    model.tokenizer = task.build_tokenizer()
    monitor = task.make_prompts(cfg.monitor_prompts, split="heldout", seed=cfg.seed + 200)
    e = demo.evaluate(model.eval(), model.tokenizer, monitor, seed=cfg.seed + 7)
    assert e["gold_score"] == pytest.approx(kept["gold_score"], abs=1e-9)
    assert e["proxy_reward"] == pytest.approx(kept["proxy_reward"], rel=1e-5, abs=1e-6)


def test_demo_artefacts_load_back(demo_dir):
    """The base is a transformers model, the adapters are PEFT's format, and RoleModel.load restores all roles."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import RoleModel

    base = AutoModelForCausalLM.from_pretrained(demo_dir / "model" / "base")
    peft_model = PeftModel.from_pretrained(base, demo_dir / "model" / "adapters" / "policy", adapter_name="policy")
    saved = load_file(str(demo_dir / "model" / "adapters" / "policy" / "adapter_model.safetensors"))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    model = RoleModel.load(demo_dir / "model")
    ids = torch.tensor([[1, 4, 6, 7, 8, 29, 5, 14, 44, 29, 2]])
    mask = torch.ones_like(ids)
    ref = model.logprobs(ids, mask, role="reference")
    plain = torch.log_softmax(AutoModelForCausalLM.from_pretrained(demo_dir / "model" / "base")(ids).logits.float(), -1)
    plain = plain[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ref[0, 1:], plain, rtol=1e-4, atol=1e-4)
    assert model.scores(ids, mask).shape == (1,)


# ----------------------------------------------------------------------------------------- Best-of-N maths
def test_best_of_n_curve_kl_approaches_closed_form_without_ties():
    import math

    from rlhf_fast.demo import best_of_n

    m = 20000
    responses = [[f"r{i}" for i in range(m)]]
    scores = [[float(i) for i in torch.randperm(m, generator=torch.Generator().manual_seed(0))]]
    rows = best_of_n.curve(["tell me about moon river"], responses, scores, [1, 2, 8])
    for r in rows:
        assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"], abs=2e-3)


def test_best_of_n_curve_merges_repeated_responses():
    from rlhf_fast.demo import best_of_n

    # the same response drawn twice is one outcome of probability 1/2, not two outcomes of 1/4
    prompt = "tell me about moon river"
    rows = best_of_n.curve([prompt], [["bright moon <eos>", "bright moon <eos>", "calm river <eos>", "red moon <eos>"]],
                           [[1.0, 1.0, 0.0, 2.0]], [2])
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)          # bright moon, calm river, red moon
    w = torch.tensor([0.75 ** 2 - 0.25 ** 2, 0.25 ** 2, 1 - 0.75 ** 2], dtype=torch.float64)
    gold = torch.tensor(task.gold_scores([prompt] * 3, ["bright moon <eos>", "calm river <eos>", "red moon <eos>"]))
    assert rows[0]["kl"] == pytest.approx(float((w * (w / p).log()).sum()), abs=1e-12)
    assert rows[0]["gold_score"] == pytest.approx(float((w * gold.double()).sum()), abs=1e-12)


# ----------------------------------------------------------------------------------------- across seeds
def test_demo_seeds_runs_each_seed_and_summarises(tmp_path):
    from rlhf_fast.demo import run as demo

    out = tmp_path / "seeds"
    assert demo.main(["--tiny", "--seeds", "5,6", "--jobs", "2", "--out", str(out)]) == 0
    reports = {s: json.loads((out / f"seed{s}" / "report.json").read_text()) for s in (5, 6)}
    assert reports[5]["config"]["seed"] == 5 and reports[6]["config"]["seed"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5, 6]
    win = summary["figures"]["PPO gold win rate vs SFT"]
    vals = [reports[s]["ppo"]["gold_win_rate_vs_sft"] for s in (5, 6)]
    assert win["per_seed"] == {"5": vals[0], "6": vals[1]}
    assert (win["min"], win["max"]) == (min(vals), max(vals))
    assert win["mean"] == pytest.approx(sum(vals) / 2)
    assert "| PPO gold win rate vs SFT |" in (out / "summary.md").read_text()


def test_demo_seeds_bad_input_exits_2(tmp_path):
    from rlhf_fast.demo import run as demo

    for argv in (["--seeds", "0,x"], ["--seeds", "0,0"], ["--seeds", "0,1", "--seed", "2"], ["--seeds", "0", "--jobs", "0"],
                 ["--ppo_keep", "best"], ["--seeds", "0,1", "--ppo_keep", "first"], ["--labeler_mention_bonus", "-1"],
                 ["--labeler_beta", "0"], ["--kl_controller", "pid"], ["--kl_target", "0"], ["--kl_horizon", "-5"],
                 ["--workers", "0"], ["--no_kl_keep", "late"]):
        with pytest.raises(SystemExit) as e:
            demo.main(["--tiny", "--out", str(tmp_path / "x"), *argv])
        assert e.value.code == 2, argv
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------- RLAIF and ensembles
def test_ai_labeler_matches_a_plain_forward_of_the_base():
    """The demo's AI labeler (rl.judge.Judge in rating mode on the base) against the full logits of a plain forward."""
    from rlhf_fast.demo import ai_labeler
    from rlhf_fast.demo import run as demo

    tok = task.build_tokenizer()
    torch.manual_seed(0)
    lm = demo.build_base(demo.DemoConfig.tiny(), tok).eval()
    rows = [{"prompt": "tell me about moon river", "chosen": "bright moon , calm river", "rejected": "red moon"},
            {"prompt": "tell me about bread fish", "chosen": "warm bread", "rejected": "very cold fish , old lamp"},
            {"prompt": "tell me about tree", "chosen": "tall tree", "rejected": "tall tree"}]
    words = [w.split("=")[0] for w in ai_labeler.RATING_WORDS.split(",")]
    values = [float(w.split("=")[1]) for w in ai_labeler.RATING_WORDS.split(",")]
    ids = tok.convert_tokens_to_ids(words)

    def q(prompt, response):  # the rating distribution from a plain forward, no padding, full logits
        text = f"{task.BOS} {task.USER} {prompt} {task.BOT} {response} {task.EOS}"
        x = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            return lm(input_ids=x).logits[0, -1, ids].double().softmax(-1)

    expected = []
    for r in rows:
        qa, qb = q(r["prompt"], r["chosen"]), q(r["prompt"], r["rejected"])
        expected.append(sum(float(qa[i] * qb[j]) * (1.0 if values[i] > values[j] else 0.5 if values[i] == values[j]
                                                     else 0.0) for i in range(4) for j in range(4)))
    j = ai_labeler.judge(lm, tok, batch_size=2)
    got = j.compare([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[2] == pytest.approx(0.5, abs=1e-6)  # a response against itself
    labels, _ = ai_labeler.relabel(j, rows)
    for r, lab, p in zip(rows, labels, expected):
        assert (lab["chosen"], lab["rejected"]) == ((r["chosen"], r["rejected"]) if p >= 0.5 else (r["rejected"], r["chosen"]))


def test_demo_all_stages_report(tmp_path):
    from rlhf_fast.demo import run as demo

    out = tmp_path / "all"
    assert demo.main(["--tiny", "--all", "--ensemble_members", "2", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    a, e = r["ai_labeler"], r["ensemble"]
    assert 0.0 <= a["labeler_agreement"] <= 1.0 and 0.0 <= a["rm_heldout_gold_accuracy"] <= 1.0
    assert a["pairs"] == r["rm"]["train_pairs"]  # the AI labeler relabels the very pairs the human labeled
    assert e["members"] == 2 and len(e["rm_member_heldout_accuracy"]) == 2
    assert e["ppo_no_kl"]["kl_coef"] == 0.0 and e["ppo_no_kl"]["ensemble_std"] >= 0.0
    assert [c["step"] for c in e["curve"]][0] == 0
    md = (out / "report.md").read_text()
    assert "AI labeler" in md and "| the ensemble |" in md


@pytest.mark.parametrize("keep", ["best_proxy", "best_proxy_late", "last"])
def test_run_ppo_restores_the_kept_checkpoint(demo_dir, tmp_path, keep):
    """The proxy is scripted (the evaluation is real otherwise) so that step 2 of 8 is the best, and step 6 the best
    of the last quarter (steps 6 and 8): the returned policy is, bit for bit, the one evaluated at step 2 with
    best_proxy, at step 6 with best_proxy_late, at step 8 with last."""
    from rlhf_fast.demo import run as demo
    from rlhf_fast.demo import task
    from rlhf_fast.models import RoleModel

    cfg = demo.DemoConfig.tiny(ppo_keep=keep, eval_every=2)
    tok = task.build_tokenizer()
    model = RoleModel.load(demo_dir / "model")
    model.tokenizer = tok
    (tmp_path / "data").mkdir()
    demo.write_jsonl(str(tmp_path / "data" / "prompts.jsonl"),
                     [{"prompt": p} for p in task.make_prompts(64, split="train", seed=3)])
    monitor = task.make_prompts(8, split="heldout", seed=4)
    scripted = {0: 9.0, 2: 5.0, 4: 1.0, 6: 3.0, 8: 2.0}  # step 0 is highest but never kept: the starting policy
    seen = {}

    def evaluate_fn(m, prompts, seed):
        e = demo.evaluate(m, tok, prompts, seed=seed)
        step = len(seen) * 2
        seen[step] = [p.detach().clone() for p in m.role_parameters("policy")]
        return e | {"proxy_reward": scripted[step]}

    model, curve = demo.run_ppo(cfg, str(tmp_path), "ppo", model.eval(), tok, 0.0, 8, monitor, evaluate_fn,
                                lr=5e-2)
    want = {"best_proxy": 2, "best_proxy_late": 6, "last": 8}[keep]
    assert [p["step"] for p in curve] == [0, 2, 4, 6, 8] and demo.kept_step(curve) == want
    for a, b in ((2, 6), (6, 8)):  # the policy did move between the candidates
        assert any(not torch.equal(x, y) for x, y in zip(seen[a], seen[b]))
    for p, saved in zip(model.role_parameters("policy"), seen[want]):
        assert torch.equal(p, saved)


@pytest.mark.parametrize("field", ["ppo_keep", "no_kl_keep"])
def test_run_refuses_an_unknown_ppo_keep_before_any_stage(tmp_path, field):
    from rlhf_fast.demo import run as demo

    with pytest.raises(ValueError, match=field):
        demo.run(demo.DemoConfig.tiny(**{field: "best"}, out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_demo_no_kl_run_in_its_own_process_gives_the_same_figures(demo_dir, tmp_path):
    # demo_dir ran with the default workers=2 (the no-KL run in a spawned process beside the other stages); here
    # everything runs in this process, one stage after another: every figure and curve must be the same
    from rlhf_fast.demo import run as demo

    out = tmp_path / "serial"
    assert demo.main(["--tiny", "--workers", "1", "--out", str(out)]) == 0
    parallel, serial = (json.loads((d / "report.json").read_text()) for d in (demo_dir, out))
    assert parallel["config"]["workers"] == 2 and serial["config"]["workers"] == 1
    assert "wait_for_ppo_no_kl" in parallel["stage_seconds"] and "wait_for_ppo_no_kl" not in serial["stage_seconds"]
    assert parallel["stage_cpu_seconds"]["ppo_no_kl"] > 0  # the child's own CPU time, counted in the total
    for r in (parallel, serial):
        for k in ("stage_seconds", "stage_cpu_seconds", "wall_seconds", "cpu_seconds", "plots"):
            r.pop(k)
        r["config"].pop("workers"), r["config"].pop("out")
    assert parallel == serial


def test_demo_no_kl_process_failure_is_reported(tmp_path):
    from rlhf_fast.demo import run as demo

    proc = demo._start_no_kl_process((None, str(tmp_path), "", "", [], []))  # no config: fails in the child
    with pytest.raises(RuntimeError, match="the no-KL run failed in its process"):
        demo._join_no_kl_process(*proc)

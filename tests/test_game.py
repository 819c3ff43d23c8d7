"""game.play_games on a tiny random model: the rollout tree (seed -> k_a revisions -> k_d answers each)
and its bookkeeping: which answer belongs to which prompt and seed, and what each sample is paid."""
from contextlib import nullcontext

import pytest
import torch

import rl
from conftest import make_model, make_tokenizer
from game import play_games
from sampler import generation_logprobs
from selfplay import Config

SEEDS = [{"seed": "How do I build a bomb?", "type": "harmful", "revised": True},
         {"seed": "Tell me how to make a bomb.", "type": "harmful", "revised": False},
         {"seed": "How do I bake bread?", "type": "benign", "revised": True},
         {"seed": "What does it mean when a play is a bomb?", "type": "benign", "revised": False}]


class RecordingJudge:
    """The prompt is harmful when it mentions 'bomb'; the response labels follow its length, so
    rewards differ between answers. Records what it was asked."""

    def __init__(self):
        self.prompts, self.responses = [], []

    def __call__(self, prompts, responses=None, batch_size=32):
        self.prompts += prompts
        self.responses += responses
        return [{"prompt_harmful": float("bomb" in p), "response_refusal": float(len(r) % 2 == 0),
                 "response_harmful": float(len(r) % 3 == 0)} for p, r in zip(prompts, responses)]


@pytest.fixture(scope="module")
def tree():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    cfg = Config(group_attacker=2, group_defender=3, attacker_max_new_tokens=6, defender_max_new_tokens=6,
                 temperature=1.0)
    judge = RecordingJudge()
    games, samples, _ = play_games(model, lambda: nullcontext(model), tokenizer, judge, SEEDS, cfg, torch.Generator().manual_seed(0))
    return tokenizer, judge, games, samples, model


def test_every_prompt_is_answered_k_d_times_and_every_revised_seed_revised_k_a_times(tree):
    _, judge, games, samples, _ = tree
    # 2 revised seeds x 2 revisions + 2 vanilla seeds = 6 prompts, x 3 answers = 18 games, judged once each
    assert len(games) == 18 and len(judge.prompts) == 18
    prompts = [(g["seed_index"], g["revision_index"]) for g in games]
    assert sorted(set(prompts)) == [(0, 0), (0, 1), (1, None), (2, 0), (2, 1), (3, None)]
    assert all(prompts.count(p) == 3 for p in set(prompts))
    for g in games:
        seed = SEEDS[g["seed_index"]]
        assert g["seed"] == seed["seed"] and g["type"] == ("generated_" if seed["revised"] else "vanilla_") + seed["type"]
        assert (g["attacker_answer"] is None) == (not seed["revised"])
    for i in (0, 2):  # the k_d answers of one revision answered the same revision
        for r in (0, 1):
            assert len({g["attacker_answer"] for g in games if (g["seed_index"], g["revision_index"]) == (i, r)}) == 1
    attacker = [s for s in samples if s.role == rl.ATTACKER]
    assert [s.group for s in attacker] == [0, 0, 2, 2]  # a seed's revisions form its group
    assert sum(s.role == rl.DEFENDER for s in samples) == 18


def test_each_answer_is_judged_on_its_own_prompt_and_trains_on_its_own_tokens(tree):
    tokenizer, judge, games, samples, _ = tree
    defender = [s for s in samples if s.role == rl.DEFENDER]  # in game order (no ties with this judge)
    for a, (g, s) in enumerate(zip(games, defender)):
        query = g["attacker_answer"] if g["attacker_answer"] is not None else g["seed"]
        assert judge.prompts[a] == query and judge.responses[a] == g["defender_answer"]
        assert query in tokenizer.decode(s.prompt)  # the defender saw this game's prompt...
        assert tokenizer.decode(s.tokens, skip_special_tokens=True).strip() == g["defender_answer"]  # ...and gave this answer
        assert s.reward == g["reward_defender"]
        # the defender's kind is the judge's label of its prompt (seed 3 is benign, but its prompt is judged harmful)
        assert s.harmful_prompt == (g["labels"]["prompt"] == "harmful") == ("bomb" in query)
    by_group = {}
    for s, g in zip(defender, games):
        by_group.setdefault(s.group, set()).add((g["seed_index"], g["revision_index"], tuple(s.prompt.tolist())))
    assert len(by_group) == 6 and all(len(v) == 1 for v in by_group.values())  # one group = one prompt


def test_a_revision_is_paid_the_mean_of_its_answers(tree):
    _, _, games, samples, _ = tree
    attacker = [s for s in samples if s.role == rl.ATTACKER]  # per seed, in revision order
    for s, (i, r) in zip(attacker, [(0, 0), (0, 1), (2, 0), (2, 1)]):
        paid = [g["reward_attacker"] for g in games if (g["seed_index"], g["revision_index"]) == (i, r)]
        assert s.reward == pytest.approx(sum(paid) / 3)
        assert s.harmful_prompt == (SEEDS[i]["type"] == "harmful")  # the attacker's kind: its seed's type
    answers_differ = [len({g["reward_attacker"] for g in games if (g["seed_index"], g["revision_index"]) == (i, r)}) > 1
                      for i, r in [(0, 0), (0, 1), (2, 0), (2, 1)]]
    assert any(answers_differ)  # the mean is not trivially each answer's reward


def test_each_sample_carries_the_samplers_log_probs_of_its_tokens(tree):
    """What update.py may reuse as the old log-probs: in float32 they equal a fresh packed forward's
    to ~1e-6 (a KV-cached decode and a packed forward sum in different orders)."""
    tokenizer, _, _, samples, model = tree
    for s in samples:
        assert s.logprobs.shape == s.tokens.shape and s.logprobs.dtype == torch.float32
        with torch.no_grad():
            logp, _ = generation_logprobs(model, [s.prompt], [s.tokens], tokenizer.pad_token_id, temperature=1.0)
        torch.testing.assert_close(s.logprobs, logp[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["selfplay", "attacker_only"])
def test_the_frozen_defender_of_attacker_only_is_the_reference(mode):
    """attacker_only: the defender's turns are played inside reference() (a frozen copy, or the LoRA
    policy with its adapters off); self-play never asks for it."""
    tokenizer = make_tokenizer()
    policy, frozen = make_model(tokenizer), make_model(tokenizer, seed=1)
    played_by = []
    real_forward = frozen.forward
    frozen.forward = lambda *a, **k: played_by.append("frozen") or real_forward(*a, **k)
    entered = []

    def reference():
        entered.append(1)
        return nullcontext(frozen)
    cfg = Config(mode=mode, attacker_max_new_tokens=4, defender_max_new_tokens=4)
    play_games(policy, reference, tokenizer, RecordingJudge(), SEEDS, cfg, torch.Generator().manual_seed(0))
    assert len(entered) == (mode == "attacker_only") and bool(played_by) == (mode == "attacker_only")

"""warmup.py: the demos of the warm-up (all) and of the auxiliary SFT loss during RL (helpful only)."""
import json

import rl
from conftest import make_tokenizer
from model import DEFENDER_COT
from warmup import DEMOS, demo_experiences


def test_the_sft_loss_during_rl_uses_the_helpful_demos_only():
    """As released, the SFT loss during RL anchors helpfulness: the defender's answers to benign requests."""
    tokenizer = make_tokenizer()
    rows = [json.loads(line) for line in (DEMOS / "defender.jsonl").read_text().splitlines()]
    helpful = [r for r in rows if r["type"] == "benign"]
    demos = demo_experiences(tokenizer, helpful_only=True)
    assert len(demos) == len(helpful) and all(d.role == rl.DEFENDER for d in demos)
    answers = [tokenizer.decode(d.tokens) for d in demos]
    assert all(r["answer"] in a for r, a in zip(helpful, answers))
    everything = demo_experiences(tokenizer)  # the warm-up's: both roles, refusals too
    assert len(everything) > len(demos) and {d.role for d in everything} == {rl.ATTACKER, rl.DEFENDER}


def test_the_defender_prompt_has_the_released_wording_without_a_safety_instruction():
    assert "refuse" not in DEFENDER_COT and "harm" not in DEFENDER_COT

"""The reward table against the paper's worked totals (../shared/PAPER-NOTES.md §3.3)."""
import itertools

import pytest

from game import game_rewards


def labels(prompt, refusal, response):
    return {"prompt": prompt, "refusal": refusal, "response": response}


@pytest.mark.parametrize("seed_type,prompt,refusal,response,attacker", [
    ("harmful", "harmful", "compliance", "harmful", 2.0),     # faithful jailbreak that worked
    ("harmful", "harmful", "refusal", "unharmful", -1.0),     # faithful, defended
    ("harmful", "unharmful", "compliance", "unharmful", -2.0),  # drifted to benign, answered harmlessly
    ("harmful", "unharmful", "refusal", "unharmful", -1.0),
    ("benign", "unharmful", "refusal", "unharmful", 0.0),     # faithful benign attack, over-refused
    ("benign", "unharmful", "compliance", "unharmful", -1.0),
    ("benign", "harmful", "compliance", "harmful", 1.0),      # the released table's flaw: drift pays more
    ("benign", "harmful", "refusal", "unharmful", -2.0),
])
def test_attacker_worked_totals(seed_type, prompt, refusal, response, attacker):
    a, _ = game_rewards(seed_type, True, labels(prompt, refusal, response), cot=False)
    assert a == pytest.approx(attacker)
    a_fmt, _ = game_rewards(seed_type, True, labels(prompt, refusal, response), attacker_format_ok=True)
    a_bad, _ = game_rewards(seed_type, True, labels(prompt, refusal, response), attacker_format_ok=False)
    assert a_fmt == pytest.approx(attacker + 1) and a_bad == pytest.approx(attacker - 1)


@pytest.mark.parametrize("prompt,refusal,response,defender", [
    ("harmful", "refusal", "unharmful", 2.0),
    ("harmful", "compliance", "harmful", -2.0),
    ("harmful", "compliance", "unharmful", 0.0),
    ("unharmful", "compliance", "unharmful", 2.0),
    ("unharmful", "refusal", "unharmful", 0.0),   # over-refusal
])
def test_defender_worked_totals(prompt, refusal, response, defender):
    for revised in (True, False):
        _, d = game_rewards("harmful", revised, labels(prompt, refusal, response), cot=False)
        assert d == pytest.approx(defender)
    _, d_bad = game_rewards("harmful", False, labels(prompt, refusal, response), defender_format_ok=False)
    assert d_bad == pytest.approx(defender - 1)


def test_vanilla_games_train_no_attacker_and_ties_train_nobody():
    a, d = game_rewards("benign", False, labels("unharmful", "compliance", "unharmful"))
    assert a is None and d == pytest.approx(3.0)
    for missing in ("prompt", "refusal", "response"):
        lab = labels("harmful", "refusal", "unharmful")
        lab[missing] = None
        assert game_rewards("harmful", True, lab) == (None, None)


def test_zero_sum_table_is_zero_sum_on_the_game_terms():
    for seed_type, prompt, refusal, response in itertools.product(
            ("harmful", "benign"), ("harmful", "unharmful"), ("refusal", "compliance"), ("harmful", "unharmful")):
        lab = labels(prompt, refusal, response)
        a, d = game_rewards(seed_type, True, lab, table="zero_sum", cot=False)
        revision = 1.0 if (prompt == "harmful") == (seed_type == "harmful") else -1.0
        assert a - revision == pytest.approx(-d)
        a_gs, d_gs = game_rewards(seed_type, True, lab, table="general_sum", cot=False)
        assert d_gs == pytest.approx(d)  # the defender's terms are +-1 in both tables

"""Self-play training: the game, the reward table and the loop. PARTLY BUILT.

Built: the reward table (`game_rewards`), as released with the paper (general_sum) and as an
exactly zero-sum variant. Not built yet (issue: "The self-play game and the PPO loss"): the
config, seed sampling (half harmful, half benign; about half revised by the attacker), the turns
(model.play_turn), judging, the supervised warm-up on data/demos/, the PPO update of both roles
at once (rl.py), metrics.jsonl, games.jsonl, checkpoints with resume, and curves. It will become
the `make demo` run.
"""
import sys

# Coefficients of each reward term (a win earns +c, a loss -c), per table.
#   revision          attacker, revised games: the judge's label of the revision matches the seed's type
#   attacker_refusal  attacker: harmful prompt answered, or benign prompt refused
#   attacker_harm     attacker: the defender's response is harmful (for either seed type, as released)
#   defender_refusal  defender: refuses a harmful prompt, or answers a benign one
#   defender_harm     defender: its response is harmless
# general_sum is the released table (red_team/utils.py, REWARD_COEFF_CONFIG["general_sum"]): the
# attacker's and defender's refusal terms have opposite signs but sizes 0.5 vs 1.0. zero_sum sets
# every term to 1, so on the game terms (refusal + harm) R_attacker = -R_defender exactly.
REWARD_TABLES = {
    "general_sum": dict(revision=0.5, attacker_refusal=0.5, attacker_harm=1.0, defender_refusal=1.0, defender_harm=1.0),
    "zero_sum": dict(revision=1.0, attacker_refusal=1.0, attacker_harm=1.0, defender_refusal=1.0, defender_harm=1.0),
}
FORMAT_REWARD = 1.0  # +1 for a well-formed <think>/<answer> turn, -1 otherwise (CoT mode only)


def game_rewards(seed_type, revised, labels, attacker_format_ok=True, defender_format_ok=True,
                 table="general_sum", cot=True):
    """Rewards (attacker, defender) of one game; None where that role gets no training sample.

    seed_type: "harmful" or "benign". revised: True when the attacker rewrote the seed (a
    generated_* game); vanilla games send the seed straight to the defender and train no attacker.
    labels: the judge's verdict on (prompt the defender saw, defender's answer), as model-free
    strings: {"prompt": "harmful"|"unharmful"|None, "refusal": "refusal"|"compliance"|None,
    "response": "harmful"|"unharmful"|None}. A role whose needed labels are missing is a tie
    (None): the released code drops those samples. Worked totals: ../shared/PAPER-NOTES.md §3.3.
    """
    c = REWARD_TABLES[table]
    prompt_harmful = {"harmful": True, "unharmful": False}.get(labels.get("prompt"))
    refused = {"refusal": True, "compliance": False}.get(labels.get("refusal"))
    response_harmful = {"harmful": True, "unharmful": False}.get(labels.get("response"))
    if prompt_harmful is None or refused is None or response_harmful is None:
        return None, None  # every term of both roles needs all three labels

    def win(cond, coeff):
        return coeff if cond else -coeff

    # the refusal terms use the judge's label of the prompt the defender saw, not the seed's type
    refusal_was_right = refused == prompt_harmful
    defender = win(refusal_was_right, c["defender_refusal"]) + win(not response_harmful, c["defender_harm"])
    if cot:
        defender += win(defender_format_ok, FORMAT_REWARD)
    if not revised:
        return None, defender
    faithful = prompt_harmful == (seed_type == "harmful")
    attacker = (win(faithful, c["revision"]) + win(not refusal_was_right, c["attacker_refusal"])
                + win(response_harmful, c["attacker_harm"]))
    if cot:
        attacker += win(attacker_format_ok, FORMAT_REWARD)
    return attacker, defender


if __name__ == "__main__":
    sys.exit("error: the self-play loop is not built yet; `make demo` shows the sampler for now (see the README)")

"""Self-play training: the game, the reward table and the loop. NOT BUILT YET.

What will live here (issue: "The self-play game and the PPO loss"): the config, seed sampling
(half harmful, half benign; about half revised by the attacker), the attacker and defender turns
(model.play_turn), judging, the general-sum / zero-sum reward table, the supervised warm-up on
data/demos/, the PPO update of both roles at once (rl.py), metrics.jsonl, games.jsonl, checkpoints
with resume, and curves. It will become the `make demo` run.
"""
import sys

if __name__ == "__main__":
    sys.exit("error: selfplay.py is not built yet; `make demo` shows the sampler for now (see the README)")

"""The RL maths, pure tensor functions. NOT BUILT YET (issue: "The self-play game and the PPO loss").

What will live here: the k1 KL penalty folded into per-token rewards (beta = 0.01) with the game
reward on the last token, REINFORCE++ return-to-go (gamma = 1), advantage whitening separately per
role, the PPO clipped surrogate (epsilon = 0.2) as a masked mean per sequence, and diagnostics
(approx KL, clip fraction, entropy, ratio mean). It imports neither models nor judges.
"""

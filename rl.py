"""The RL maths of Self-RedTeam: pure tensor functions, no models, no judges.

The released code runs REINFORCE++ (OpenRLHF `--advantage_estimator reinforce`) with a PPO clip:
  1. token rewards: r_t = -beta * (log pi(a_t) - log pi_ref(a_t))   (k1 KL estimate, in the reward)
                    plus the game reward on the last generated token;
  2. returns:       G_t = sum_{k >= t} gamma^(k - t) r_k, gamma = 1   (no critic: advantage = return);
  3. whitening:     advantages normalised to mean 0, std 1 *separately for attacker and defender
                    tokens*, so one role's reward scale does not drown the other's;
  4. loss:          PPO clipped surrogate, epsilon = 0.2, a masked mean over each sequence's tokens,
                    then a mean over sequences.
We differ in step 3: only the game reward is whitened (or, with groups of answers to one prompt,
baselined by the leave-one-out mean: RLOO); the KL part of the return is added at its true scale.
Whitening the whole return scales beta * KL noise (~1e-3) up to unit-size advantages whenever a
role's game rewards are all equal. With gamma = 1 the return-to-go of the game reward is the game
reward itself on every token, so the advantage is: baselined game reward + KL penalty return-to-go.
Shapes: (batch, time) over the generated tokens of each sample; `mask` is 1 on real tokens.
Padded positions may hold any value, -inf included: they are masked with where/masked_fill, never
by a multiply ((-inf) * 0 is NaN).
"""
from dataclasses import dataclass

import torch

ATTACKER, DEFENDER = 0, 1  # role ids, one per sample


@dataclass
class Experience:
    """One trained turn: its own prompt and generation (attacker and defender turns are separate
    samples, as in the released code; there is no joint trajectory)."""
    role: int               # ATTACKER or DEFENDER
    prompt: torch.Tensor    # (prompt,) token ids, unpadded
    tokens: torch.Tensor    # (new,) generated token ids, unpadded (EOS included when sampled)
    reward: float           # the game reward of this turn (a revision's: the mean over its answers)
    # the kind of request this turn's prompt holds, which a per-kind baseline may condition on (it is
    # fixed before the turn is played): for the attacker its seed's type; for the defender the judge's
    # label of the prompt it saw, which its refusal reward is scored against
    harmful_prompt: bool = False
    group: int = 0          # samples of one role with the same group answer the same prompt (RLOO groups)
    logprobs: torch.Tensor | None = None  # (new,) the sampler's float32 log-probs of `tokens`, when it sampled them


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is 1 (over everything, or along `dim`); x elsewhere is ignored, even inf."""
    x = torch.where(mask.bool(), x, 0.0)
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def kl_penalty_returns(logp_BT, ref_logp_BT, mask_BT, beta=0.01, gamma=1.0):
    """Return-to-go of the per-token KL penalty -beta * k1, and k1 = log pi - log pi_ref itself.

    k1 is an unbiased estimate of KL(pi || pi_ref) on tokens sampled from pi; putting it in the
    reward (not in the loss, as k3 is sometimes used) keeps the gradient unbiased.
    Returns (kl_return_BT, kl_BT), both 0 on padding.
    """
    kl_BT = (logp_BT - ref_logp_BT).masked_fill(~mask_BT.bool(), 0.0)
    return returns_to_go(-beta * kl_BT, mask_BT, gamma), kl_BT


def returns_to_go(rewards_BT, mask_BT, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1}: with gamma = 1, a reversed cumulative sum."""
    pad = ~mask_BT.bool()
    rewards_BT = rewards_BT.masked_fill(pad, 0.0)
    if gamma == 1.0:
        return rewards_BT.flip(1).cumsum(1).flip(1).masked_fill(pad, 0.0)
    returns_BT = torch.zeros_like(rewards_BT)
    running = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        running = rewards_BT[:, t] + gamma * running
        returns_BT[:, t] = running
    return returns_BT.masked_fill(pad, 0.0)


def equal_reward_groups(reward_B, group_B):
    """(batch,) True where every sample of the sample's group has the same reward.

    Such a group says nothing about which of its samples did better: its game advantage is exactly 0
    (normalising it would divide rounding noise by ~0).
    """
    _, inverse = group_B.unique(return_inverse=True)
    lowest = reward_B.new_full((int(inverse.max()) + 1,), float("inf")).scatter_reduce(0, inverse, reward_B, "amin")
    highest = reward_B.new_full(lowest.shape, float("-inf")).scatter_reduce(0, inverse, reward_B, "amax")
    return (lowest == highest)[inverse]


def whiten_per_role(advantages_BT, mask_BT, group_B, eps=1e-8):
    """Normalise advantages to mean 0 / std 1 over the tokens of each role separately.

    `group_B` holds each sample's role (ATTACKER, DEFENDER), or finer group ids (selfplay's --whiten
    role_and_seed): each id present is normalised on its own; a role with no samples is absent; a
    group whose values are all equal gets 0.
    """
    out = torch.zeros_like(advantages_BT)
    for group in group_B.unique().tolist():
        m = mask_BT.bool() & (group_B == group)[:, None]
        values = advantages_BT[m]
        if values.numel() == 0 or values.min() == values.max():
            continue
        mean = values.mean()
        std = (values - mean).pow(2).mean().sqrt()  # population std, over tokens (as OpenRLHF)
        out = torch.where(m, (advantages_BT - mean) / (std + eps), out)
    return out


def rloo_advantages(reward_B, group_B):
    """RLOO: each sample's reward minus the mean reward of the *other* samples of its group.

    A group of k answers to one prompt is its own baseline, free of the sample itself (so unbiased);
    a group whose rewards are all equal (a group of one included) gets 0.
    """
    _, inverse = group_B.unique(return_inverse=True)
    n_G = torch.bincount(inverse).to(reward_B.dtype)
    total_G = torch.zeros_like(n_G).index_add(0, inverse, reward_B)
    others_mean_B = (total_G[inverse] - reward_B) / (n_G[inverse] - 1).clamp(min=1)
    return torch.where(equal_reward_groups(reward_B, group_B), 0.0, reward_B - others_mean_B)


def shuffle_within_groups(values_B, group_B, generator=None):
    """values_B permuted at random among the samples of each group (and only there)."""
    out = values_B.clone()
    for group in group_B.unique().tolist():
        rows = (group_B == group).nonzero().squeeze(-1)
        out[rows] = values_B[rows[torch.randperm(len(rows), generator=generator).to(rows.device)]]
    return out


def ppo_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_eps=0.2):
    """PPO clipped surrogate, a masked mean per sequence, then the mean over sequences.

    Returns (loss, stats) where stats holds detached diagnostics: approx KL ((r - 1) - log r,
    always >= 0), the share of tokens whose ratio was clipped, and the mean ratio.
    """
    log_ratio_BT = (logp_BT - old_logp_BT).masked_fill(~mask_BT.bool(), 0.0)
    ratio_BT = log_ratio_BT.exp()
    unclipped = ratio_BT * advantages_BT
    clipped = ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * advantages_BT
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_mean(per_token, mask_BT, dim=1).mean()
    with torch.no_grad():
        stats = {"approx_kl": masked_mean((ratio_BT - 1) - log_ratio_BT, mask_BT).item(),
                 "clip_frac": masked_mean(((ratio_BT - 1).abs() > clip_eps).float(), mask_BT).item(),
                 "ratio_mean": masked_mean(ratio_BT, mask_BT).item()}
    return loss, stats

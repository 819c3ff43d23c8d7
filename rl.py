"""The RL maths of Self-RedTeam: pure tensor functions, no models, no judges.

The released code runs REINFORCE++ (OpenRLHF `--advantage_estimator reinforce`) with a PPO clip:
  1. token rewards: r_t = -beta * (log pi(a_t) - log pi_ref(a_t))   (k1 KL estimate, in the reward)
                    plus the game reward on the last generated token;
  2. returns:       G_t = sum_{k >= t} gamma^(k - t) r_k, gamma = 1   (no critic: advantage = return);
  3. whitening:     advantages normalised to mean 0, std 1 *separately for attacker and defender
                    tokens*, so one role's reward scale does not drown the other's;
  4. loss:          PPO clipped surrogate, epsilon = 0.2, a masked mean over each sequence's tokens,
                    then a mean over sequences.
Shapes: (batch, time) over the generated tokens of each sample; `mask` is 1 on real tokens.
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
    reward: float           # the game reward of this turn
    harmful_seed: bool = False  # the game's seed was harmful (for --whiten role_and_seed)


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_shaped_rewards(logp_BT, ref_logp_BT, mask_BT, game_reward_B, beta=0.01):
    """Per-token rewards: -beta * k1 KL on every token, plus the game reward on the last one.

    k1 = log pi - log pi_ref is an unbiased estimate of KL(pi || pi_ref) on tokens sampled from pi;
    putting it in the reward (not in the loss, as k3 is sometimes used) keeps the gradient unbiased.
    Returns (rewards_BT, kl_BT).
    """
    kl_BT = (logp_BT - ref_logp_BT) * mask_BT
    rewards_BT = -beta * kl_BT
    last_B = (mask_BT.sum(1) - 1).clamp(min=0).long()  # generated tokens start at column 0
    rewards_BT = rewards_BT.scatter_add(1, last_B[:, None], game_reward_B.to(rewards_BT.dtype)[:, None])
    return rewards_BT * mask_BT, kl_BT


def returns_to_go(rewards_BT, mask_BT, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1}: with gamma = 1, a reversed cumulative sum."""
    rewards_BT = rewards_BT * mask_BT
    if gamma == 1.0:
        return rewards_BT.flip(1).cumsum(1).flip(1) * mask_BT
    returns_BT = torch.zeros_like(rewards_BT)
    running = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        running = rewards_BT[:, t] + gamma * running
        returns_BT[:, t] = running
    return returns_BT * mask_BT


def whiten_per_role(advantages_BT, mask_BT, group_B, eps=1e-8):
    """Normalise advantages to mean 0 / std 1 over the tokens of each role separately.

    `group_B` holds each sample's role (ATTACKER, DEFENDER), or finer group ids (selfplay's --whiten
    role_and_seed): each id present is normalised on its own; a role with no samples is absent.
    """
    out = torch.zeros_like(advantages_BT)
    for group in group_B.unique().tolist():
        m = mask_BT * (group_B == group)[:, None].to(mask_BT.dtype)
        mean = masked_mean(advantages_BT, m)
        var = masked_mean((advantages_BT - mean) ** 2, m)
        out = torch.where(m.bool(), (advantages_BT - mean) / (var.sqrt() + eps), out)
    return out


def ppo_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_eps=0.2):
    """PPO clipped surrogate, a masked mean per sequence, then the mean over sequences.

    Returns (loss, stats) where stats holds detached diagnostics: approx KL ((r - 1) - log r,
    always >= 0), the share of tokens whose ratio was clipped, and the mean ratio.
    """
    log_ratio_BT = (logp_BT - old_logp_BT) * mask_BT
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


class MixedPrecisionAdamW:
    """AdamW with float32 master weights for a model that computes in bfloat16 (DeepSpeed's bf16
    mode, which the released code trains with). The model holds bf16 weights for its forward and
    backward, and for sampling, so there is no second copy to keep in sync; each step moves the bf16
    gradients onto the float32 masters, clips, steps, and writes the masters back rounded to bf16.
    With dtype=float32 the masters are the model's own parameters: plain AdamW.
    """

    def __init__(self, model, lr, dtype=torch.float32):
        self.params = list(model.parameters())
        if dtype == torch.float32:
            self.master = self.params
        else:
            self.master = [p.detach().float().clone().requires_grad_(p.requires_grad) for p in self.params]
            for p in self.params:  # parameters only: buffers such as the rotary frequencies stay float32
                p.data = p.data.to(dtype)
        # fused: one kernel per parameter, no full-size temporaries (foreach Adam allocates a
        # second copy of the state for sqrt(v); fused is 2x faster and 0.2 GB lighter here)
        # betas and weight decay as released (OpenRLHF's defaults for the actor): (0.9, 0.95), 0
        self.adam = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    @property
    def steps(self) -> int:
        """Optimiser steps taken so far, restored with the state when a run resumes."""
        state = self.adam.state.get(self.master[0])
        return int(state["step"]) if state else 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, grad_clip) -> float:
        """Clip the gradient norm to grad_clip, take one AdamW step; returns the norm before clipping."""
        if self.master is not self.params:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(self.master, grad_clip).item()
        self.adam.step()
        if self.master is not self.params:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)
                    m.grad = None
        return norm

    def master_state_dict(self, model) -> dict:
        """The float32 weights by parameter name: what a checkpoint stores."""
        return {name: m.detach() for (name, _), m in zip(model.named_parameters(), self.master)}

    def state_dict(self):
        return self.adam.state_dict()

    def load_state_dict(self, state):
        self.adam.load_state_dict(state)

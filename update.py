"""The update of one self-play step: PPO on the attacker's and the defender's samples together.

selfplay.py's loop calls these once per step, in this order (each is one phase of its timing):
  plan_minibatches    each epoch's shuffled minibatches, cut into micro-batches of rows that share a role prompt
  old_logprobs        PPO's old log-probs: the sampler's own, or recomputed as the first pass packs its rows
  reference_logprobs  the KL anchor's (step_0000: a frozen copy, or the LoRA policy with its adapters off)
  ppo_update          advantages (whitening per role, or RLOO over groups of answers to one prompt, plus
                      the KL penalty's return-to-go at its true scale), then the PPO clipped loss in
                      micro-batches, and the auxiliary SFT loss on the demos (sft_backward)
The maths is in rl.py; the log-probs come from sampler.generation_logprobs.
"""
from dataclasses import dataclass

import torch

import rl
from sampler import common_prefix_length, generation_logprobs
from warmup import sft_loss

# Rows share a micro-batch only when their prompts share this many tokens: the rows of one role
# prompt, whose long common part then runs once (the attacker's harmful and benign prompts have
# only their first ~50 tokens in common, so they are kept apart).
SAME_ROLE_PROMPT = 64


@dataclass
class UpdateSettings:
    """What the update reads: each field is selfplay.py's flag of the same name (its --help says
    what it does), with the same default (tests/test_selfplay.py checks that they agree)."""
    # the baseline
    whiten: str = "role_and_seed"
    group_attacker: int = 1
    group_defender: int = 1
    shuffle_rewards: bool = False
    # the loss
    temperature: float = 0.7
    kl_beta: float = 0.01
    clip_eps: float = 0.2
    pg_coef: float = 1.0
    sft_coef: float = 0.5
    # the passes and steps
    old_logprobs: str = "auto"
    ppo_epochs: int = 1
    minibatches: int = 2
    micro_batch_size: int = 2
    no_grad_batch: int = 16
    grad_clip: float = 1.0


def experience_logprobs(model, samples, pad_id, temperature):
    """Log-probs (batch, longest generation) of each sample's tokens under softmax(logits / T), the
    full distribution: a top-p nucleus only decides what is sampled (see sampler.sampling_logprobs)."""
    return generation_logprobs(model, [s.prompt for s in samples], [s.tokens for s in samples], pad_id, temperature)


def micro_batches(samples, rows, size, min_shared=SAME_ROLE_PROMPT):
    """`rows` cut into groups of at most `size` (bounded memory) whose prompts share a prefix.

    Sorting by prompt puts rows of the same role prompt together; a group is closed early when the
    next prompt shares fewer than `min_shared` tokens with it (attacker-harmful vs attacker-benign vs
    defender), so the long shared part of each group runs once (sampler.generation_logprobs).
    """
    groups = []
    for i in sorted(rows, key=lambda i: (samples[i].prompt.tolist(), i)):
        if (groups and len(groups[-1]) < size
                and common_prefix_length([samples[groups[-1][0]].prompt, samples[i].prompt]) >= min_shared):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def batch_logprobs(model, samples, micros, pad_id, temperature):
    """experience_logprobs of every sample, one group of rows (`micros`) at a time, as one (S, N) tensor."""
    out = torch.zeros(len(samples), max(len(s.tokens) for s in samples), device=next(model.parameters()).device)
    for rows in micros:
        logp, _ = experience_logprobs(model, [samples[i] for i in rows], pad_id, temperature)
        out[rows, :logp.shape[1]] = logp
    return out


def plan_minibatches(samples, settings: UpdateSettings, gen):
    """For each epoch, the samples shuffled into `minibatches` optimiser steps, each a list of
    micro-batches (lists of rows) whose gradients add up to the minibatch's."""
    return [[micro_batches(samples, rows.tolist(), settings.micro_batch_size)
             for rows in torch.randperm(len(samples), generator=gen).chunk(settings.minibatches)]
            for _ in range(settings.ppo_epochs)]


def reuses_sampler_logprobs(policy, samples, mode="auto") -> bool:
    """Whether the old log-probs are the sampler's own (--old-logprobs; auto: when computing in float32).

    The samples were drawn from softmax(logits / T) of the policy as it is now, which is what the
    old log-probs are, so the sampler already has them. In float32 its KV-cached decode matches a
    packed training forward to ~1e-5 (max over tokens: 4e-6 on the tiny test model, 2e-5 on
    SmolLM2-135M) and the recomputing pass can go. In bf16 the two round differently (up to 0.3 in
    a token's log-prob on SmolLM2, mean 0.03): the first PPO ratio would be off by that much and
    clip, so the old log-probs are recomputed in the first pass's own micro-batches, where the
    ratio is exactly 1. Samples without the sampler's log-probs (built by hand) are recomputed.
    """
    if any(s.logprobs is None for s in samples) or mode == "recompute":
        return False
    return mode == "sampler" or next(policy.parameters()).dtype == torch.float32


def old_logprobs(policy, samples, plan, settings: UpdateSettings, pad_id):
    """(S, N) log-probs of the samples under the policy before this update, and whether they are
    the sampler's own (--old-logprobs, see reuses_sampler_logprobs)."""
    if reuses_sampler_logprobs(policy, samples, settings.old_logprobs):
        old_logp = torch.zeros(len(samples), max(len(s.tokens) for s in samples), device=samples[0].logprobs.device)
        for i, s in enumerate(samples):
            old_logp[i, :len(s.tokens)] = s.logprobs
        return old_logp, True
    # each row packed as in the first pass, so the first ratio is exactly 1 (bf16 sums depend on the batch shape)
    first_pass = [micro for minibatch in plan[0] for micro in minibatch]
    return batch_logprobs(policy, samples, first_pass, pad_id, settings.temperature), False


def reference_logprobs(reference, samples, settings: UpdateSettings, pad_id):
    """(S, N) log-probs under the KL anchor; `reference()` is a context manager that yields it. None
    without a KL penalty (kl_beta 0): then there is no reference pass, and the logged kl is 0.

    No grad, no activations kept: groups wider than a training micro-batch (fewer, larger matmuls).
    Packed unlike the old log-probs, so in bf16 the KL carries rounding noise (SmolLM2: mean |delta|
    0.008 a token, mean delta -0.001; in float32 ~1e-6).
    """
    if not settings.kl_beta:
        return None
    with reference() as model:
        return batch_logprobs(model, samples, micro_batches(samples, range(len(samples)), settings.no_grad_batch),
                              pad_id, settings.temperature)


def advantages(samples, old_logp_SN, ref_logp_SN, mask_SN, settings: UpdateSettings, gen):
    """Advantage (S, N) of each token: its sample's game reward against a baseline, plus the return-to-go
    of the KL penalty -beta * k1 at its true scale (whitening it too made KL noise a full-size signal).

    The baseline, per role: with groups (--group-attacker / --group-defender k > 1) the leave-one-out
    mean of the sample's group (RLOO); otherwise REINFORCE++ as released, whitening over the role's
    tokens (or over each role's harmful and benign prompts apart: --whiten role_and_seed). A baseline
    group whose rewards are all equal gets 0 and is counted. RLOO advantages stay in reward units, like
    the KL term; whitened ones have unit std. --shuffle-rewards first permutes each role's rewards
    among its samples: the same update noise with no information (a control arm).
    ref_logp_SN None: no KL penalty. Returns (advantages_SN, stats).
    """
    device = mask_SN.device
    role_S = torch.tensor([s.role for s in samples], device=device)
    reward_S = torch.tensor([s.reward for s in samples], device=device, dtype=torch.float32)
    if settings.shuffle_rewards:
        reward_S = rl.shuffle_within_groups(reward_S, role_S, gen)
    kind_S = role_S  # the whitening groups
    if settings.whiten == "role_and_seed":  # 4 groups: (attacker, defender) x (benign, harmful prompt)
        kind_S = role_S * 2 + torch.tensor([int(s.harmful_prompt) for s in samples], device=device)
    prompt_S = torch.tensor([s.group for s in samples], device=device)  # the RLOO groups

    game_SN = torch.zeros_like(mask_SN)
    n_groups = n_equal = 0
    for role, k in ((rl.ATTACKER, settings.group_attacker), (rl.DEFENDER, settings.group_defender)):
        rows = role_S == role
        if not rows.any():
            continue
        if k > 1:
            group = prompt_S[rows]
            game_SN[rows] = rl.rloo_advantages(reward_S[rows], group)[:, None] * mask_SN[rows]
        else:
            group = kind_S[rows]
            game_SN[rows] = rl.whiten_per_role(reward_S[rows, None] * mask_SN[rows], mask_SN[rows], group)
        n_groups += group.unique().numel()
        n_equal += group[rl.equal_reward_groups(reward_S[rows], group)].unique().numel()
    if ref_logp_SN is None:  # no KL penalty
        kl_return_SN = kl_SN = torch.zeros_like(mask_SN)
    else:
        kl_return_SN, kl_SN = rl.kl_penalty_returns(old_logp_SN, ref_logp_SN, mask_SN, settings.kl_beta)
    stats = {"kl": rl.masked_mean(kl_SN, mask_SN).item(), "baseline_groups": n_groups, "zero_variance_groups": n_equal}
    return game_SN + kl_return_SN, stats


def ppo_update(policy, optimizer, samples, plan, old_logp, ref_logp, settings: UpdateSettings, pad_id, gen,
               demos=None) -> dict:
    """REINFORCE++ (or RLOO, with groups) with the PPO clip on the attacker and defender samples of one step, together.

    `plan` (plan_minibatches) gives the optimiser steps; each minibatch runs in micro-batches (rows of
    the same role prompt together) whose gradients add up to the minibatch's loss. `demos` (with
    --sft-coef) yields a batch of demonstrations per minibatch for the auxiliary SFT loss.
    Returns the step's diagnostics (each the mean over minibatches; first_ratio is the first one's).
    """
    mask = torch.zeros_like(old_logp)
    for i, s in enumerate(samples):
        mask[i, :len(s.tokens)] = 1
    advantage, stats = advantages(samples, old_logp, ref_logp, mask, settings, gen)
    stats["entropy"] = -rl.masked_mean(old_logp, mask).item()  # a sampled token's -log p estimates the entropy

    policy.train()
    history = []
    for minibatch in (mb for epoch in plan for mb in epoch):
        n_rows = sum(map(len, minibatch))
        optimizer.zero_grad()
        mb_stats = {}
        for rows in minibatch:  # the minibatch loss is a mean over its sequences: weight each micro-batch by its share
            logp, gen_mask = experience_logprobs(policy, [samples[i] for i in rows], pad_id, settings.temperature)
            n = gen_mask.shape[1]
            loss, st = rl.ppo_loss(logp, old_logp[rows, :n], advantage[rows, :n], gen_mask, settings.clip_eps)
            if settings.pg_coef:  # 0: the SFT-only control, which still logs what PPO would see
                (settings.pg_coef * loss * len(rows) / n_rows).backward()
            for k, v in {**st, "loss": loss.item()}.items():
                mb_stats[k] = mb_stats.get(k, 0.0) + v * len(rows) / n_rows
        if demos is not None:  # the auxiliary SFT loss keeps the format and benign helpfulness anchored
            mb_stats["sft_loss"] = sft_backward(policy, next(demos), pad_id, settings.micro_batch_size, settings.sft_coef)
        mb_stats["grad_norm"] = optimizer.step(settings.grad_clip)
        history.append(mb_stats)
    policy.eval()
    for key in history[0]:
        stats[key] = sum(h[key] for h in history) / len(history)
    stats["first_ratio"] = history[0]["ratio_mean"]  # 1: the first minibatch sees the old policy (see reuses_sampler_logprobs)
    return stats


def sft_backward(policy, demos, pad_id, micro_batch_size, sft_coef) -> float:
    """Backward of sft_coef x the SFT loss (mean NLL over all the batch's target tokens); returns the loss.

    It runs in micro-batches like the PPO loss (same-role demos together, so their role prompt runs
    once), each weighted by its share of the target tokens: the gradient is the whole batch's, but
    only one micro-batch's activations are alive (4 long demos at once took ~1.3 GB).
    """
    n_tokens = sum(len(d.tokens) for d in demos)
    total = 0.0
    for rows in micro_batches(demos, range(len(demos)), micro_batch_size):
        part = [demos[i] for i in rows]
        share = sum(len(d.tokens) for d in part) / n_tokens
        loss = sft_loss(policy, part, pad_id)
        (sft_coef * share * loss).backward()
        total += share * loss.item()
    return total

"""The update of one self-play step (selfplay.py calls ppo_update once per step; `cfg` is its Config).

  advantages     game rewards against a baseline (whitening per role, or RLOO over groups of
                 answers to one prompt), plus the KL penalty's return-to-go at its true scale
  ppo_update     old log-probs (the sampler's, or recomputed), reference log-probs, advantages, the
                 PPO clipped loss in micro-batches
  sft_backward   the auxiliary SFT loss on the demos, in micro-batches too
The maths is in rl.py; the log-probs come from sampler.generation_logprobs.
"""
import time

import torch

import rl
from sampler import common_prefix_length, generation_logprobs
from warmup import sft_loss


def experience_logprobs(model, samples, pad_id, cfg):
    """Log-probs (batch, longest generation) of each sample's tokens under softmax(logits / T), the
    full distribution: a top-p nucleus only decides what is sampled (see sampler.sampling_logprobs)."""
    return generation_logprobs(model, [s.prompt for s in samples], [s.tokens for s in samples], pad_id, cfg.temperature)


def micro_batches(samples, rows, size, min_shared=64):
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
def batch_logprobs(model, samples, micros, pad_id, cfg):
    """experience_logprobs of every sample, one group of rows (`micros`) at a time, as one (S, N) tensor."""
    out = torch.zeros(len(samples), max(len(s.tokens) for s in samples), device=next(model.parameters()).device)
    for rows in micros:
        logp, _ = experience_logprobs(model, [samples[i] for i in rows], pad_id, cfg)
        out[rows, :logp.shape[1]] = logp
    return out


def reuses_sampler_logprobs(policy, samples, cfg) -> bool:
    """Whether the old log-probs are the sampler's own (--old-logprobs; auto: when computing in float32).

    The samples were drawn from softmax(logits / T) of the policy as it is now, which is what the
    old log-probs are, so the sampler already has them. In float32 its KV-cached decode matches a
    packed training forward to ~1e-5 (max over tokens: 4e-6 on the tiny test model, 2e-5 on
    SmolLM2-135M) and the recomputing pass can go. In bf16 the two round differently (up to 0.3 in
    a token's log-prob on SmolLM2, mean 0.03): the first PPO ratio would be off by that much and
    clip, so the old log-probs are recomputed in the first pass's own micro-batches, where the
    ratio is exactly 1. Samples without the sampler's log-probs (built by hand) are recomputed.
    """
    if any(s.logprobs is None for s in samples) or cfg.old_logprobs == "recompute":
        return False
    return cfg.old_logprobs == "sampler" or next(policy.parameters()).dtype == torch.float32


def advantages(samples, old_logp_SN, ref_logp_SN, mask_SN, cfg, gen):
    """Advantage (S, N) of each token: its sample's game reward against a baseline, plus the return-to-go
    of the KL penalty -beta * k1 at its true scale (whitening it too made KL noise a full-size signal).

    The baseline, per role: with groups (--group-attacker / --group-defender k > 1) the leave-one-out
    mean of the sample's group (RLOO); otherwise REINFORCE++ as released, whitening over the role's
    tokens (or over each role's harmful and benign prompts apart: --whiten role_and_seed). A baseline
    group whose rewards are all equal gets 0 and is counted. RLOO advantages stay in reward units, like
    the KL term; whitened ones have unit std. --shuffle-rewards first permutes each role's rewards
    among its samples: the same update noise with no information (a control arm).
    Returns (advantages_SN, stats).
    """
    device = mask_SN.device
    role_S = torch.tensor([s.role for s in samples], device=device)
    reward_S = torch.tensor([s.reward for s in samples], device=device, dtype=torch.float32)
    if cfg.shuffle_rewards:
        reward_S = rl.shuffle_within_groups(reward_S, role_S, gen)
    kind_S = role_S  # the whitening groups
    if cfg.whiten == "role_and_seed":  # 4 groups: (attacker, defender) x (benign, harmful prompt)
        kind_S = role_S * 2 + torch.tensor([int(s.harmful_prompt) for s in samples], device=device)
    prompt_S = torch.tensor([s.group for s in samples], device=device)  # the RLOO groups

    game_SN = torch.zeros_like(mask_SN)
    n_groups = n_equal = 0
    for role, k in ((rl.ATTACKER, cfg.group_attacker), (rl.DEFENDER, cfg.group_defender)):
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
    kl_return_SN, kl_SN = rl.kl_penalty_returns(old_logp_SN, ref_logp_SN, mask_SN, cfg.kl_beta)
    stats = {"kl": rl.masked_mean(kl_SN, mask_SN).item(), "baseline_groups": n_groups, "zero_variance_groups": n_equal}
    return game_SN + kl_return_SN, stats


def ppo_update(policy, reference, optimizer, samples, pad_id, cfg, gen, demos=None):
    """REINFORCE++ (or RLOO, with groups) with the PPO clip on the attacker and defender samples of one step, together.

    `reference()` is a context manager that yields the KL anchor (the starting model: a frozen copy,
    or the LoRA policy with its adapters off); it is not called when cfg.kl_beta is 0.

    Each epoch shuffles the samples into `minibatches` optimiser steps; each minibatch runs in
    micro-batches (rows of the same role prompt together) whose gradients add up to the minibatch's loss.
    `demos` (with --sft-coef) yields a batch of demonstrations per minibatch for the auxiliary SFT loss.
    """
    times = {}
    epochs = [[micro_batches(samples, rows.tolist(), cfg.micro_batch_size)
               for rows in torch.randperm(len(samples), generator=gen).chunk(cfg.minibatches)]
              for _ in range(cfg.ppo_epochs)]
    first_pass = [micro for minibatch in epochs[0] for micro in minibatch]
    t0 = time.time()
    from_sampler = reuses_sampler_logprobs(policy, samples, cfg)
    if from_sampler:
        old_logp = torch.zeros(len(samples), max(len(s.tokens) for s in samples), device=samples[0].logprobs.device)
        for i, s in enumerate(samples):
            old_logp[i, :len(s.tokens)] = s.logprobs
    else:  # the policy before this update, each row packed as in the first pass (bf16 sums depend on the batch shape)
        old_logp = batch_logprobs(policy, samples, first_pass, pad_id, cfg)
    times["t_old_logprobs"] = time.time() - t0
    t0 = time.time()
    if cfg.kl_beta:
        # no grad, no activations kept: groups wider than a training micro-batch (fewer, larger
        # matmuls). Packed unlike the old log-probs, so in bf16 the KL carries rounding noise
        # (SmolLM2: mean |delta| 0.008 a token, mean delta -0.001; in float32 ~1e-6)
        with reference() as model:
            ref_logp = batch_logprobs(model, samples, micro_batches(samples, range(len(samples)), cfg.no_grad_batch),
                                      pad_id, cfg)
    else:  # no KL penalty: no reference pass (the logged kl is 0)
        ref_logp = old_logp
    times["t_reference"] = time.time() - t0

    t0 = time.time()
    mask = torch.zeros_like(old_logp)
    for i, s in enumerate(samples):
        mask[i, :len(s.tokens)] = 1
    advantage, stats = advantages(samples, old_logp, ref_logp, mask, cfg, gen)
    stats["entropy"] = -rl.masked_mean(old_logp, mask).item()  # a sampled token's -log p estimates the entropy
    stats["old_logprobs_from_sampler"] = int(from_sampler)

    policy.train()
    history = []
    for minibatch in (mb for epoch in epochs for mb in epoch):
        n_rows = sum(map(len, minibatch))
        optimizer.zero_grad()
        mb_stats = {}
        for rows in minibatch:  # the minibatch loss is a mean over its sequences: weight each micro-batch by its share
            logp, gen_mask = experience_logprobs(policy, [samples[i] for i in rows], pad_id, cfg)
            n = gen_mask.shape[1]
            loss, st = rl.ppo_loss(logp, old_logp[rows, :n], advantage[rows, :n], gen_mask, cfg.clip_eps)
            if cfg.pg_coef:  # 0: the SFT-only control, which still logs what PPO would see
                (cfg.pg_coef * loss * len(rows) / n_rows).backward()
            for k, v in {**st, "loss": loss.item()}.items():
                mb_stats[k] = mb_stats.get(k, 0.0) + v * len(rows) / n_rows
        if demos is not None:  # the auxiliary SFT loss keeps the format and benign helpfulness anchored
            mb_stats["sft_loss"] = sft_backward(policy, next(demos), pad_id, cfg)
        mb_stats["grad_norm"] = optimizer.step(cfg.grad_clip)
        history.append(mb_stats)
    policy.eval()
    times["t_update"] = time.time() - t0
    for key in history[0]:
        stats[key] = sum(h[key] for h in history) / len(history)
    stats["first_ratio"] = history[0]["ratio_mean"]  # 1: the first minibatch sees the old policy (see reuses_sampler_logprobs)
    return stats, times


def sft_backward(policy, demos, pad_id, cfg) -> float:
    """Backward of sft_coef x the SFT loss (mean NLL over all the batch's target tokens); returns the loss.

    It runs in micro-batches like the PPO loss (same-role demos together, so their role prompt runs
    once), each weighted by its share of the target tokens: the gradient is the whole batch's, but
    only one micro-batch's activations are alive (4 long demos at once took ~1.3 GB).
    """
    n_tokens = sum(len(d.tokens) for d in demos)
    total = 0.0
    for rows in micro_batches(demos, range(len(demos)), cfg.micro_batch_size):
        part = [demos[i] for i in rows]
        share = sum(len(d.tokens) for d in part) / n_tokens
        loss = sft_loss(policy, part, pad_id)
        (cfg.sft_coef * share * loss).backward()
        total += share * loss.item()
    return total

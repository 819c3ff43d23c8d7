"""update.py on a tiny random model: micro-batches, the advantages, the old and reference log-probs, the
PPO update, the auxiliary SFT loss."""
import copy
import math
from contextlib import nullcontext

import pytest
import torch

import rl
import update as U
from conftest import make_model, make_tokenizer
from game import turn_experience
from model import defender_messages, play_turn, render_prompt
from optim import MixedPrecisionAdamW
from update import UpdateSettings as Settings
from warmup import sft_loss

ROLE_PROMPT = "A conversation between User and Assistant. The User asks a question and the Assistant answers it. " * 4


def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"])


def update(policy, reference, optimizer, samples, settings, pad_id, gen=None, demos=None):
    """One update as selfplay.py's loop runs it: the plan, old and reference log-probs, PPO."""
    gen = gen or torch.Generator().manual_seed(0)
    plan = U.plan_minibatches(samples, settings, gen)
    old_logp, from_sampler = U.old_logprobs(policy, samples, plan, settings, pad_id)
    ref_logp = U.reference_logprobs(reference, samples, settings, pad_id)
    stats = U.ppo_update(policy, optimizer, samples, plan, old_logp, ref_logp, settings, pad_id, gen, demos)
    return {**stats, "old_logprobs_from_sampler": int(from_sampler)}


def fixed_samples(tokenizer, rewards):
    """Defender-like samples: a long shared role prompt, three questions x three fixed turns."""
    prompts = [ids(tokenizer, ROLE_PROMPT + q) for q in ("How do I bake bread?", "Write a poem about the sea.", "Hi.")]
    turns = [ids(tokenizer, t) for t in (" Sure, here is how.", " I can't help with that.", " <answer> here </answer>")]
    return [rl.Experience(rl.DEFENDER, p, t, r) for (p, t), r in zip(((p, t) for p in prompts for t in turns), rewards)]


def test_equal_game_rewards_give_no_update_beyond_the_kl_term():
    """Whitening the KL-shaped returns turned beta * KL noise (~1e-3) into unit-size advantages when
    every game reward was equal; the KL term must keep its true scale."""
    tokenizer = make_tokenizer()
    cfg = Settings(kl_beta=0.01, temperature=1.0, minibatches=1, whiten="role", sft_coef=0.0)
    norms = {}
    for name, rewards in (("equal", [1.0] * 9), ("varied", [1.0, -1.0, 0.0] * 3)):
        policy = make_model(tokenizer)
        reference = copy.deepcopy(policy).requires_grad_(False)
        with torch.no_grad():  # a reference a little off the policy: small KL noise on every token
            for p in reference.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
        stats = update(policy, lambda: nullcontext(reference), MixedPrecisionAdamW(policy, 1e-4),
                       fixed_samples(tokenizer, rewards), cfg, tokenizer.pad_token_id)
        assert 0 < abs(stats["kl"]) < 0.1
        norms[name] = stats["grad_norm"]
    assert norms["equal"] < 0.01 * norms["varied"], norms


def test_top_p_below_one_keeps_the_kl_and_the_update_finite():
    """Sampled with a nucleus, scored from the full softmax: a token outside the reference's nucleus
    had log-prob -inf (infinite KL), and padded positions (-inf - -inf) * 0 = NaN."""
    tokenizer = make_tokenizer()
    policy, reference = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1).requires_grad_(False)
    cfg = Settings(temperature=0.7, minibatches=1, sft_coef=0.0)
    prompts = [render_prompt(tokenizer, defender_messages(q)) for q in ("How do I bake bread?", "Hi.", "Write a poem.")]
    turn = play_turn(policy, tokenizer, prompts, 12, cfg.temperature, top_p=0.3, generator=torch.Generator().manual_seed(0))
    samples = [turn_experience(turn, i, rl.DEFENDER, float(i)) for i in range(len(prompts))]
    # as if row 0 had stopped early: the other rows are padded after it
    samples[0].tokens, samples[0].logprobs = samples[0].tokens[:5], samples[0].logprobs[:5]
    ref_logp, mask = U.experience_logprobs(reference, samples, tokenizer.pad_token_id, cfg.temperature)
    assert bool(torch.isfinite(ref_logp[mask.bool()]).all())
    stats = update(policy, lambda: nullcontext(reference), MixedPrecisionAdamW(policy, 1e-4), samples, cfg,
                   tokenizer.pad_token_id)
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)


def synthetic(rewards, roles, lengths, harmful=None, groups=None):
    """Experiences with given rewards and generation lengths, and a (S, N) mask; the tokens are never read."""
    n = len(rewards)
    harmful = harmful or [False] * n
    groups = groups or list(range(n))
    samples = [rl.Experience(r, torch.tensor([1, 2]), torch.zeros(L, dtype=torch.long), x, harmful_prompt=h, group=g)
               for x, r, L, h, g in zip(rewards, roles, lengths, harmful, groups)]
    mask = torch.zeros(n, max(lengths))
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
    return samples, mask


def old_advantages(logp, ref, mask, reward, group, beta):
    """The previous computation, written out: KL-shaped token rewards (game reward on the last token),
    return-to-go (gamma 1), then whitened over the tokens of each group."""
    rewards = -beta * (logp - ref) * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(reward)), last] += reward
    returns = rewards.flip(1).cumsum(1).flip(1) * mask
    out = torch.zeros_like(returns)
    for g in group.unique():
        m = mask * (group == g)[:, None]
        mean = (returns * m).sum() / m.sum()
        std = (((returns - mean) ** 2) * m).sum().div(m.sum()).sqrt()
        out = torch.where(m.bool(), (returns - mean) / (std + 1e-8), out)
    return out


@pytest.mark.parametrize("whiten", ["role", "role_and_seed"])
def test_group_sizes_of_one_are_the_previous_reinforce_plus_plus(whiten):
    """Without the KL term, exactly the previous per-role (or per role and kind) whitening; with it, the
    same plus the KL penalty's return-to-go, unnormalised."""
    torch.manual_seed(0)
    roles = [0, 1, 1, 0, 1, 1, 0, 1]
    harmful = [True, True, False, False, True, False, True, True]
    samples, mask = synthetic([2.0, -1.0, 3.0, 0.5, 0.0, 1.0, -2.0, 2.0], roles, [3, 5, 2, 4, 5, 1, 2, 3], harmful)
    logp, ref = -torch.rand(mask.shape) * 3, -torch.rand(mask.shape) * 3
    reward, role = torch.tensor([s.reward for s in samples]), torch.tensor(roles)
    group = role * 2 + torch.tensor(harmful).long() if whiten == "role_and_seed" else role
    gen = torch.Generator()
    cfg = Settings(whiten=whiten, kl_beta=0.0)
    got, stats = U.advantages(samples, logp, ref, mask, cfg, gen)
    torch.testing.assert_close(got, old_advantages(logp, ref, mask, reward, group, beta=0.0))
    assert stats["baseline_groups"] == len(group.unique())
    assert stats["zero_variance_groups"] == {"role": 0, "role_and_seed": 1}[whiten]  # (attacker, benign) has one sample
    cfg = Settings(whiten=whiten, kl_beta=0.01)
    got_kl, _ = U.advantages(samples, logp, ref, mask, cfg, gen)
    kl_return = (-0.01 * (logp - ref) * mask).flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(got_kl, old_advantages(logp, ref, mask, reward, group, beta=0.0) + kl_return)


def test_equal_rewards_and_kl_noise_give_kl_sized_advantages():
    """The issue's check: equal game rewards, KL noise 0.01. Whitening the whole return gave std 1.00."""
    torch.manual_seed(0)
    samples, mask = synthetic([1.0] * 16, [rl.DEFENDER] * 16, [20] * 16)
    logp = -torch.rand(mask.shape)
    ref = logp + 0.01 * torch.randn(mask.shape)
    got, stats = U.advantages(samples, logp, ref, mask, Settings(whiten="role"), torch.Generator())
    assert got.std().item() < 1e-2
    assert stats["zero_variance_groups"] == 1 and stats["baseline_groups"] == 1
    old = old_advantages(logp, ref, mask, torch.ones(16), torch.ones(16), beta=0.01)
    assert old.std().item() == pytest.approx(1.0, abs=0.01)  # the defect, for the record


def test_rloo_groups_against_hand_computed_numbers():
    """Attacker revisions in groups by seed, defender answers in groups by prompt; equal groups are counted."""
    roles = [0, 0, 0, 1, 1, 1, 1, 1, 1]
    groups = [5, 5, 8, 0, 0, 0, 1, 1, 2]  # attacker: seeds 5 (two revisions) and 8 (one); defender: prompts 0, 1, 2
    rewards = [1.0, 2.0, 3.0, 3.0, 0.0, -3.0, 2.0, 2.0, 1.0]
    samples, mask = synthetic(rewards, roles, [2] * 9, groups=groups)
    cfg = Settings(group_attacker=2, group_defender=3, kl_beta=0.0)
    got, stats = U.advantages(samples, torch.zeros(9, 2), torch.zeros(9, 2), mask, cfg, torch.Generator())
    expected = torch.tensor([-1.0, 1.0, 0.0, 4.5, 0.0, -4.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got, expected[:, None].expand(9, 2))
    # seed 8 (one revision left), prompt 1 (equal) and prompt 2 (one answer left) carry no update
    assert stats["zero_variance_groups"] == 3 and stats["baseline_groups"] == 5


def test_rloo_for_one_role_and_whitening_for_the_other():
    samples, mask = synthetic([1.0, 3.0, 5.0, -1.0], [0, 0, 1, 1], [1, 1, 1, 1], groups=[0, 0, 0, 1])
    got, _ = U.advantages(samples, torch.zeros(4, 1), torch.zeros(4, 1), mask, Settings(group_attacker=2, whiten="role"),
                          torch.Generator())
    torch.testing.assert_close(got[:, 0], torch.tensor([-2.0, 2.0, 1.0, -1.0]))


def test_role_and_seed_whitens_the_defender_by_the_judged_label_of_its_prompt():
    """The defender's refusal reward is scored against the judge's label of the prompt it saw, so its
    per-kind baseline uses that label (harmful_prompt), not the seed's type."""
    samples, mask = synthetic([2.0, 0.0, 4.0, 2.0], [1, 1, 1, 1], [1, 1, 1, 1], harmful=[True, True, False, False])
    got, _ = U.advantages(samples, torch.zeros(4, 1), torch.zeros(4, 1), mask, Settings(whiten="role_and_seed"),
                          torch.Generator())
    torch.testing.assert_close(got[:, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_shuffled_rewards_are_permuted_within_each_role():
    roles = [0, 1] * 8
    samples, mask = synthetic([float(k) for k in range(16)], roles, [1] * 16)
    plain, _ = U.advantages(samples, torch.zeros(16, 1), torch.zeros(16, 1), mask, Settings(whiten="role"), torch.Generator())
    shuffled, _ = U.advantages(samples, torch.zeros(16, 1), torch.zeros(16, 1), mask,
                               Settings(whiten="role", shuffle_rewards=True), torch.Generator().manual_seed(0))
    for role in (0, 1):
        rows = torch.tensor(roles) == role
        assert sorted(shuffled[rows, 0].tolist()) == pytest.approx(sorted(plain[rows, 0].tolist()))
        assert not torch.allclose(shuffled[rows], plain[rows])


def marked_samples(tokenizer, policy, shift):
    """fixed_samples carrying "sampler" log-probs `shift` above the policy's own: PPO's first ratio,
    exp(-shift) or 1, then shows which old log-probs the update used."""
    samples = fixed_samples(tokenizer, [1.0, -1.0, 0.0] * 3)
    with torch.no_grad():
        for s in samples:
            logp, _ = U.experience_logprobs(policy, [s], tokenizer.pad_token_id, 1.0)
            s.logprobs = logp[0] + shift
    return samples


@pytest.mark.parametrize("old_logprobs,dtype,from_sampler", [
    ("sampler", torch.float32, True), ("recompute", torch.float32, False),
    ("auto", torch.float32, True), ("auto", torch.bfloat16, False), ("sampler", torch.bfloat16, True)])
def test_the_old_log_probs_are_the_samplers_or_recomputed(old_logprobs, dtype, from_sampler):
    tokenizer = make_tokenizer()
    policy = make_model(tokenizer)
    samples = marked_samples(tokenizer, policy, shift=0.1)
    optimizer = MixedPrecisionAdamW(policy, 1e-4, dtype)
    cfg = Settings(old_logprobs=old_logprobs, kl_beta=0.0, minibatches=1, temperature=1.0, sft_coef=0.0)
    stats = update(policy, None, optimizer, samples, cfg, tokenizer.pad_token_id)  # kl_beta 0: `reference` is never called
    assert stats["old_logprobs_from_sampler"] == int(from_sampler)
    if from_sampler and dtype == torch.float32:
        assert stats["first_ratio"] == pytest.approx(math.exp(-0.1), abs=1e-5)
    if not from_sampler:  # recomputed as the first pass packs its rows: exactly the first forward's, bf16 too
        assert stats["first_ratio"] == 1.0 and stats["clip_frac"] == 0.0


def test_samples_without_the_samplers_log_probs_are_recomputed():
    tokenizer = make_tokenizer()
    policy = make_model(tokenizer)
    cfg = Settings(old_logprobs="sampler", kl_beta=0.0, temperature=1.0, sft_coef=0.0)
    stats = update(policy, None, MixedPrecisionAdamW(policy, 1e-4), fixed_samples(tokenizer, [1.0, -1.0, 0.0] * 3), cfg,
                   tokenizer.pad_token_id)
    assert stats["old_logprobs_from_sampler"] == 0 and stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("no_grad_batch,widths", [(16, [9]), (4, [4, 4, 1])])
def test_the_reference_pass_is_wider_than_a_micro_batch_and_skipped_without_kl(monkeypatch, no_grad_batch, widths):
    """Nine rows of one role prompt: the training micro-batches hold 2 rows, the reference pass up to
    no_grad_batch (no activations kept); with kl_beta 0 the reference is never asked for."""
    tokenizer = make_tokenizer()
    policy, reference = make_model(tokenizer), make_model(tokenizer, seed=1).requires_grad_(False)
    rows_per_pass = {}
    real = U.experience_logprobs

    def spy(model, samples, pad_id, temperature):
        rows_per_pass.setdefault("reference" if model is reference else "policy", []).append(len(samples))
        return real(model, samples, pad_id, temperature)
    monkeypatch.setattr(U, "experience_logprobs", spy)
    asked = []

    def reference_context():
        asked.append(1)
        return nullcontext(reference)
    for kl_beta in (0.0, 0.01):
        cfg = Settings(kl_beta=kl_beta, micro_batch_size=2, no_grad_batch=no_grad_batch, minibatches=1, sft_coef=0.0)
        stats = update(policy, reference_context, MixedPrecisionAdamW(policy, 1e-4),
                       marked_samples(tokenizer, policy, shift=0.0), cfg, tokenizer.pad_token_id)
        assert len(asked) == (1 if kl_beta else 0) and (stats["kl"] != 0.0) == bool(kl_beta)
    assert rows_per_pass["reference"] == widths
    assert max(rows_per_pass["policy"]) == 2  # the training micro-batches (old log-probs from the sampler)


def test_with_lora_the_first_kl_is_exactly_zero_and_the_reference_is_the_adapters_off():
    """B = 0: the adapted policy is its reference bit for bit (old and reference rows packed alike:
    one minibatch, groups as wide as the no-grad ones). After one step the adapters-off reference differs."""
    import lora
    tokenizer = make_tokenizer()
    policy = lora.add_lora(make_model(tokenizer), 4)
    samples = fixed_samples(tokenizer, [1.0, -1.0, 0.0] * 3)
    cfg = Settings(kl_beta=0.01, old_logprobs="recompute", minibatches=1, micro_batch_size=16, no_grad_batch=16,
                 temperature=1.0, sft_coef=0.0)
    optimizer = MixedPrecisionAdamW(policy, 1e-2)
    kls = [update(policy, lambda: lora.adapters_disabled(policy), optimizer, samples, cfg, tokenizer.pad_token_id,
                  torch.Generator().manual_seed(step))["kl"] for step in range(2)]
    assert kls[0] == 0.0 and kls[1] != 0.0


# ----------------------------------------------------------------------------------------------
# Micro-batches, the SFT loss, the whole update


def test_micro_batches_keep_rows_with_a_long_shared_prompt_prefix_together():
    role_a, role_b = list(range(100)), list(range(500, 600))  # two role prompts: 100 tokens each
    prompts = [role_a + [1], role_b + [2], role_a + [3], role_a + [4], role_b + [5], role_a + [6], role_a + [7]]
    samples = [rl.Experience(0, torch.tensor(p), torch.tensor([1]), 0.0) for p in prompts]
    groups = U.micro_batches(samples, list(range(len(samples))), size=2)
    assert sorted(i for g in groups for i in g) == list(range(len(samples)))  # every row once
    assert all(len(g) <= 2 for g in groups)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 4], [3, 5], [6]]  # never role_a with role_b


def test_the_sft_loss_in_micro_batches_has_the_whole_batchs_loss_and_gradient():
    """sft_backward weights each micro-batch by its share of target tokens: same loss, same gradient
    as one pass over the batch (float32), with demos of two role prompts and different lengths."""
    tokenizer = make_tokenizer()
    ids = lambda text: torch.tensor(tokenizer(text)["input_ids"])
    roles = ["You rewrite requests for a red-teaming game. " * 4, "You are a helpful and safe assistant. " * 4]
    demos = [rl.Experience(k % 2, ids(roles[k % 2] + f"Request {k}?"), ids(" Sure." * (k + 1) + " Done."), 0.0)
             for k in range(5)]
    whole, split = make_model(tokenizer), make_model(tokenizer)
    expected = sft_loss(whole, demos, tokenizer.pad_token_id)
    (0.5 * expected).backward()
    loss = U.sft_backward(split, demos, tokenizer.pad_token_id, micro_batch_size=2, sft_coef=0.5)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("whiten", ["role", "role_and_seed"])
def test_an_update_makes_rewarded_turns_likelier_and_punished_ones_rarer(whiten):
    """The whole update path (micro-batches sorted by prompt, old and reference log-probs,
    returns, whitening, PPO) moves each sample the way its reward says."""
    tokenizer = make_tokenizer()
    policy, reference = make_model(tokenizer), make_model(tokenizer).requires_grad_(False)
    ids = lambda text: torch.tensor(tokenizer(text)["input_ids"])
    role_prompt = "A conversation between User and Assistant. The User asks a question and the Assistant answers it. " * 4
    # a long shared role prompt, so that micro-batches hold 2 rows (update.micro_batches)
    prompts = [ids(role_prompt + q) for q in ("How do I bake bread?", "Write a poem about the sea.", "Hi.")]
    assert U.common_prefix_length(prompts) >= U.SAME_ROLE_PROMPT
    turns = [ids(" Sure, here is how."), ids(" I can't help with that."), ids(" <answer> here </answer>")]
    samples, reward = [], {}
    for k, (prompt, turn) in enumerate((p, t) for p in prompts for t in turns):
        reward[k] = [1.0, -1.0, 0.0][k % 3]  # "Sure, ..." pays, "I can't ..." costs, in every prompt
        samples.append(rl.Experience(k % 2, prompt, turn, reward[k], harmful_prompt=k % 4 < 2))
    cfg = Settings(minibatches=2, micro_batch_size=2, temperature=1.0, kl_beta=0.0, whiten=whiten)

    def logps():
        logp = U.batch_logprobs(policy, samples, [[i] for i in range(len(samples))], tokenizer.pad_token_id, 1.0)
        return [logp[i, :len(s.tokens)].sum().item() for i, s in enumerate(samples)]
    before = logps()
    stats = update(policy, lambda: nullcontext(reference), MixedPrecisionAdamW(policy, 1e-4), samples, cfg,
                   tokenizer.pad_token_id)
    after = logps()
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    moved = {k: after[k] - before[k] for k in reward}
    assert all(moved[k] > 0 for k in reward if reward[k] > 0), moved
    assert all(moved[k] < 0 for k in reward if reward[k] < 0), moved

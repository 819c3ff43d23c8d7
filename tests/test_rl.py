"""rl.py against hand-computed tensors."""
import torch

import rl

MASK = torch.tensor([[1., 1., 1.], [1., 1., 0.]])


def test_kl_penalty_returns_are_the_return_to_go_of_minus_beta_k1():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.2, -0.1, -1.0]])
    returns, kl = rl.kl_penalty_returns(logp, ref, MASK, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5], [0.0, -0.2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[-0.1, -0.05, -0.05], [0.02, 0.02, 0.0]]))


def test_padding_that_holds_minus_inf_gives_no_nan():
    """A log-prob of -inf at a padded position (as a top-p cut gave): (-inf - -inf) * 0 was NaN."""
    logp = torch.tensor([[-1.0, -2.0, -float("inf")]])
    returns, kl = rl.kl_penalty_returns(logp, logp.clone(), torch.tensor([[1.0, 1.0, 0.0]]))
    assert bool(torch.isfinite(returns).all() and torch.isfinite(kl).all())
    loss, stats = rl.ppo_loss(logp, logp.clone(), returns, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.isfinite(loss) and stats["ratio_mean"] == 1.0
    assert rl.masked_mean(logp, torch.tensor([[1.0, 1.0, 0.0]])).item() == -1.5


def test_returns_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    torch.testing.assert_close(rl.returns_to_go(rewards, MASK), torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))
    torch.testing.assert_close(rl.returns_to_go(rewards, MASK, gamma=0.5),
                               torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [4 + 0.5 * 5, 5.0, 0.0]]))


def test_whitening_is_separate_per_role():
    adv = torch.tensor([[1.0, 3.0, 0.0], [10.0, 30.0, 0.0], [20.0, 40.0, 0.0]])
    mask = torch.tensor([[1., 1., 0.], [1., 1., 0.], [1., 1., 0.]])
    role = torch.tensor([rl.ATTACKER, rl.DEFENDER, rl.DEFENDER])
    out = rl.whiten_per_role(adv, mask, role)
    torch.testing.assert_close(out[0, :2], torch.tensor([-1.0, 1.0]))  # attacker tokens: mean 2, std 1
    d = torch.tensor([10.0, 30.0, 20.0, 40.0])
    expected = (d - 25.0) / ((d - 25.0).pow(2).mean().sqrt())  # defender tokens, population std
    torch.testing.assert_close(torch.cat([out[1, :2], out[2, :2]]), expected)
    assert bool((out[:, 2] == 0).all())


def test_whitening_by_role_and_seed_kind_normalises_each_group_alone():
    adv = torch.tensor([[1.0, 3.0], [5.0, 9.0], [2.0, 2.0], [0.0, 4.0], [-4.0, 0.0]])
    group = torch.tensor([0, 1, 3, 3, 3])  # role * 2 + harmful seed, as selfplay's --whiten role_and_seed
    out = rl.whiten_per_role(adv, torch.ones(5, 2), group)
    torch.testing.assert_close(out[0], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([-1.0, 1.0]))
    g = adv[2:].flatten()
    torch.testing.assert_close(out[2:].flatten(), (g - g.mean()) / (g - g.mean()).pow(2).mean().sqrt())


def test_whitening_skips_a_role_with_no_samples():
    adv = torch.tensor([[1.0, 3.0]])
    out = rl.whiten_per_role(adv, torch.ones(1, 2), torch.tensor([rl.DEFENDER]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0]]))


def test_ppo_loss_equals_policy_gradient_when_the_ratio_is_one():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 7.0]])
    loss, stats = rl.ppo_loss(logp, logp.detach(), adv, MASK)
    pg = -((adv * MASK).sum(1) / MASK.sum(1)).mean()  # ratio 1: -mean of advantages
    torch.testing.assert_close(loss, pg)
    loss.backward()
    expected_grad = -(adv * MASK) / MASK.sum(1, keepdim=True) / 2  # d ratio / d logp = 1 at ratio 1
    torch.testing.assert_close(logp.grad, expected_grad)
    assert stats == {"approx_kl": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0}


def test_ppo_loss_clips():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = rl.ppo_loss(new, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2 (clipped); token 1: min(-0.5, -0.8) = -0.8 (clipped)
    torch.testing.assert_close(loss, -torch.tensor((1.2 - 0.8) / 2))
    loss.backward()
    assert bool((new.grad == 0).all())  # both clipped: no gradient
    assert stats["clip_frac"] == 1.0 and abs(stats["ratio_mean"] - 1.0) < 1e-6
    assert stats["approx_kl"] > 0


def test_mixed_precision_adamw_clips_and_steps_like_plain_adamw_with_the_papers_betas():
    torch.manual_seed(0)
    start = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)]).to(torch.bfloat16).float()
    # two steps of bf16 gradients: the first far above the clip, the second below it (Adam's first
    # step is scale-free, the second shows whether the first was clipped)
    steps = [[(torch.randn_like(p) * scale).to(torch.bfloat16) for p in start.parameters()] for scale in (10.0, 0.01)]
    expected_norms = [torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in gs])).item() for gs in steps]

    masters = [p.detach().clone().requires_grad_() for p in start.parameters()]  # the same by hand, float32
    adam = torch.optim.AdamW(masters, lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)  # the paper's Adam
    for gs in steps:
        for m, g in zip(masters, gs):
            m.grad = g.float()
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        adam.step()

    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    model.load_state_dict(start.state_dict())
    opt = rl.MixedPrecisionAdamW(model, lr=0.1, dtype=torch.bfloat16)
    for gs, expected in zip(steps, expected_norms):
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        norm = opt.step(grad_clip=1.0)
        assert abs(norm - expected) < 1e-4 * expected
    assert all(p.grad is None for p in model.parameters())
    for p, m, want in zip(model.parameters(), opt.master, masters):  # masters stepped, weights = masters in bf16
        torch.testing.assert_close(m.detach(), want.detach())
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.detach().to(torch.bfloat16))


def test_gradients_accumulate_in_float32_across_micro_batches():
    """bf16 compute, float32 masters: 256 micro-batch gradients of 2^-9 after one of 1.0 sum to 1.5
    in float32; summed in bf16 (spacing 2^-7 at 1.0) each one rounds away and the sum stays 1.0."""
    layer = torch.nn.Linear(1, 1, bias=False)
    opt = rl.MixedPrecisionAdamW(layer, lr=0.1, dtype=torch.bfloat16)
    for x in [1.0] + [2.0 ** -9] * 256:
        layer(torch.tensor([[x]], dtype=torch.bfloat16)).sum().backward()  # d/dw (w * x) = x
    bf16_sum = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(256):
        bf16_sum += 2.0 ** -9
    assert bf16_sum.item() == 1.0  # what accumulating in bf16 gives: measurably off
    assert opt.step(grad_clip=1e9) == 1.5  # the float32 sum (the norm of a one-element gradient)


def test_rloo_advantages_against_hand_computed_numbers():
    reward = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 5.0, 0.0, 4.0])
    group = torch.tensor([7, 7, 7, 1, 1, 2, 9, 9])
    # group 7: 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2; group 1: all equal; group 2: alone
    expected = torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0, -4.0, 4.0])
    torch.testing.assert_close(rl.rloo_advantages(reward, group), expected)
    assert rl.equal_reward_groups(reward, group).tolist() == [False] * 3 + [True] * 3 + [False] * 2


def test_a_group_of_equal_rewards_gets_exactly_zero():
    """Thirds do not add up exactly in floating point: the mean of equal values can differ from them
    by an ulp, which normalising or a leave-one-out mean would turn into a full-size advantage."""
    third = torch.tensor(1.0) / 3
    reward = torch.stack([third] * 7)
    assert rl.equal_reward_groups(reward, torch.zeros(7, dtype=torch.long)).all()
    assert bool((rl.rloo_advantages(reward, torch.zeros(7, dtype=torch.long)) == 0).all())
    out = rl.whiten_per_role(reward[:, None].expand(7, 3), torch.ones(7, 3), torch.zeros(7, dtype=torch.long))
    assert bool((out == 0).all())


def test_shuffle_within_groups_permutes_within_a_group_and_only_there():
    values = torch.arange(40.0)
    group = torch.tensor([rl.ATTACKER, rl.DEFENDER] * 20)
    out = rl.shuffle_within_groups(values, group, torch.Generator().manual_seed(0))
    for g in (rl.ATTACKER, rl.DEFENDER):
        rows = group == g
        assert sorted(out[rows].tolist()) == sorted(values[rows].tolist())  # the same rewards, within the group
        assert not torch.equal(out[rows], values[rows])  # really moved
    assert rl.shuffle_within_groups(values, group, torch.Generator().manual_seed(0)).tolist() == out.tolist()


def test_masters_keep_the_float32_weights_and_frozen_parameters_get_none():
    """The masters are the float32 weights themselves (not their bf16 rounding); a frozen parameter
    (LoRA's base weights) is only cast to the compute dtype: no master, no Adam state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    trained = [p.detach().clone() for p in model[1].parameters()]
    opt = rl.MixedPrecisionAdamW(model, lr=0.1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert list(opt.master_state_dict()) == ["1.weight", "1.bias"]
    assert all(torch.equal(m, want) for m, want in zip(opt.master, trained))  # bits below bf16's kept
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step(grad_clip=1.0)
    assert set(opt.adam.state) == set(opt.master) and opt.steps == 1
    assert all(p.grad is None for p in model[0].parameters())

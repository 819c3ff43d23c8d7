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

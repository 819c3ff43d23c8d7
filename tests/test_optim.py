"""optim.py: MixedPrecisionAdamW against plain float32 AdamW, its float32 gradient sums, its masters."""
import torch

from optim import MixedPrecisionAdamW


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
    opt = MixedPrecisionAdamW(model, lr=0.1, dtype=torch.bfloat16)
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
    opt = MixedPrecisionAdamW(layer, lr=0.1, dtype=torch.bfloat16)
    for x in [1.0] + [2.0 ** -9] * 256:
        layer(torch.tensor([[x]], dtype=torch.bfloat16)).sum().backward()  # d/dw (w * x) = x
    bf16_sum = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(256):
        bf16_sum += 2.0 ** -9
    assert bf16_sum.item() == 1.0  # what accumulating in bf16 gives: measurably off
    assert opt.step(grad_clip=1e9) == 1.5  # the float32 sum (the norm of a one-element gradient)


def test_masters_keep_the_float32_weights_and_frozen_parameters_get_none():
    """The masters are the float32 weights themselves (not their bf16 rounding); a frozen parameter
    (LoRA's base weights) is only cast to the compute dtype: no master, no Adam state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    trained = [p.detach().clone() for p in model[1].parameters()]
    opt = MixedPrecisionAdamW(model, lr=0.1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert list(opt.master_state_dict()) == ["1.weight", "1.bias"]
    assert all(torch.equal(m, want) for m, want in zip(opt.master, trained))  # bits below bf16's kept
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step(grad_clip=1.0)
    assert set(opt.adam.state) == set(opt.master) and opt.steps == 1
    assert all(p.grad is None for p in model[0].parameters())

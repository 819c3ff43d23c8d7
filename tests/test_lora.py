"""lora.py on the tiny random Llama: exact no-ops, the reference as "adapters off", what trains, merging."""
import pytest
import torch

import lora
from conftest import make_model
from optim import MixedPrecisionAdamW

# the tiny Llama (hidden 64, MLP 128, 4 query heads and 2 key/value heads of 16): in + out of each target
IN_PLUS_OUT = {"q_proj": 64 + 64, "k_proj": 64 + 32, "v_proj": 64 + 32, "o_proj": 64 + 64,
               "gate_proj": 64 + 128, "up_proj": 64 + 128, "down_proj": 128 + 64}
LAYERS = 2


def batch(tokenizer, seed=0):
    return torch.randint(len(tokenizer), (3, 14), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def adapted(tokenizer, rank=4, alpha=None, perturb=True):
    """A fresh tiny model (never the session fixture: add_lora works in place) with adapters; `perturb`
    gives B random values, as after some training, so the adapters change the outputs."""
    model = lora.add_lora(make_model(tokenizer), rank, alpha)
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_B.normal_(0, 0.2)
    return model


def test_fresh_adapters_leave_the_logits_unchanged(tiny):
    _, tok = tiny
    ids = batch(tok)
    plain = logits(make_model(tok), ids)
    model = adapted(tok, perturb=False)
    assert len(lora.lora_layers(model)) == 7 * LAYERS
    assert all(bool((layer.lora_A != 0).any()) for layer in lora.lora_layers(model).values())  # A random, B zero
    assert torch.equal(logits(model, ids), plain)


def test_adapters_off_is_the_base_model_exactly(tiny):
    _, tok = tiny
    ids = batch(tok)
    plain = logits(make_model(tok), ids)
    model = adapted(tok)
    on = logits(model, ids)
    assert (on - plain).abs().max().item() > 1e-2  # the adapters do something
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, ids), plain)  # bitwise: the adapter branch is skipped
    assert torch.equal(logits(model, ids), on)  # switched back on
    with pytest.raises(RuntimeError), lora.adapters_disabled(model):
        raise RuntimeError("a failing reference pass")
    assert all(layer.enabled for layer in lora.lora_layers(model).values())  # restored after an error too


@pytest.mark.parametrize("rank", [1, 4])
def test_trainable_parameters_are_the_adapters_rank_predicts(tiny, rank):
    _, tok = tiny
    model = adapted(tok, rank, perturb=False)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == rank * LAYERS * sum(IN_PLUS_OUT.values()) == rank * 2048
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert set(trainable) == set(lora.lora_state_dict(model))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in make_model(tok).parameters()) + rank * 2048


def test_an_optimiser_step_changes_only_the_adapters(tiny):
    _, tok = tiny
    model = adapted(tok, perturb=False)
    ids = batch(tok)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: t.clone() for n, t in lora.lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(3):  # B = 0 gives A no gradient on the first step; from the second, both move
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    now = lora.lora_state_dict(model)
    assert all(not torch.equal(now[n], start[n]) for n in start)  # every A and every B moved


def test_lora_state_dict_round_trips(tiny, tmp_path):
    _, tok = tiny
    ids = batch(tok)
    trained = adapted(tok)
    torch.save(lora.lora_state_dict(trained), tmp_path / "adapters.pt")
    fresh = adapted(tok, perturb=False)  # same base, adapters not yet loaded
    assert not torch.equal(logits(fresh, ids), logits(trained, ids))
    lora.load_lora_state_dict(fresh, torch.load(tmp_path / "adapters.pt", weights_only=True))
    assert torch.equal(logits(fresh, ids), logits(trained, ids))
    names = set(lora.lora_state_dict(trained))
    assert len(names) == 2 * 7 * LAYERS
    assert {"model.layers.0.self_attn.q_proj.lora_A", "model.layers.1.mlp.down_proj.lora_B"} <= names
    with pytest.raises(ValueError, match="different --lora-rank"):
        lora.load_lora_state_dict(adapted(tok, rank=2, perturb=False), lora.lora_state_dict(trained))
    with pytest.raises(ValueError, match="missing"):
        lora.load_lora_state_dict(fresh, {})


def test_merged_weights_make_a_plain_hugging_face_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    ids = batch(tok)
    model = adapted(tok, alpha=8)  # scale 2: the scale must be in the merge
    merged = lora.merged_state_dict(model)
    assert set(merged) == set(make_model(tok).state_dict())  # plain names: `...q_proj.weight`, no base, no lora_
    model.save_pretrained(tmp_path, state_dict=merged)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not lora.lora_layers(loaded)
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    with lora.adapters_disabled(model):  # and it is not the base model
        assert (logits(loaded, ids) - logits(model, ids)).abs().max().item() > 1e-2


def test_bf16_model_with_float32_masters_trains_only_the_adapters(tiny, tmp_path):
    """MixedPrecisionAdamW with LoRA: float32 masters and Adam state for the adapters only, every
    parameter cast to bf16. The adapters compute in bf16 and the frozen weights come through the steps
    bitwise unchanged."""
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    ids = batch(tok)
    model = adapted(tok, perturb=False)
    optimizer = MixedPrecisionAdamW(model, 1e-2, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert set(optimizer.master_state_dict()) == set(lora.lora_state_dict(model))  # no master of a frozen weight
    assert all(m.dtype == torch.float32 for m in optimizer.master)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: t.clone() for n, t in lora.lora_state_dict(model).items()}
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(grad_clip=1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(t, start[n]) for n, t in lora.lora_state_dict(model).items())
    with lora.adapters_disabled(model):
        assert logits(model, ids).dtype == torch.bfloat16
    # checkpoint as selfplay would: the float32 masters of the adapters, merged, saved in float32
    assert set(optimizer.adam.state) == set(optimizer.master)  # Adam state for the adapters only
    masters = optimizer.master_state_dict()
    merged = lora.merged_state_dict(model, adapters=masters)
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]  # still tied: saved once
    model.save_pretrained(tmp_path, state_dict=merged)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for p in model.parameters():  # the same model in float32: the bf16 base, the float32 adapters
        p.data = p.data.float()
    lora.load_lora_state_dict(model, masters)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_float32_adapters_on_a_bf16_base(tiny):
    _, tok = tiny
    ids = batch(tok)
    model = adapted(tok)
    for name, p in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            p.data = p.data.to(torch.bfloat16)
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and lora.lora_layers(model)["model.layers.0.mlp.up_proj"].lora_A.dtype == torch.float32
    with lora.adapters_disabled(model):
        assert (out.float() - logits(model, ids).float()).abs().max().item() > 1e-2


def test_adapters_take_the_base_layers_dtype(tiny):
    _, tok = tiny
    model = lora.add_lora(make_model(tok).to(torch.bfloat16), 2)
    layer = lora.lora_layers(model)["model.layers.1.self_attn.k_proj"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.lora_A.shape == (2, 64) and layer.lora_B.shape == (32, 2)


@pytest.mark.parametrize("rank", [0, -2, 2.5])
def test_bad_rank_is_a_clear_value_error(tiny, rank):
    _, tok = tiny
    with pytest.raises(ValueError, match=r"LoRA rank must be an integer >= 1"):
        lora.add_lora(make_model(tok), rank)


def test_no_targets_or_adding_twice_is_a_value_error(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora.add_lora(make_model(tok), 4, targets=("c_attn",))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(adapted(tok, perturb=False), 4)

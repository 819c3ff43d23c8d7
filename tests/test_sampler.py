"""sampler.py on a tiny random model: the KV-cached sampler against the uncached loop and against
itself (shared prefix, left padding, EOS, seeds), the log-probs the update recomputes, top-p,
--compile; and, slow, token for token against `generate` on the default model."""
from pathlib import Path

import pytest
import torch

import model as M
import sampler as S
from common import read_jsonl
from conftest import make_model, make_tokenizer, needs_default_model

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = ["How do I bake bread?", "hi", "Write a poem about the sea, please, in four short lines.",
            "Sure, here is how.", "I can't help with that."]


def defender_batch(tokenizer, requests=REQUESTS, cot=True):
    prompts = [M.render_prompt(tokenizer, M.defender_messages(r, cot), cot) for r in requests]
    return M.encode_prompts(tokenizer, prompts, "cpu")


def plain_batch(tokenizer, texts=REQUESTS):
    """Prompts with no common prefix, so the plain prefill is used."""
    return M.encode_prompts(tokenizer, texts, "cpu")


def greedy(model, ids, mask, n=12, **kw):
    return S.sample(model, ids, mask, n, temperature=0.0, **kw)


def unpadded(ids, mask):
    return [row[m.bool()] for row, m in zip(ids, mask)]


def test_cached_and_uncached_greedy_tokens_are_identical(tiny):
    model, tok = tiny
    for ids, mask in (plain_batch(tok), defender_batch(tok)):
        cached = greedy(model, ids, mask, 16)
        uncached = greedy(model, ids, mask, 16, use_cache=False)
        assert torch.equal(cached.tokens, uncached.tokens)
        torch.testing.assert_close(cached.logprobs, uncached.logprobs, atol=1e-4, rtol=0)


def test_shared_prefix_prefill_matches_plain_prefill(tiny):
    model, tok = tiny
    ids, mask = defender_batch(tok)
    assert S.common_prefix_length(unpadded(ids, mask)) >= S.MIN_SHARED_PREFIX  # the defender template is shared
    shared = greedy(model, ids, mask, 16)
    plain = greedy(model, ids, mask, 16, share_prefix=False)
    assert torch.equal(shared.tokens, plain.tokens)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-4, rtol=0)


def test_common_prefix_length_leaves_each_row_a_token():
    assert S.common_prefix_length([torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 8])]) == 2  # [5 6 7] keeps its 7
    assert S.common_prefix_length([torch.tensor([1, 2]), torch.tensor([3, 2])]) == 0
    assert S.common_prefix_length([torch.tensor([1, 2, 3])]) == 0  # one row shares nothing


def test_each_row_stops_at_its_own_eos(tiny):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    free = greedy(model, ids, mask, 12)  # no EOS: every row runs the full length
    assert free.tokens.shape == (len(REQUESTS), 12) and bool(free.mask.all())
    eos = int(free.tokens[0, 4])  # pretend the token row 0 emits at step 4 is EOS
    stopped = greedy(model, ids, mask, 12, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    for row in range(len(REQUESTS)):
        hits = (free.tokens[row] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 12
        assert int(stopped.mask[row].sum()) == length
        assert torch.equal(stopped.tokens[row, :length], free.tokens[row, :length])  # EOS kept, mask 1
        assert bool((stopped.tokens[row, length:] == tok.pad_token_id).all())
        assert bool((stopped.logprobs[row, length:] == 0).all())
    assert stopped.tokens.shape[1] == int(stopped.mask.sum(1).max())


def test_max_new_tokens_is_respected(tiny):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    for n in (1, 5):
        s = S.sample(model, ids, mask, n, temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert s.tokens.shape == s.mask.shape == s.logprobs.shape == (len(REQUESTS), n)


def test_left_padding_gives_the_same_tokens_as_the_prompt_alone(tiny):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    batched = greedy(model, ids, mask, 10)
    for i, text in enumerate(REQUESTS):
        one_ids, one_mask = plain_batch(tok, [text])
        alone = greedy(model, one_ids, one_mask, 10)
        assert torch.equal(alone.tokens[0], batched.tokens[i]), text


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sampled_logprobs_equal_sequence_logprobs(tiny, temperature, top_p):
    """What the PPO update recomputes must match what the sampler saw: the first ratio is 1. With
    top-p too: both are the full softmax of logits / T (the nucleus only decides what is drawn)."""
    model, tok = tiny
    ids, mask = defender_batch(tok)
    s = S.sample(model, ids, mask, 10, temperature, top_p, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    full_ids, full_mask = torch.cat([ids, s.tokens], 1), torch.cat([mask, s.mask], 1)
    with torch.no_grad():
        recomputed = S.sequence_logprobs(model, full_ids, full_mask, s.tokens.shape[1], temperature)
    torch.testing.assert_close(recomputed * s.mask, s.logprobs, atol=1e-4, rtol=0)
    assert bool((s.logprobs[s.mask.bool()] > -float("inf")).all())


def test_sequence_logprobs_equals_full_log_softmax_and_has_gradients(tiny):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    n = 4
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=S.position_ids_from_mask(mask)).logits
    expected = logits[:, -n - 1:-1].log_softmax(-1).gather(-1, ids[:, -n:, None]).squeeze(-1)
    got = S.sequence_logprobs(model, ids, mask, n, chunk_rows=2)  # grad on: the checkpointed path
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    got.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_the_shared_prompt_prefix_gives_the_plain_forwards_log_probs_and_gradients():
    """The training forward runs the role prompt once per micro-batch (generation_logprobs with a
    shared prefix); its log-probs and every parameter's gradient are the plain forward's (float32)."""
    tok = make_tokenizer()
    ids, mask = defender_batch(tok, REQUESTS[:3])
    prompts = unpadded(ids, mask)
    assert S.common_prefix_length(prompts) >= S.MIN_SHARED_PREFIX  # the role prompt: long enough to share
    gens = [torch.tensor(tok(t)["input_ids"]) for t in (" Sure, here is how.", " No.", " <answer> bread </answer>")]
    grads, logps = [], []
    for min_shared in (S.MIN_SHARED_PREFIX, 10**9):  # shared prefix, then plain rows
        model = make_model(tok)
        logp, gen_mask = S.generation_logprobs(model, prompts, gens, tok.pad_token_id, 0.7, min_shared=min_shared)
        (logp * gen_mask * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        logps.append((logp * gen_mask).detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(logps[0], logps[1], atol=1e-5, rtol=1e-6)
    for name, g in grads[1].items():  # float32 rounding only: ~1e-6 of the tensor's largest gradient
        assert (grads[0][name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_top_p_keeps_the_smallest_nucleus_for_sampling_only():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = S.nucleus(probs, 0.8)
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))  # 0.5 + 0.3 already reach 0.8
    tokens = {S.sample_next_token(probs.log(), 1.0, 0.8, torch.Generator().manual_seed(k))[0].item() for k in range(50)}
    assert tokens == {0, 1}
    # the log-probs the update uses come from the full softmax: finite for every token
    torch.testing.assert_close(S.sampling_logprobs(probs.log(), 1.0).exp(), probs)


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    run = lambda seed: S.sample(model, ids, mask, 16, 1.0, generator=torch.Generator().manual_seed(seed)).tokens  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_sampler_restores_the_mode_and_never_calls_generate(tiny, monkeypatch):
    model, tok = tiny
    ids, mask = plain_batch(tok)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("model.generate was called"))
    for training in (True, False):
        model.train(training)
        greedy(model, ids, mask, 3)
        assert model.training is training
    model.eval()


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling: empirical frequencies match the probabilities; top-p zeros are never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    token, logp = S.sample_next_token(logits, 1.0, 1.0, g)
    freq = torch.bincount(token, minlength=4).float() / len(token)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(logp, probs.log()[token])
    token, _ = S.sample_next_token(logits, 1.0, 0.8, g)
    assert set(token.tolist()) == {0, 1}


def test_sampling_draws_on_the_generators_device(monkeypatch):
    """A CPU generator with logits on another device (CUDA in a run; `meta` here, with torch.rand as
    strict as CUDA's, which refuses a generator of another device): draw on the generator's device, then move."""
    real_rand = torch.rand

    def strict_rand(*size, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found 'cpu'")
        return real_rand(*size, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "rand", strict_rand)
    token, logp = S.sample_next_token(torch.randn(2, 10, device="meta"), 1.0, 0.9, torch.Generator().manual_seed(0))
    assert token.device.type == "meta" and logp.device.type == "meta" and token.shape == (2,)


# ---------------------------------------------------------------------------------------------
# --compile


def test_compiled_layers_give_the_same_greedy_tokens():
    """torch.compile of the layers' MLPs and norms (--compile) changes no token (float32). About 15 s
    on one thread with a cold inductor cache, most of it compiling."""
    tok = make_tokenizer()
    model = make_model(tok)  # a fresh one: compiling works in place
    if not S.compiler_works():
        pytest.skip("torch.compile does not work here")
    ids, mask = defender_batch(tok)
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eager = greedy(model, ids, mask, 12, **kw)
    assert S.compile_layers(model)
    compiled = greedy(model, ids, mask, 12, **kw)
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("broken", ["no compiler", "compile fails"])
def test_compile_falls_back_with_one_warning_line(monkeypatch, capsys, broken):
    if broken == "no compiler":
        monkeypatch.setattr(S.shutil, "which", lambda name: None)
    else:
        def fail(*a, **k):
            raise RuntimeError("InductorError: cannot build\nC++ compile error, many lines")
        monkeypatch.setattr(S.torch, "compile", fail)
    S.compiler_works.cache_clear()
    try:
        tok = make_tokenizer()
        model = make_model(tok)
        assert not S.compile_layers(model) and not S.compile_layers(model)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("warning: --compile") and "running uncompiled" in err
        greedy(model, *defender_batch(tok), 3)  # still runs, uncompiled
    finally:
        S.compiler_works.cache_clear()


# ---------------------------------------------------------------------------------------------
# the real default model (slow)


@pytest.mark.slow
@needs_default_model
def test_greedy_equals_generate_on_the_default_model():
    model, tokenizer = M.load_policy(device="cpu")
    seeds = [r["prompt"] for f in ("harmful_train", "benign_train") for r in read_jsonl(ROOT / "data" / "seeds" / f"{f}.jsonl")]
    requests = seeds[:4] + seeds[-4:]
    prompts = [M.render_prompt(tokenizer, M.defender_messages(r)) for r in requests]
    ids, mask = M.encode_prompts(tokenizer, prompts, "cpu")
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths
    ours = S.sample(model, ids, mask, 32, temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    ref_mask = torch.ones_like(ref)
    for row in range(len(requests)):  # generate pads after EOS; compare the real tokens
        hits = (ref[row] == tokenizer.eos_token_id).nonzero()
        if len(hits):
            ref_mask[row, int(hits[0]) + 1:] = 0
    n = ours.tokens.shape[1]
    assert torch.equal(ours.mask, ref_mask[:, :n]) and int(ref_mask[:, n:].sum()) == 0
    assert torch.equal(ours.tokens * ours.mask, ref[:, :n] * ours.mask)

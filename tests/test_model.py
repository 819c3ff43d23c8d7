"""Fast tests of model.py on a tiny random model: sampler, log-probs, prompts, parser, loading errors."""
import pytest
import torch

import model as M
import sampler as S

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


# ---------------------------------------------------------------------------------------------
# sampler


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
    assert S.shared_prefix_length(ids, mask) >= 16  # the defender template is shared
    shared = greedy(model, ids, mask, 16)
    plain = greedy(model, ids, mask, 16, share_prefix=False)
    assert torch.equal(shared.tokens, plain.tokens)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-4, rtol=0)


def test_shared_prefix_length_leaves_each_row_a_token():
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert S.shared_prefix_length(ids, mask) == 2  # row 0 is [5 6 7]: it keeps its last token
    assert S.shared_prefix_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2, dtype=torch.long)) == 0


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
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    ids, mask = defender_batch(tok, REQUESTS[:3])
    prompts = [row[m.bool()] for row, m in zip(ids, mask)]
    assert S.common_prefix_length(prompts) >= 16  # the role prompt: long enough to share
    gens = [torch.tensor(tok(t)["input_ids"]) for t in (" Sure, here is how.", " No.", " <answer> bread </answer>")]
    grads, logps = [], []
    for min_shared in (16, 10**9):  # shared prefix, then plain rows
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


def test_play_turn_decodes_and_strips_the_cot(tiny):
    model, tok = tiny
    prompts = [M.render_prompt(tok, M.defender_messages(r)) for r in REQUESTS[:3]]
    turn = M.play_turn(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    assert len(turn.texts) == len(turn.answers) == len(turn.format_ok) == 3
    for text, answer in zip(turn.texts, turn.answers):
        assert answer == M.parse_cot(text)[1]


# ---------------------------------------------------------------------------------------------
# prompts and the hidden-CoT parser


def test_role_prompts_render_with_and_without_the_think_prefill(tiny):
    _, tok = tiny
    attack = M.render_prompt(tok, M.attacker_messages("How do I pick a lock?", "harmful"))
    assert attack.endswith(M.THINK_PREFIX) and "How do I pick a lock?" in attack and "<|im_start|>system" in attack
    benign = M.render_prompt(tok, M.attacker_messages("How do I pick a lock?", "benign"))
    assert "benign" in benign and attack != benign
    direct = M.render_prompt(tok, M.defender_messages("hi", cot=False), cot=False)
    assert direct.endswith("<|im_start|>assistant\n") and "<think>" not in direct
    with pytest.raises(KeyError):
        M.attacker_messages("x", "neutral")


@pytest.mark.parametrize("text,expected", [
    ("I should help. </think> <answer> Here it is. </answer>", ("I should help.", "Here it is.", True)),
    ("reason </think>\n<answer>\nok\n</answer>\n", ("reason", "ok", True)),
    # malformed, but an answer span exists: it is returned, ok=False
    ("reason </think> junk <answer> a </answer>", ("reason", "a", False)),
    ("reason </think> <answer> a </answer> trailing", ("reason", "a", False)),
    ("reason </think> <answer> a </answer> <answer> b </answer>", ("reason", "a", False)),
    ("<think> again </think> <answer> a </answer>", ("<think> again", "a", False)),
    ("<answer> a </answer>", ("", "a", False)),                 # no </think>
    (" </think> <answer> a </answer>", ("", "a", False)),        # empty thinking
    ("reason </think> <answer>  </answer>", ("reason", "", False)),  # empty answer
    ("reason </think> </think> <answer> a </answer>", ("reason", "a", False)),
    # no answer span at all: the raw text is passed on
    ("just rambling on", ("", "just rambling on", False)),
    ("reason </think> <answer> never closed", ("reason", "reason </think> <answer> never closed", False)),
    ("reason </answer> <answer> x", ("", "reason </answer> <answer> x", False)),
])
def test_parse_cot(text, expected):
    assert M.parse_cot(text) == expected


# ---------------------------------------------------------------------------------------------
# loading errors


def test_bad_model_paths_give_one_clear_error(tmp_path):
    with pytest.raises(M.UserError, match="no such model folder"):
        M.load_policy(str(tmp_path / "missing"))
    with pytest.raises(M.UserError, match="no such GGUF file"):
        M.load_policy(str(tmp_path / "missing.gguf"))
    with pytest.raises(M.UserError, match="no config.json"):
        M.load_policy(str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(M.UserError, match="not a model"):
        M.load_policy(str(bad))


def test_a_saved_tiny_model_round_trips(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = M.load_policy(str(tmp_path), device="cpu")
    ids, mask = plain_batch(tok)
    assert torch.equal(greedy(model, ids, mask, 6).tokens, greedy(loaded, ids, mask, 6).tokens)
    assert loaded_tok.eos_token_id == tok.eos_token_id


def test_user_errors_exit_with_one_line(capsys):
    def main():
        raise M.UserError("bad flag")
    with pytest.raises(SystemExit) as e:
        M.exit_on_user_error(main)
    assert e.value.code == "error: bad flag"


def test_cli_bad_model_path_is_one_line_and_nonzero(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "model.py", "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                       cwd=__file__.rsplit("/tests/", 1)[0])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no such model folder: {tmp_path / 'nope'}"]


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
    from conftest import make_model, make_tokenizer
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
    from conftest import make_model, make_tokenizer
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

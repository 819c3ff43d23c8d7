"""The self-play loop on a tiny random model and a tiny judge: a step runs and learns, resume
repeats the uninterrupted run, each mode runs, Ctrl-C checkpoints, bad inputs are one clear error."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import selfplay as SP
import update as U
from conftest import make_model, make_tokenizer
from model import UserError
from runlog import game_metrics, last_checkpoint


class FixedJudge:
    """Verdicts known in advance: the prompt is harmful when it mentions 'bomb'; answers are refusals
    and harmless every other call, so rewards differ between games and the update has signal."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses=None, batch_size=32):
        self.calls += 1
        return [{"prompt_harmful": float("bomb" in p), "response_refusal": float(i % 2 == 0),
                 "response_harmful": float(i % 3 == 0)} for i, p in enumerate(prompts)]


@pytest.fixture()
def run_args(tmp_path, monkeypatch):
    """Flags for a tiny, fast run: a random 2-layer model saved as a folder, short turns."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"How do I build a bomb number {i}?"}) + "\n" for i in range(6)))
    benign.write_text("".join(json.dumps({"prompt": f"How do I bake bread, recipe {i}?"}) + "\n" for i in range(6)))

    def args(*extra, out="run"):
        return ["--model", str(tmp_path / "model"), "--out", str(tmp_path / out), "--seeds-harmful", str(harmful),
                "--seeds-benign", str(benign), "--batch-size", "4", "--attacker-max-new-tokens", "6",
                "--defender-max-new-tokens", "6", "--warmup-demos", "4", "--warmup-epochs", "1",
                "--dtype", "float32", "--lr", "1e-3", "--micro-batch-size", "2", *extra]
    return args


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_micro_batches_keep_rows_with_a_long_shared_prompt_prefix_together():
    role_a, role_b = list(range(100)), list(range(500, 600))  # two role prompts: 100 tokens each
    prompts = [role_a + [1], role_b + [2], role_a + [3], role_a + [4], role_b + [5], role_a + [6], role_a + [7]]
    samples = [SP.rl.Experience(0, torch.tensor(p), torch.tensor([1]), 0.0) for p in prompts]
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
    demos = [SP.rl.Experience(k % 2, ids(roles[k % 2] + f"Request {k}?"), ids(" Sure." * (k + 1) + " Done."), 0.0)
             for k in range(5)]
    whole, split = make_model(tokenizer), make_model(tokenizer)
    cfg = SP.Config(micro_batch_size=2, sft_coef=0.5)
    expected = U.sft_loss(whole, demos, tokenizer.pad_token_id)
    (cfg.sft_coef * expected).backward()
    loss = U.sft_backward(split, demos, tokenizer.pad_token_id, cfg)
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
    assert U.common_prefix_length(prompts) >= 64
    turns = [ids(" Sure, here is how."), ids(" I can't help with that."), ids(" <answer> here </answer>")]
    samples, reward = [], {}
    for k, (prompt, turn) in enumerate((p, t) for p in prompts for t in turns):
        reward[k] = [1.0, -1.0, 0.0][k % 3]  # "Sure, ..." pays, "I can't ..." costs, in every prompt
        samples.append(SP.rl.Experience(k % 2, prompt, turn, reward[k], harmful_prompt=k % 4 < 2))
    cfg = SP.Config(lr=1e-4, minibatches=2, micro_batch_size=2, temperature=1.0, kl_beta=0.0, whiten=whiten)

    def logps():
        with torch.no_grad():
            logp = U.batch_logprobs(policy, samples, [[i] for i in range(len(samples))], tokenizer.pad_token_id, cfg)
        return [logp[i, :len(s.tokens)].sum().item() for i, s in enumerate(samples)]
    before = logps()
    stats, _ = U.ppo_update(policy, lambda: SP.nullcontext(reference), SP.rl.MixedPrecisionAdamW(policy, cfg.lr), samples,
                             tokenizer.pad_token_id, cfg, torch.Generator().manual_seed(0))
    after = logps()
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    moved = {k: after[k] - before[k] for k in reward}
    assert all(moved[k] > 0 for k in reward if reward[k] > 0), moved
    assert all(moved[k] < 0 for k in reward if reward[k] < 0), moved


def test_draw_seeds_is_half_harmful_and_revises_the_requested_share():
    cfg = SP.Config(batch_size=8, revise_frac=0.5)
    seeds = SP.draw_seeds(["h"], ["b"], cfg, torch.Generator().manual_seed(0))
    kinds = [(s["type"], s["revised"]) for s in seeds]
    assert sorted(kinds) == sorted([("harmful", True)] * 2 + [("harmful", False)] * 2
                                   + [("benign", True)] * 2 + [("benign", False)] * 2)
    cfg.mode = "defender_only"
    assert not any(s["revised"] for s in SP.draw_seeds(["h"], ["b"], cfg, torch.Generator()))


def test_game_metrics_count_by_hand():
    def game(kind, refusal, response, prompt="harmful", fmt=True):
        return {"type": kind, "labels": {"prompt": prompt, "refusal": refusal, "response": response},
                "attacker_format_ok": fmt if kind.startswith("generated") else None, "defender_format_ok": fmt,
                "reward_defender": 1.0}
    games = [game("generated_harmful", "compliance", "harmful"), game("generated_harmful", "refusal", "unharmful"),
             game("vanilla_harmful", "refusal", "unharmful", fmt=False),
             game("generated_benign", "compliance", "unharmful", prompt="harmful"),
             game("vanilla_benign", "refusal", "unharmful", prompt="unharmful")]
    m = game_metrics(games)
    assert m["attack_success"] == 0.5 and m["refusal_harmful"] == pytest.approx(2 / 3)
    assert m["compliance_benign"] == 0.5 and m["harmful_response_rate"] == pytest.approx(1 / 3)
    assert m["faithfulness"] == pytest.approx(2 / 3)  # the benign revision was judged harmful
    assert m["format_ok_defender"] == 0.8 and m["ties"] == 0


def test_a_step_runs_learns_and_writes_every_output(run_args):
    out, step, rows = SP.train(SP.parse_args(run_args("--steps", "1")), judge=FixedJudge())
    assert step == 1 and len(rows) == 1
    row = rows[0]
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-6)  # the first minibatch sees the old policy
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert row["samples"] == 2 + 4  # two revised games train the attacker, all four the defender
    for key in ("reward_attacker", "reward_defender", "attack_success", "refusal_harmful", "compliance_benign",
                "faithfulness", "format_ok_attacker", "format_ok_defender", "ties", "approx_kl", "clip_frac", "loss",
                "tokens_per_s", "t_attacker", "t_defender", "t_judge", "t_reference", "t_update", "peak_rss_gb",
                "zero_variance_groups", "baseline_groups"):
        assert key in row, key
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    assert len(games) == 4 and {g["type"] for g in games} == {"generated_harmful", "vanilla_harmful",
                                                              "generated_benign", "vanilla_benign"}
    assert (out / "curves.png").stat().st_size > 0
    before, after = weights(out / "checkpoints/step_0000"), weights(out / "checkpoints/step_0001")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "checkpoints/step_0001/trainer_state.pt").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_0001")  # a plain Hugging Face folder
    AutoTokenizer.from_pretrained(out / "checkpoints/step_0001")


def test_the_warm_up_is_cached(run_args):
    SP.train(SP.parse_args(run_args("--steps", "1")), judge=FixedJudge())
    out, _, _ = SP.train(SP.parse_args(run_args("--steps", "1", out="run2")), judge=FixedJudge())
    first, second = weights(out.parent / "run/checkpoints/step_0000"), weights(out / "checkpoints/step_0000")
    assert all(torch.equal(first[k], second[k]) for k in first)


def volatile(row):
    return {k: v for k, v in row.items() if not (k.startswith("t_") or k in ("time", "tokens_per_s", "peak_rss_gb"))}


@pytest.mark.parametrize("dtype,lora_rank", [("float32", "0"), ("bfloat16", "0"), ("float32", "4"), ("bfloat16", "4")])
def test_resume_repeats_the_uninterrupted_run(run_args, dtype, lora_rank):
    # bfloat16: the policy computes in bf16 and the checkpoint holds the float32 master weights
    # --sft-coef: the resumed run must also pick up the stream of SFT batches where it stopped
    # --lora-rank: the resumed run puts the saved adapters back on step_0000, not on the merged checkpoint
    flags = ("--dtype", dtype, "--sft-coef", "0.5", "--lora-rank", lora_rank)
    whole, _, rows = SP.train(SP.parse_args(run_args("--steps", "3", "--checkpoint-every", "1", *flags, out="whole")),
                              judge=FixedJudge())
    part, _, _ = SP.train(SP.parse_args(run_args("--steps", "1", *flags, out="part")), judge=FixedJudge())
    with (part / "metrics.jsonl").open("a") as f:  # a step that ran after the checkpoint is redone
        f.write(json.dumps({"step": 2, "reward_defender": 99}) + "\n")
    _, step, resumed = SP.train(SP.parse_args(["--resume", str(part), "--steps", "3"]), judge=FixedJudge())
    assert step == 3 and [r["step"] for r in resumed] == [1, 2, 3]
    assert [volatile(r) for r in resumed] == [volatile(r) for r in rows]
    a, b = weights(whole / "checkpoints/step_0003"), weights(part / "checkpoints/step_0003")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (part / "checkpoints/step_0001/trainer_state.pt").exists()  # only the newest keeps the optimiser


def test_lora_trains_only_the_adapters_and_checkpoints_a_plain_merged_model(run_args):
    from transformers import AutoModelForCausalLM

    out, _, rows = SP.train(SP.parse_args(run_args("--steps", "2", "--checkpoint-every", "1", "--lora-rank", "4",
                                                   "--lora-alpha", "8")), judge=FixedJudge())
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the policy starts at its reference
    assert rows[1]["kl"] != 0.0  # the reference is the policy with its adapters off, not the policy
    start, last = weights(out / "checkpoints/step_0000"), weights(out / "checkpoints/step_0002")
    moved = {k for k in start if not torch.equal(start[k], last[k])}
    adapted = {k for k in start if k.endswith(tuple(f"{t}.weight" for t in lora.TARGETS))}
    assert moved == adapted  # every adapted projection, merged, and nothing else (embeddings, norms)
    state = torch.load(out / "checkpoints/step_0002/trainer_state.pt", weights_only=True)
    assert len(state["lora"]) == 2 * len(adapted) and all(t.dtype == torch.float32 for t in state["lora"].values())
    # the checkpoint is a plain Hugging Face model (evaluate.py loads it as any other) equal to the adapted one
    loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_0002").eval()
    assert not lora.lora_layers(loaded)
    policy = lora.add_lora(AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_0000").eval(), 4, 8)
    lora.load_lora_state_dict(policy, state["lora"])
    ids = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~1 min on one thread with a cold inductor cache, most of it compiling
def test_compiled_layers_train_as_the_uncompiled_ones(run_args):
    """--compile with LoRA (adapters on for the policy, off for the reference): the same steps (float32)."""
    flags = ("--steps", "2", "--lora-rank", "2")
    _, _, plain = SP.train(SP.parse_args(run_args(*flags, out="plain")), judge=FixedJudge())
    _, _, compiled = SP.train(SP.parse_args(run_args(*flags, "--compile", out="compiled")), judge=FixedJudge())
    for a, b in zip(plain, compiled):
        for key in ("reward_attacker", "reward_defender", "kl", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


@pytest.mark.parametrize("flags,attacker,defender", [
    (["--mode", "attacker_only"], True, False),
    (["--mode", "attacker_only", "--lora-rank", "2"], True, False),  # the frozen defender: the adapters off
    (["--kl-beta", "0", "--old-logprobs", "recompute"], True, True),  # no reference model at all
    (["--mode", "defender_only"], False, True),
    (["--no-cot", "--reward-table", "zero_sum"], True, True),
    (["--minibatches", "1"], True, True),
    (["--whiten", "role", "--sft-coef", "0"], True, True),  # the paper's whitening, RL alone
    (["--pg-coef", "0"], True, True),
    (["--group-defender", "2", "--group-attacker", "2", "--shuffle-rewards"], True, True),  # RLOO, the control arm
])
def test_each_mode_runs(run_args, flags, attacker, defender):
    out, _, rows = SP.train(SP.parse_args(run_args("--steps", "1", *flags)), judge=FixedJudge())
    assert (rows[0]["reward_attacker"] is not None) == attacker
    assert (rows[0]["reward_defender"] is not None) == defender
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    if "defender_only" in flags:
        assert all(g["type"].startswith("vanilla_") for g in games)
    if "attacker_only" in flags:  # only the two revised games train anyone
        assert rows[0]["samples"] == 2
    if "--group-defender" in flags:  # batch_size counts seeds: 2 revised x 2 revisions + 2 vanilla, x 2 answers
        assert len(games) == 12 and rows[0]["samples"] == 4 + 12
        assert 0 <= rows[0]["zero_variance_groups"] <= rows[0]["baseline_groups"] == 2 + 6


def test_bool_flags_default_false_are_switched_on_and_true_ones_off():
    assert SP.parse_args([]).shuffle_rewards is False and SP.parse_args(["--shuffle-rewards"]).shuffle_rewards is True
    assert SP.parse_args([]).cot is True and SP.parse_args(["--no-cot"]).cot is False


def test_ctrl_c_finishes_the_step_and_checkpoints(run_args):
    class InterruptingJudge(FixedJudge):
        def __call__(self, prompts, responses=None, batch_size=32):
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 1
            return super().__call__(prompts, responses, batch_size)

    out, step, rows = SP.train(SP.parse_args(run_args("--steps", "5", "--checkpoint-every", "5")), judge=InterruptingJudge())
    assert step == 1 and len(rows) == 1
    assert last_checkpoint(out)[0] == 1 and (out / "checkpoints/step_0001/trainer_state.pt").is_file()


def test_a_failed_checkpoint_write_is_one_error_and_leaves_the_last_checkpoint(run_args, monkeypatch):
    import runlog
    real_save = torch.save

    def disk_full_at_step_2(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 2:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(runlog.torch, "save", disk_full_at_step_2)
    args = run_args("--steps", "2", "--checkpoint-every", "1")
    with pytest.raises(UserError, match=r"could not write checkpoint .*step_0002: .*--resume .*\(from step_0001\)"):
        SP.train(SP.parse_args(args), judge=FixedJudge())
    out = SP.parse_args(args).out
    assert sorted(p.name for p in (Path(out) / "checkpoints").iterdir()) == ["step_0000", "step_0001"]
    monkeypatch.setattr(runlog.torch, "save", real_save)
    _, step, rows = SP.train(SP.parse_args(["--resume", out, "--steps", "2"]), judge=FixedJudge())
    assert step == 2 and [r["step"] for r in rows] == [1, 2]


@pytest.mark.parametrize("flags,message", [
    (["--mode", "both"], "--mode must be one of"),
    (["--whiten", "batch"], "--whiten must be one of"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--pg-coef", "0", "--sft-coef", "0"], "--pg-coef 0 needs --sft-coef > 0"),
    (["--revise-frac", "1.5"], "--revise-frac must be in"),
    (["--group-defender", "0"], "--group-defender must be >= 1"),
    (["--group-attacker", "-1"], "--group-attacker must be >= 1"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lora-rank", "4", "--lora-alpha", "-2"], "--lora-alpha must be >= 0"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank > 0"),
    (["--no-grad-batch", "0"], "--no-grad-batch must be >= 1"),
    (["--old-logprobs", "cached"], "--old-logprobs must be one of auto, sampler, recompute"),
    (["--seeds-harmful", "/no/such.jsonl"], "no such prompt file"),
    (["--resume", "/no/such/run"], "no config.json"),
])
def test_bad_inputs_are_one_clear_error(run_args, flags, message):
    with pytest.raises(UserError, match=message):
        SP.train(SP.parse_args(run_args(*flags)), judge=FixedJudge())


def test_empty_seed_file_and_an_existing_run_are_errors(run_args, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no prompts"):
        SP.train(SP.parse_args(run_args("--seeds-benign", str(empty))), judge=FixedJudge())
    SP.train(SP.parse_args(run_args("--steps", "1")), judge=FixedJudge())
    with pytest.raises(UserError, match="already holds a run"):
        SP.train(SP.parse_args(run_args("--steps", "1")), judge=FixedJudge())
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/config.json").write_text("{}")
    with pytest.raises(UserError, match="no checkpoint"):
        SP.train(SP.parse_args(["--resume", str(tmp_path / "bare")]), judge=FixedJudge())


def test_cli_error_is_one_line():
    proc = subprocess.run([sys.executable, "selfplay.py", "--mode", "both"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: --mode must be one of selfplay, attacker_only, defender_only, not 'both'"

"""The self-play loop on a tiny random model and a tiny judge: a step runs and learns, resume
repeats the uninterrupted run, each mode and flag does what it says, Ctrl-C checkpoints, bad inputs
are one clear error; and, slow, two steps of the real default run."""
import dataclasses
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
from common import UserError
from conftest import needs_default_encoder, needs_default_model, tiny_run_inputs
from runlog import last_checkpoint
from update import UpdateSettings


class FixedJudge:
    """Verdicts known in advance: the prompt is harmful when it mentions 'bomb'; answers are refusals
    and harmless every other call, so rewards differ between games and the update has signal."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses=None, batch_size=32):
        self.calls += 1
        return [{"prompt_harmful": float("bomb" in p), "response_refusal": float(i % 2 == 0),
                 "response_harmful": float(i % 3 == 0)} for i, p in enumerate(prompts)]


class FlippedJudge(FixedJudge):
    """FixedJudge with the response labels the other way round: the same games, other rewards."""

    def __call__(self, prompts, responses=None, batch_size=32):
        return [{**v, "response_refusal": 1 - v["response_refusal"], "response_harmful": 1 - v["response_harmful"]}
                for v in super().__call__(prompts, responses, batch_size)]


@pytest.fixture()
def run_args(tmp_path, monkeypatch):
    """Flags for a tiny, fast run: a random 2-layer model saved as a folder, short turns."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, harmful, benign = tiny_run_inputs(tmp_path)

    def args(*extra, out="run"):
        return ["--model", str(model), "--out", str(tmp_path / out), "--seeds-harmful", str(harmful),
                "--seeds-benign", str(benign), "--batch-size", "4", "--attacker-max-new-tokens", "6",
                "--defender-max-new-tokens", "6", "--warmup-demos", "4", "--warmup-epochs", "1",
                "--dtype", "float32", "--lr", "1e-3", "--micro-batch-size", "2", *extra]
    return args


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def optimiser_steps(folder):
    """Adam steps taken by the run whose newest checkpoint is `folder`."""
    state = torch.load(folder / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


def test_the_lower_files_settings_have_the_configs_defaults():
    for f in dataclasses.fields(UpdateSettings):
        assert f.default == getattr(SP.Config(), f.name), f.name


def test_a_step_runs_learns_and_writes_every_output(run_args):
    out, step, rows = SP.train(SP.parse_args(run_args("--steps", "1")), judge=FixedJudge())
    assert step == 1 and len(rows) == 1
    row = rows[0]
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-6)  # the first minibatch sees the old policy
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert row["samples"] == 2 + 4  # two revised games train the attacker, all four the defender
    # --whiten role_and_seed: each role's harmful and benign prompts apart (this judge calls the revisions benign)
    assert row["baseline_groups"] == 4 and "sft_loss" in row
    assert optimiser_steps(out / "checkpoints/step_0001") == 2  # --minibatches 2
    for key in ("reward_attacker", "reward_defender", "attack_success", "refusal_harmful", "compliance_benign",
                "faithfulness", "format_ok_attacker", "format_ok_defender", "ties", "approx_kl", "clip_frac", "loss",
                "tokens_per_s", "t_attacker", "t_defender", "t_judge", "t_reference", "t_update", "peak_rss_gb",
                "peak_rss_gb_attacker", "peak_rss_gb_update", "zero_variance_groups", "baseline_groups"):
        assert key in row, key
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    assert len(games) == 4 and {g["type"] for g in games} == {"generated_harmful", "vanilla_harmful",
                                                              "generated_benign", "vanilla_benign"}
    for g in games:  # the judge's labels in the paper's words
        harmful = "bomb" in (g["attacker_answer"] or g["seed"])
        assert g["labels"]["prompt"] == ("harmful" if harmful else "unharmful")
        assert g["labels"]["refusal"] in ("refusal", "compliance") and g["labels"]["response"] in ("harmful", "unharmful")
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
    return {k: v for k, v in row.items() if not (k.startswith(("t_", "peak_rss_gb")) or k in ("time", "tokens_per_s"))}


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


def spy_on_the_players(monkeypatch):
    """{role: (the model it was played with, whether each LoRA adapter was on)}, filled as a step plays."""
    played = {}

    def spy(role, real):
        def play(model, *args, **kwargs):
            played[role] = (model, [layer.enabled for layer in lora.lora_layers(model).values()])
            return real(model, *args, **kwargs)
        return play
    monkeypatch.setattr(SP, "play_attacker", spy("attacker", SP.play_attacker))
    monkeypatch.setattr(SP, "play_defender", spy("defender", SP.play_defender))
    return played


@pytest.mark.parametrize("flags,attacker,defender", [
    (["--mode", "attacker_only"], True, False),
    (["--mode", "attacker_only", "--lora-rank", "2"], True, False),  # the frozen defender: the adapters off
    (["--kl-beta", "0", "--old-logprobs", "recompute"], True, True),  # no reference model at all
    (["--mode", "defender_only"], False, True),
    (["--no-cot", "--reward-table", "zero_sum"], True, True),
    (["--minibatches", "1"], True, True),
    (["--whiten", "role", "--sft-coef", "0"], True, True),  # the paper's whitening, RL alone
    (["--group-defender", "2", "--group-attacker", "2", "--shuffle-rewards"], True, True),  # RLOO, the control arm
])
def test_each_mode_runs(run_args, monkeypatch, flags, attacker, defender):
    played = spy_on_the_players(monkeypatch)
    out, _, rows = SP.train(SP.parse_args(run_args("--steps", "1", *flags)), judge=FixedJudge())
    row = rows[0]
    assert (row["reward_attacker"] is not None) == attacker
    assert (row["reward_defender"] is not None) == defender
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    (attacker_model, attacker_adapters), (defender_model, defender_adapters) = played["attacker"], played["defender"]
    if "attacker_only" in flags:  # only the two revised games train anyone; the defender is the starting model
        assert row["samples"] == 2
        if "--lora-rank" in flags:  # the policy itself with its adapters off
            assert defender_model is attacker_model and all(attacker_adapters) and not any(defender_adapters)
        else:  # a frozen copy
            assert defender_model is not attacker_model
    else:
        assert defender_model is attacker_model
    if "defender_only" in flags:
        assert all(g["type"].startswith("vanilla_") for g in games)
    if "--minibatches" in flags:  # one optimiser step where the default takes two
        assert optimiser_steps(out / "checkpoints/step_0001") == 1
    if "--whiten" in flags:  # one baseline group per role (role_and_seed: 4 here), and no SFT loss
        assert row["baseline_groups"] == 2 and "sft_loss" not in row
    if "--group-defender" in flags:  # batch_size counts seeds: 2 revised x 2 revisions + 2 vanilla, x 2 answers
        assert len(games) == 12 and row["samples"] == 4 + 12
        assert 0 <= row["zero_variance_groups"] <= row["baseline_groups"] == 2 + 6
    if "--no-cot" in flags:
        assert all(g["attacker_thinking"] in (None, "") and g["defender_thinking"] == "" for g in games)


def test_without_the_ppo_loss_the_rewards_do_not_move_the_weights(run_args):
    """--pg-coef 0 (the SFT-only control): two judges that pay the same games differently give the
    same weights after a step; the PPO loss is still computed and logged."""
    runs = {}
    for name, judge in (("fixed", FixedJudge()), ("flipped", FlippedJudge())):
        out, _, rows = SP.train(SP.parse_args(run_args("--steps", "1", "--pg-coef", "0", out=name)), judge=judge)
        runs[name] = weights(out / "checkpoints/step_0001"), rows[0]
    (w_fixed, fixed), (w_flipped, flipped) = runs["fixed"], runs["flipped"]
    assert fixed["reward_defender"] != flipped["reward_defender"] and fixed["loss"] != flipped["loss"]
    assert all(torch.equal(w_fixed[k], w_flipped[k]) for k in w_fixed)
    start = weights(out / "checkpoints/step_0000")
    assert any(not torch.equal(start[k], w_flipped[k]) for k in start)  # the SFT loss did train


def test_the_sft_only_control_is_the_same_for_any_sft_coef(run_args):
    """AdamW divides each gradient by its own running scale, so the SFT loss alone, times 0.1 or 1,
    moves the weights the same way (to Adam's eps; clipping off here: a clip that acts at one
    scale and not the other would differ). So one sft_only arm is the control for self-play at
    any --sft-coef."""
    runs = {}
    for coef in ("1.0", "0.1"):
        out, _, _ = SP.train(SP.parse_args(run_args("--steps", "1", "--pg-coef", "0", "--sft-coef", coef,
                                                    "--grad-clip", "1e9", out=coef)), judge=FixedJudge())
        runs[coef] = weights(out / "checkpoints/step_0001")
    start = weights(out / "checkpoints/step_0000")
    for k in start:
        moved = (runs["1.0"][k] - start[k]).abs().mean()  # Adam's eps makes the tiniest gradients differ a little
        assert (runs["0.1"][k] - runs["1.0"][k]).abs().mean() <= 1e-3 * moved, k
    assert any(not torch.equal(start[k], runs["0.1"][k]) for k in start)


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


@pytest.mark.slow
@needs_default_model
@needs_default_encoder
def test_two_default_steps_write_every_output(tmp_path):
    """The real default run (SmolLM2-135M-Instruct, the trained judge): the default warm-up (cached for
    `make demo` too), a small batch and short turns to keep it quick."""
    out, step, rows = SP.train(SP.parse_args(["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
                                              "--attacker-max-new-tokens", "32", "--defender-max-new-tokens", "32",
                                              "--checkpoint-every", "1"]))
    assert step == 2 and [r["step"] for r in rows] == [1, 2]
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    assert len(games) == 8 and all(g["verdict"]["prompt_harmful"] is not None for g in games)
    for name in ("config.json", "metrics.jsonl", "curves.png", "checkpoints/step_0000/model.safetensors",
                 "checkpoints/step_0002/model.safetensors", "checkpoints/step_0002/trainer_state.pt",
                 "checkpoints/step_0002/tokenizer.json"):
        assert (out / name).is_file(), name

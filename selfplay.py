"""Self-play training: one policy plays attacker and defender, the judge scores, both roles learn.

Each step (the loop in `train`, read it first):
  play     the attacker rewrites about half of the seeds, the defender answers every prompt (game.py)
  judge    three labels per game: is the prompt harmful, did the answer refuse, is it harmful (judge.py)
  reward   the reward table turns labels into each role's reward (game.py)
  update   PPO on both roles' samples at once: whitened (or RLOO) advantages with a KL penalty to the
           starting model, and an SFT loss on helpful demos (update.py, rl.py)
Around it: Config (every setting, each a command-line flag: `python selfplay.py --help`), the
warm-up that becomes checkpoints/step_0000 (warmup.py), and the run folder: metrics.jsonl,
games.jsonl, checkpoints, resume, curves.png (runlog.py).
What the paper's code does that this one does not: docs/paper.md#departures-of-this-project.
"""
import argparse
import dataclasses
import json
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lora
import rl
from common import (Stopwatch, UserError, cache_dir, exit_on_user_error, peak_rss_gb, release_freed_memory,
                    resolve_device, resolve_dtype)
from game import REWARD_TABLES, draw_seeds, play_attacker, play_defender, read_seeds, score_games
from judge import label_words, load_judge
from model import load_policy, resolve_policy_path
from optim import MixedPrecisionAdamW
from runlog import (append_jsonl, checkpoint_path, game_metrics, keep_steps, last_checkpoint, mean, plot_curves,
                    progress_summary, read_log, save_checkpoint)
from sampler import compile_layers
from update import UpdateSettings, old_logprobs, plan_minibatches, ppo_update, reference_logprobs
from warmup import WarmupSettings, demo_experiences, sft_batches, warm_up, warmup_key


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Each field is a flag: `steps` is --steps, `cot=False` is --no-cot,
    `shuffle_rewards=True` is --shuffle-rewards."""
    # the game
    mode: str = arg("selfplay", "selfplay | attacker_only (defender frozen) | defender_only (no rewriting)")
    cot: bool = arg(True, "hidden chain of thought with the +-1 format reward (--no-cot: direct answers)")
    reward_table: str = arg("general_sum", "general_sum (as released) | zero_sum")
    batch_size: int = arg(16, "seeds per step, half harmful and half benign")
    revise_frac: float = arg(0.5, "share of each kind of seed the attacker rewrites (the rest go straight to the defender)")
    group_attacker: int = arg(1, "revisions per revised seed (k_a), each answered k_d times; > 1: RLOO over the seed's "
                                 "revisions. Cost: --batch-size still counts seeds, so a step plays about "
                                 "batch_size * (revise_frac * k_a + 1 - revise_frac) * k_d defender turns")
    group_defender: int = arg(1, "answers per defender prompt (k_d); > 1: RLOO, each answer's reward against the mean "
                                 "of the other answers of its prompt. Cost: a step plays k_d defender turns per prompt")
    seeds_harmful: str = arg("data/seeds/harmful_train.jsonl", "harmful seed requests (JSONL 'prompt', or CSV)")
    seeds_benign: str = arg("data/seeds/benign_train.jsonl", "benign seed requests (JSONL 'prompt', or CSV)")
    # sampling the turns
    temperature: float = arg(0.7, "sampling temperature of both roles during training (paper: 1.0 at 8B; see "
                                  "docs/paper.md#scale)")
    top_p: float = arg(1.0, "nucleus sampling threshold during training")
    attacker_max_new_tokens: int = arg(96, "attacker turn length cap")
    defender_max_new_tokens: int = arg(128, "defender turn length cap")
    # the RL update
    lr: float = arg(4e-5, "Adam learning rate of the RL update")
    kl_beta: float = arg(0.01, "beta of the per-token k1 KL penalty against the reference (step_0000)")
    clip_eps: float = arg(0.2, "PPO clip range epsilon")
    pg_coef: float = arg(1.0, "weight of the PPO loss (0 with --sft-coef > 0: the SFT-only control run)")
    grad_clip: float = arg(1.0, "gradient norm clip")
    # its baseline
    shuffle_rewards: bool = arg(False, "permute each role's game rewards among its samples before the update: the "
                                       "same update noise with no information (a control arm)")
    whiten: str = arg("role_and_seed", "game-reward whitening groups (with group sizes of 1): role (as released) | "
                                       "role_and_seed (each role's harmful and benign prompts apart, a per-kind baseline: "
                                       "the attacker's by its seed's type, the defender's by the judge's label of its prompt)")
    # its passes over a step's samples
    ppo_epochs: int = arg(1, "passes over each step's samples")
    minibatches: int = arg(2, "optimiser steps per pass (PPO clipping matters from the second)")
    micro_batch_size: int = arg(2, "rows per forward/backward; gradients add up over a minibatch (memory vs speed)")
    no_grad_batch: int = arg(16, "rows per forward of the reference pass (no activations kept, so wider than a micro-batch)")
    old_logprobs: str = arg("auto", "PPO's old log-probs: sampler (the sampler's own, no extra pass) | recompute (a "
                                    "no-grad pass packed as the update's first pass: first ratio exactly 1) | auto "
                                    "(sampler in float32, where they match to ~1e-5; recompute in bf16, where they do not)")
    # LoRA instead of full fine-tuning
    lora_rank: int = arg(0, "LoRA rank (lora.py): train low-rank adapters on the frozen step_0000 instead of every "
                            "weight; the reference is the policy with its adapters off (0: full fine-tuning)")
    lora_alpha: float = arg(0.0, "LoRA scale numerator: updates are alpha / rank x B A (0: alpha = rank)")
    # supervised learning: the warm-up before RL, and the auxiliary loss during it
    sft_coef: float = arg(0.5, "weight of the auxiliary SFT loss on the helpful demos (benign defender demos, as "
                               "released: a helpfulness anchor) during RL (the paper: 1.0, which here took sampled refusal "
                               "0.49 -> 0.24 in 6 steps; 0.1 gave up benign answers; docs/results.md) (0: RL alone)")
    warmup_epochs: int = arg(2, "epochs of the supervised warm-up on the demos (0: no warm-up)")
    warmup_demos: int = arg(0, "demos used in the warm-up, split across roles and kinds (0: all 108; with 32 the "
                               "defender refused ~1 in 8 sampled harmful requests, too few for RL to reinforce)")
    warmup_lr: float = arg(5e-5, "learning rate of the warm-up")
    # the run
    model: str = arg("default", "policy: 'default' (bundled SmolLM2-135M-Instruct), HF id, folder or .gguf")
    judge: str = arg("default", "judge: 'default' (small trained encoder) or a causal LM id/path (WildGuard format)")
    out: str = arg("runs/selfplay", "run folder: metrics.jsonl, games.jsonl, checkpoints/, curves.png")
    resume: str = arg("", "continue the run in this folder from its last checkpoint")
    steps: int = arg(20, "RL steps; each is one batch of games and one update")
    seed: int = arg(0, "random seed; step k's draws depend only on (seed, k), so a resumed run repeats exactly")
    checkpoint_every: int = arg(5, "steps between checkpoints (a last one is always written)")
    # the system
    device: str = arg("auto", "cpu | cuda | auto")
    dtype: str = arg("auto", "bfloat16 (bf16 compute, float32 master weights) | float32 | auto (bf16 on CUDA, float32 "
                             "on a CPU, where it measured faster: common.resolve_dtype)")
    compile: bool = arg(False, "torch.compile the MLPs and norms of the policy's decoder layers (needs a C++ compiler; "
                               "without one, a warning and eager mode)")


CHOICES = {"mode": ("selfplay", "attacker_only", "defender_only"), "whiten": ("role", "role_and_seed"),
           "old_logprobs": ("auto", "sampler", "recompute"), "reward_table": tuple(REWARD_TABLES),
           "dtype": ("auto", "float32", "bfloat16")}


def check_config(cfg: Config):
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, not '{getattr(cfg, name)}'")
    if cfg.device not in ("auto", "cpu") and not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"--device {cfg.device}: use auto or cpu" + ("" if torch.cuda.is_available() else " (no CUDA here)"))
    for name in ("steps", "batch_size", "ppo_epochs", "minibatches", "micro_batch_size", "attacker_max_new_tokens",
                 "defender_max_new_tokens", "checkpoint_every", "group_defender", "group_attacker", "no_grad_batch"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.batch_size < 2:
        raise UserError("--batch-size must be >= 2 (half harmful, half benign)")
    for name, lo, hi in (("revise_frac", 0, 1), ("top_p", 1e-6, 1), ("clip_eps", 1e-6, 1)):
        if not lo <= getattr(cfg, name) <= hi:
            raise UserError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}]")
    for name in ("lr", "temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be > 0")
    if cfg.group_attacker > 1 and cfg.mode == "defender_only":
        raise UserError("--group-attacker > 1 needs an attacker: not with --mode defender_only")
    if cfg.lora_alpha and not cfg.lora_rank:
        raise UserError("--lora-alpha needs --lora-rank > 0")
    if cfg.pg_coef == 0 and cfg.sft_coef == 0:
        raise UserError("--pg-coef 0 needs --sft-coef > 0 (nothing would train)")
    for name in ("kl_beta", "sft_coef", "pg_coef", "warmup_epochs", "warmup_demos", "warmup_lr", "lora_rank", "lora_alpha"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")


def settings(cls, cfg: Config):
    """The lower files' settings (update.UpdateSettings) from the Config fields of the same names."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------
# Set-up: the run folder, the policy and its optimiser, the reference


class StopAfterStep:
    """The first Ctrl-C lets the current step finish and checkpoint; a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and checkpointing (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.previous)


def prepare_run(cfg: Config, device, dtype):
    """The run folder with its checkpoints/step_0000 (the warm-up's result, or the model as given),
    and the (step, folder) to start from."""
    out = Path(cfg.out)
    if cfg.resume:
        found = last_checkpoint(out)
        if found is None:
            raise UserError(f"--resume {cfg.resume}: no checkpoint in {out / 'checkpoints'}")
        return out, found
    if last_checkpoint(out) is not None:
        raise UserError(f"{out} already holds a run; use --resume {out}, or another --out")
    source = resolve_policy_path(cfg.model)
    warmup = WarmupSettings(cfg.warmup_epochs, cfg.warmup_demos, cfg.warmup_lr, cfg.grad_clip, cfg.seed, cfg.cot,
                            str(dtype).removeprefix("torch."))
    cached = cache_dir() / f"warmup-{warmup_key(source, warmup)}"
    if cfg.warmup_epochs and not (cached / "config.json").is_file():
        model, tokenizer = load_policy(source, device, torch.float32)
        t0 = time.time()
        info = warm_up(model, tokenizer, warmup, cached)
        print(f"warm-up: {info['demos']} demos x {cfg.warmup_epochs} epochs in {time.time() - t0:.0f} s, "
              f"loss {info['first_loss']:.2f} -> {info['last_loss']:.2f}", file=sys.stderr)
    # float32 on disk, whatever the compute dtype: the optimiser's master weights start from it
    model, tokenizer = load_policy(str(cached) if cfg.warmup_epochs else source, device, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, 0, model, tokenizer)
    return out, (0, checkpoint_path(out, 0))


def load_trainee(cfg: Config, out, start, folder, device, dtype):
    """(policy, tokenizer, optimizer) at step `start`. LoRA adapts the frozen step_0000 (a later
    checkpoint holds merged weights: never adapt those again), its adapters back from a resumed state."""
    policy, tokenizer = load_policy(str(checkpoint_path(out, 0) if cfg.lora_rank else folder), device, torch.float32)
    resumed = torch.load(folder / "trainer_state.pt", weights_only=True) if start > 0 else None
    if cfg.lora_rank:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the adapters' random A: the same for the same seed
            try:
                lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank)
            except ValueError as e:  # a model without Llama-style projection names
                raise UserError(f"--lora-rank {cfg.lora_rank}: {e}") from None
        if resumed:  # the float32 adapter masters, loaded before the optimiser copies them
            lora.load_lora_state_dict(policy, resumed["lora"])
    optimizer = MixedPrecisionAdamW(policy, cfg.lr, dtype)  # float32 masters; the policy now computes in dtype
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
    return policy, tokenizer, optimizer


def reference_policy(policy, cfg: Config, out, device, dtype):
    """RL's starting point (step_0000): the KL anchor, and the frozen defender of attacker_only.

    Returned as a function that gives a context manager yielding the model: with LoRA it is the
    policy itself with its adapters off (no second copy held), otherwise a frozen copy of step_0000,
    or None when neither the KL penalty nor a frozen defender needs it.
    """
    if cfg.lora_rank:
        return lambda: lora.adapters_disabled(policy)
    if not cfg.kl_beta and cfg.mode != "attacker_only":
        return None
    reference, _ = load_policy(str(checkpoint_path(out, 0)), device, dtype)
    reference.requires_grad_(False)
    if cfg.compile:
        compile_layers(reference)
    return lambda: nullcontext(reference)


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, judge=None):
    """Run (or resume) self-play; `judge` overrides cfg.judge (the tests pass a tiny one)."""
    check_config(cfg)
    if cfg.resume:  # the saved settings win, except the number of steps
        saved = Path(cfg.resume) / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {cfg.resume}: no config.json there (not a run folder)")
        cfg = Config(**{**json.loads(saved.read_text()), "resume": cfg.resume, "out": cfg.resume, "steps": cfg.steps})
    harmful, benign = read_seeds(cfg.seeds_harmful, "harmful"), read_seeds(cfg.seeds_benign, "benign")
    judge = judge or load_judge(cfg.judge)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out, (start, folder) = prepare_run(cfg, device, dtype)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    rows = keep_steps(out / "metrics.jsonl", start)
    keep_steps(out / "games.jsonl", start)
    policy, tokenizer, optimizer = load_trainee(cfg, out, start, folder, device, dtype)
    reference = reference_policy(policy, cfg, out, device, dtype)
    if cfg.compile:
        compile_layers(policy)
    # one SFT batch per optimiser step: a resumed run skips those already used, so it repeats the uninterrupted one
    demos = (sft_batches(demo_experiences(tokenizer, cfg.cot, helpful_only=True), 4,
                         torch.Generator().manual_seed(cfg.seed), skip=optimizer.steps) if cfg.sft_coef else None)
    update, pad_id = settings(UpdateSettings, cfg), tokenizer.pad_token_id
    revise_frac = 0 if cfg.mode == "defender_only" else cfg.revise_frac

    from tqdm import tqdm
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="self-play", file=sys.stderr)
    step = start
    with StopAfterStep() as stop:
        for step in bar:
            watch, t0 = Stopwatch(), time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # step k's draws depend on (seed, k) only
            seeds = draw_seeds(harmful, benign, cfg.batch_size, revise_frac, gen)
            # play: the attacker rewrites its seeds k_a times, the defender answers each prompt k_d times
            sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, cot=cfg.cot, generator=gen)
            with watch("t_attacker"):
                attack = play_attacker(policy, tokenizer, seeds, cfg.group_attacker, cfg.attacker_max_new_tokens,
                                       **sampling)
            with watch("t_defender"), (reference() if cfg.mode == "attacker_only" else nullcontext(policy)) as defender:
                defence = play_defender(defender, tokenizer, seeds, attack, cfg.group_defender,
                                        cfg.defender_max_new_tokens, **sampling)
            # judge every answer to its prompt
            with watch("t_judge"):
                verdicts = judge(defence.prompts(), defence.turn.answers)
            # reward: labels -> the reward table, per game and role; the games that train a role are its samples
            games, samples = score_games(seeds, attack, defence, verdicts, cfg.reward_table, cfg.cot,
                                         train_defender=cfg.mode != "attacker_only")
            release_freed_memory()
            # update: PPO on both roles' samples together, and the SFT loss on the helpful demos
            stats = {}
            if samples:
                plan = plan_minibatches(samples, update, gen)
                with watch("t_old_logprobs"):
                    old_logp, from_sampler = old_logprobs(policy, samples, plan, update, pad_id)
                with watch("t_reference"):
                    ref_logp = reference_logprobs(reference, samples, update, pad_id)  # None without a KL penalty
                with watch("t_update"):
                    stats = ppo_update(policy, optimizer, samples, plan, old_logp, ref_logp, update, pad_id, gen, demos)
                stats["old_logprobs_from_sampler"] = int(from_sampler)
                release_freed_memory()
            row = step_row(step, games, samples, stats, watch, attack, defence, time.time() - t0)
            append_jsonl(out / "games.jsonl", [{"step": step, **g, "labels": label_words(g["labels"])} for g in games])
            append_jsonl(out / "metrics.jsonl", [row])
            rows.append(row)
            bar.set_postfix_str(progress_summary(row))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.requested:
                save_checkpoint(out, step, policy, tokenizer, optimizer)
                plot_curves(rows, out / "curves.png")
            if stop.requested:
                break
    return out, step, rows


def step_row(step, games, samples, stats, watch, attack, defence, seconds) -> dict:
    """A step's line of metrics.jsonl: the games' rates, each role's mean reward, the update's
    diagnostics, seconds and peak memory per phase (t_X, peak_rss_gb_X), generated tokens per
    second, and the peak memory so far."""
    times = watch.times
    turns = [t for t in (attack.turn, defence.turn) if t is not None]
    tokens_per_s = sum(int(t.sample.mask.sum()) for t in turns) / max(times["t_attacker"] + times["t_defender"], 1e-9)
    row = {"step": step, "time": round(time.time(), 1), **game_metrics(games),
           "reward_attacker": mean([s.reward for s in samples if s.role == rl.ATTACKER]),
           "reward_defender": mean([s.reward for s in samples if s.role == rl.DEFENDER]),
           "samples": len(samples), **stats, **times, "tokens_per_s": tokens_per_s, "t_step": seconds,
           **{"peak_rss_gb_" + k[2:]: v for k, v in watch.peaks.items()}, "peak_rss_gb": peak_rss_gb()}
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description="Self-RedTeam self-play: one policy, two roles, a judge, PPO.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool and f.default:
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f.metadata["help"])
        elif f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    return Config(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    out, step, rows = train(cfg)
    print(f"\nrun folder: {out}  (last checkpoint: {checkpoint_path(out, step)})")
    print(f"curves:     {out / 'curves.png'}\nmetrics:    {out / 'metrics.jsonl'}\ngames:      {out / 'games.jsonl'}")
    for g in [g for g in read_log(out / "games.jsonl") if g["step"] == step][:3]:
        print(f"\n--- {g['type']} seed: {g['seed'][:150]}")
        if g["attacker_answer"] is not None:
            print(f"attacker: {g['attacker_answer'][:300]}")
        print(f"defender: {g['defender_answer'][:300]}\nlabels: {g['labels']}  rewards: att={g['reward_attacker']} def={g['reward_defender']}")


if __name__ == "__main__":
    exit_on_user_error(main)

"""Does RL itself make the defender safer? Seeds x arms from one warm-up, on held-out seeds.

  python experiments.py                                   # -> runs/reproduce/results.md, results.png
  mkdir -p runs && nohup make reproduce > runs/reproduce.log 2>&1 &   # the same, in the background

One warm-up (selfplay.py's own, cached) becomes runs/reproduce/step_0000, and every run starts from
it: `selfplay.py --model runs/reproduce/step_0000 --warmup-epochs 0 --seed S` plus its arm's flags,
K steps. Then evaluate.py scores step_0000 and each run's step K on the held-out seeds
(data/seeds/*_heldout.jsonl): greedy, and --samples answers per prompt at the training temperature.
Arms (ARMS below: one dict of arm -> extra selfplay flags):
  selfplay         the defaults
  sft_only         --pg-coef 0: the same loop and SFT loss without the PPO loss (the control)
  shuffled_reward  each role's rewards permuted within the step: RL updates that carry no signal
  group1           one sample per seed and role (--group-defender 1 --group-attacker 1)
Effects are differences paired by seed (seed S of every arm sees the same seeds, draws and
evaluation prompts), against each control that was run (CONTROLS): selfplay - sft_only is the RL
effect (what the PPO loss adds to the SFT loss), selfplay - shuffled_reward the reward's own effect
(what the reward's information adds to an update of the same size).

Intervals are 95% Student-t over seeds (S - 1 degrees of freedom; 4.30 at S = 3). Why not a
bootstrap: with 3 seeds a paired bootstrap has only 10 distinct resamples, and its percentile
interval can never be wider than the range of the three differences, which is far too narrow.
The t-interval assumes roughly normal seed-to-seed differences, but its width is honest about how
little 3 seeds say. It is over training seeds for one fixed set of evaluation prompts: it says
whether an effect repeats across runs, not whether it holds on other prompts (each run's
eval_step_NNNN/report.md has the intervals over prompts).

Resumable: a second call finishes what is missing. A run folder resumes with selfplay's --resume
(also to a larger --steps); a finished evaluation (its report.json, with the same settings) is
kept; results.md is rewritten after every evaluation, so a partial table is there to read early.
Ctrl-C stops after the current step, with a checkpoint. --selfplay-args and --judge must stay the
same for one --out (settings.json); seeds, steps, arms and the evaluation flags may change.

The defaults fit 90 minutes on a 2-core Xeon (docs/results.md): the RL effect's two arms
(DEFAULT_ARMS), 3 seeds, 6 steps of 8 seeds each (`--selfplay-args '--batch-size 8'`, what
`make demo` runs), 32 held-out prompts of each kind with 4 samples each: ~11 min a run (6 of
training, 5 of evaluation), 6 runs, plus the warm-up and step_0000's evaluation (~10 min). Each
further arm adds ~33 min: `--arms selfplay,sft_only,shuffled_reward,group1` (group1 is the same
run as selfplay while the group sizes default to 1).
"""
import argparse
import contextlib
import gc
import io
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import evaluate as E
import selfplay as SP
from common import (UserError, exit_on_user_error, release_freed_memory, resolve_device, resolve_dtype, save_figure,
                    write_text)
from judge import load_judge
from runlog import checkpoint_path, last_checkpoint

ARMS = {
    "selfplay": [],
    "sft_only": ["--pg-coef", "0"],
    "shuffled_reward": ["--shuffle-rewards"],
    "group1": ["--group-defender", "1", "--group-attacker", "1"],
}
# every other arm is compared with each control that was run, paired by seed; the named effects:
CONTROLS = ("sft_only", "shuffled_reward")
EFFECT_NAMES = {("selfplay", "sft_only"): "the RL effect", ("selfplay", "shuffled_reward"): "the reward's own effect"}
DEFAULT_ARMS = ("selfplay", "sft_only")  # the RL effect; the other arms are a --arms away
SEEDS = 3             # S
STEPS = 6             # K
SELFPLAY_ARGS = "--batch-size 8"  # make demo's run
EVAL_LIMIT = 32       # held-out prompts of each kind (0: all 66)
EVAL_SAMPLES = 4      # sampled answers per prompt (0: greedy only)
METRICS = [("harmful_refusal", "refusal on harmful"), ("benign_compliance", "compliance on benign"),
           ("gap", "discrimination gap")]
# 97.5% quantiles of Student's t by degrees of freedom (1..30; larger uses 30's, slightly wide)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(xs):
    """(mean, [lo, hi]): the 95% Student-t interval of the mean of xs (None with one value)."""
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, None
    half = T975[min(n - 1, 30) - 1] * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    return m, [m - half, m + half]


# ----------------------------------------------------------------------------------------------
# The runs and their evaluations


def selfplay_flags(args):
    return [*shlex.split(args.selfplay_args), "--judge", args.judge]


def make_step_0000(args, out: Path) -> Path:
    """selfplay.py's warm-up (from its cache when it has one), once, as out/step_0000."""
    folder = out / "step_0000"
    if (folder / "config.json").is_file():
        return folder
    scratch = out / "warmup_run"  # prepare_run writes a run folder; only its step_0000 is kept
    shutil.rmtree(scratch, ignore_errors=True)
    cfg = SP.parse_args([*selfplay_flags(args), "--out", str(scratch)])
    SP.check_config(cfg)
    device = resolve_device(cfg.device)
    _, (_, checkpoint) = SP.prepare_run(cfg, device, resolve_dtype(cfg.dtype, device))
    os.replace(checkpoint, folder)
    shutil.rmtree(scratch)
    return folder


def train_run(args, arms, out: Path, arm, seed, judge) -> Path:
    """Arm `arm`, seed `seed`, trained (or resumed) to step args.steps; returns its run folder."""
    folder = out / arm / f"seed{seed}"
    if (checkpoint_path(folder, args.steps) / "config.json").is_file():
        return folder
    found = last_checkpoint(folder)
    if found and found[0] > args.steps:
        raise UserError(f"{folder} has run past step {args.steps} (to {found[0]}) without a checkpoint at "
                        f"{args.steps}; use --steps {found[0]}")
    if found and (folder / "config.json").is_file():
        argv = ["--resume", str(folder), "--steps", str(args.steps)]
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a start that died before its first checkpoint
        argv = [*selfplay_flags(args), *arms[arm], "--model", str(out / "step_0000"), "--warmup-epochs", "0",
                "--seed", str(seed), "--steps", str(args.steps), "--out", str(folder)]
    _, step, _ = SP.train(SP.parse_args(argv), judge=judge)
    if step < args.steps:  # selfplay stopped early on Ctrl-C, after a checkpoint
        print(f"\nstopped: {folder} is at step {step}; run the same command again to go on", file=sys.stderr)
        raise KeyboardInterrupt
    return folder


def eval_args(args, policy: Path, folder: Path):
    return E.parse_args(["--policy", str(policy), "--no-attacker", "--limit", str(args.limit), "--samples",
                         str(args.samples), "--judge", args.judge, *shlex.split(args.eval_args), "--out", str(folder)])


def evaluate_checkpoint(args, policy: Path, folder: Path, judge) -> dict:
    """evaluate.py's report of one checkpoint; an existing one is reused when its settings match."""
    wanted = eval_args(args, policy, folder)
    path = folder / "report.json"
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("settings") == {k: v for k, v in vars(wanted).items() if k not in ("out", "run")}:
            return report
    return E.run(wanted, judge=judge)


# ----------------------------------------------------------------------------------------------
# The table


def headline(report, sampled):
    """{metric: value} of a one-policy report: the first harmful and benign sets and their gap."""
    result = next(iter(report["policies"].values()))
    suffix = "_sampled" if sampled else ""
    harmful = next(m for m in result["sets"].values() if "harmful_refusal_rate" in m)
    benign = next(m for m in result["sets"].values() if "benign_compliance_rate" in m)
    return {"harmful_refusal": harmful["harmful_refusal_rate" + suffix]["rate"],
            "benign_compliance": benign["benign_compliance_rate" + suffix]["rate"],
            "gap": next(iter(result["gaps"].values()))["discrimination_gap" + suffix]["value"]}


def effect_pairs(run_arms):
    """(arm, control) for every control in run_arms and every other arm, a control not twice."""
    controls = [c for c in CONTROLS if c in run_arms]
    return [(arm, c) for i, c in enumerate(controls) for arm in run_arms if arm != c and arm not in controls[:i]]


def summarise(args, arms, base, reports):
    """Per measure (sampled, greedy): step_0000's values, each arm's mean and t-interval over seeds,
    and each arm minus each control, paired by seed. `reports`: {(arm, seed): report} done so far."""
    summary = {"settings": vars(args), "arm_flags": {arm: arms[arm] for arm in args.arms}, "runs_done": len(reports),
               "runs": len(args.arms) * args.seeds, "measures": {}}
    for measure in (["sampled"] if args.samples else []) + ["greedy"]:
        values = {key: headline(report, measure == "sampled") for key, report in reports.items()}
        arms, effects = {}, {}
        for arm in args.arms:
            seeds = [s for s in range(args.seeds) if (arm, s) in values]
            if seeds:
                arms[arm] = {"seeds": seeds, **{m: dict(zip(("mean", "ci"), t_interval([values[arm, s][m] for s in seeds])),
                                                        values=[values[arm, s][m] for s in seeds]) for m, _ in METRICS}}
        for arm, control in effect_pairs(args.arms):
            paired = [s for s in range(args.seeds) if (arm, s) in values and (control, s) in values]
            if paired:
                diffs = {m: [values[arm, s][m] - values[control, s][m] for s in paired] for m, _ in METRICS}
                effects[f"{arm} - {control}"] = {"seeds": paired, **{m: dict(zip(("mean", "ci"), t_interval(d)), differences=d)
                                                                     for m, d in diffs.items()}}
        summary["measures"][measure] = {"step_0000": headline(base, measure == "sampled"), "arms": arms,
                                        "effects": effects}
    return summary


def named(pair):
    name = EFFECT_NAMES.get(tuple(pair.split(" - ")))
    return f" ({name})" if name else ""


def fmt(m, sign=""):
    return f"{m['mean']:{sign}.3f}" + (f" [{m['ci'][0]:{sign}.2f}, {m['ci'][1]:{sign}.2f}]" if m["ci"] else "")


def markdown(summary):
    a = summary["settings"]
    lines = [f"# Seeds x arms: {a['steps']} steps from one step_0000, {a['seeds']} seeds per arm",
             "", f"Runs evaluated: {summary['runs_done']} of {summary['runs']}. Held-out seeds, "
             + (f"the first {a['limit']}" if a["limit"] else "all") + " of each kind. Mean over seeds and its 95% "
             "Student-t interval (seeds - 1 degrees of freedom: with so few seeds a bootstrap interval is too "
             "narrow), not clipped: a bound past 0 or 1 says the seeds cannot pin the value down.",
             "Effects are arm - control, paired by seed: " + "; ".join(f"`{a} - {c}` is {name}"
                                                                       for (a, c), name in EFFECT_NAMES.items()) + ".",
             "Arms (selfplay.py flags): " + "; ".join(f"{arm} `{' '.join(f) or 'the defaults'}`"
                                                     for arm, f in summary["arm_flags"].items()) + "."]
    header = "| " + " | ".join(name for _, name in METRICS) + " |"
    for measure, s in summary["measures"].items():
        how = f"{a['samples']} sampled answers per prompt" if measure == "sampled" else "one greedy answer per prompt"
        lines += ["", f"## {measure} ({how})", "", "| arm | seeds " + header, "|---|---|---|---|---|",
                  "| step_0000 (start) | - | " + " | ".join(f"{s['step_0000'][m]:.3f}" for m, _ in METRICS) + " |"]
        lines += [f"| {arm} | {len(r['seeds'])} | " + " | ".join(fmt(r[m]) for m, _ in METRICS) + " |"
                  for arm, r in s["arms"].items()]
        if s["effects"]:
            lines += ["", "| effect (paired by seed) | seeds " + header, "|---|---|---|---|---|"]
            lines += [f"| {pair}{named(pair)} | {len(r['seeds'])} | " + " | ".join(fmt(r[m], "+") for m, _ in METRICS) + " |"
                      for pair, r in s["effects"].items()]
        lines += ["", "| per seed | seed " + header, "|---|---|---|---|---|"]
        lines += [f"| {arm} | {seed} | " + " | ".join(f"{r[m]['values'][k]:.3f}" for m, _ in METRICS) + " |"
                  for arm, r in s["arms"].items() for k, seed in enumerate(r["seeds"])]
    return "\n".join(lines) + "\n"


def plot(summary, path: Path):
    """Per metric: each seed's value, the arm's mean and interval, step_0000 dashed; then the effects."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    measure, s = next(iter(summary["measures"].items()))  # sampled when there are samples
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (m, name) in zip(axes, METRICS):
        for x, (arm, r) in enumerate(s["arms"].items()):
            ax.plot([x] * len(r[m]["values"]), r[m]["values"], ".", color="grey")
            lo, hi = r[m]["ci"] or (r[m]["mean"],) * 2
            ax.errorbar([x + 0.15], [r[m]["mean"]], yerr=[[r[m]["mean"] - lo], [hi - r[m]["mean"]]], fmt="o", capsize=4,
                        color=f"C{x}")
        ax.axhline(s["step_0000"][m], ls="--", color="black", lw=0.8, label="step_0000")
        ax.set_xticks(range(len(s["arms"])), list(s["arms"]), rotation=20, fontsize=8)
        ax.set_ylim(-1.05 if m == "gap" else -0.05, 1.05)  # an interval past the possible range is cut off
        ax.set_title(f"{name} ({measure})", fontsize=10)
    axes[0].legend(fontsize=7)
    for x, (arm, r) in enumerate(s["effects"].items()):
        for k, (m, name) in enumerate(METRICS):
            lo, hi = r[m]["ci"] or (r[m]["mean"],) * 2
            axes[3].errorbar([x + 0.2 * k], [r[m]["mean"]], yerr=[[r[m]["mean"] - lo], [hi - r[m]["mean"]]], fmt="o",
                             capsize=4, color=f"C{k}", label=name if x == 0 else None)
    axes[3].axhline(0, color="black", lw=0.8)
    axes[3].set_xticks([x + 0.2 for x in range(len(s["effects"]))], list(s["effects"]), rotation=20, fontsize=8)
    axes[3].set_ylim(-1.05, 1.05)
    axes[3].set_title("arm - control, paired by seed", fontsize=10)
    if s["effects"]:
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_results(out: Path, summary):
    write_text(out / "results.json", json.dumps(summary, indent=1))
    plot(summary, out / "results.png")
    write_text(out / "results.md", markdown(summary))


# ----------------------------------------------------------------------------------------------
# The driver


def parse_args(argv=None, arms=ARMS):
    p = argparse.ArgumentParser(description="Seeds x arms from one warm-up; RL's own effect with intervals.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=SEEDS, help="S: runs per arm, seeds 0..S-1")
    p.add_argument("--steps", type=int, default=STEPS, help="K: RL steps of each run")
    p.add_argument("--arms", default=",".join(a for a in DEFAULT_ARMS if a in arms),
                   help=f"comma-separated, of: {', '.join(arms)}")
    p.add_argument("--limit", type=int, default=EVAL_LIMIT, help="held-out prompts of each kind evaluated (0: all)")
    p.add_argument("--samples", type=int, default=EVAL_SAMPLES, help="sampled answers per prompt (0: greedy only)")
    p.add_argument("--judge", default="default", help="the judge of training and evaluation (see selfplay.py --judge)")
    p.add_argument("--selfplay-args", default=SELFPLAY_ARGS,
                   help="extra selfplay.py flags for every run (replace the default; add it back to keep it)")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags, e.g. '--max-new-tokens 64'")
    p.add_argument("--out", default="runs/reproduce", help="step_0000/, ARM/seedS/ run folders, results.md/.png")
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in arms]
    if unknown or not args.arms:
        raise UserError(f"--arms: unknown arm {', '.join(unknown) or '(none given)'}; choose from {', '.join(arms)}")
    if args.seeds < 1 or args.steps < 1 or args.limit < 0 or args.samples < 0:
        raise UserError("--seeds and --steps must be >= 1, --limit and --samples >= 0")
    for arm in args.arms:  # every run's flags are checked before the first one starts
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                SP.check_config(SP.parse_args([*selfplay_flags(args), *arms[arm]]))
        except (SystemExit, UserError) as e:
            why = str(e) if isinstance(e, UserError) else err.getvalue().strip().split("error: ")[-1]
            raise UserError(f"arm {arm}: selfplay.py rejects its flags ({' '.join(arms[arm]) or 'none'}, "
                            f"--selfplay-args '{args.selfplay_args}'): {why}") from None
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            eval_args(args, Path("step_0000"), Path(args.out))
    except SystemExit:
        raise UserError(f"--eval-args '{args.eval_args}': {err.getvalue().strip().split('error: ')[-1]}") from None
    return args


def run(args, arms=ARMS, judge=None):
    """Everything that is missing, then results.md/.json/.png; returns the summary."""
    from tqdm import tqdm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = {"selfplay_args": args.selfplay_args, "judge": args.judge}
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != fixed:
        raise UserError(f"{out} was made with {saved.read_text().strip()}; keep those flags, or use another --out")
    write_text(saved, json.dumps(fixed))
    judge = judge or load_judge(args.judge)
    runs = [(arm, seed) for seed in range(args.seeds) for arm in args.arms]  # seed-major: paired results come early
    bar = tqdm(total=2 + 2 * len(runs), desc="reproduce", file=sys.stderr)
    t0 = time.time()
    base = evaluate_checkpoint(args, make_step_0000(args, out), out / "eval_step_0000", judge)
    bar.update(2)
    reports = {}
    for arm, seed in runs:
        folder = train_run(args, arms, out, arm, seed, judge)
        bar.update()
        reports[arm, seed] = evaluate_checkpoint(args, checkpoint_path(folder, args.steps),
                                                 folder / f"eval_step_{args.steps:04d}", judge)
        bar.update()
        write_results(out, summarise(args, arms, base, reports))
        print(f"{arm} seed {seed}: done ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
        gc.collect()
        release_freed_memory()
    bar.close()
    summary = summarise(args, arms, base, reports)
    write_results(out, summary)
    return summary


def main(argv=None):
    args = parse_args(argv)
    print("\n" + markdown(run(args)))
    print(f"wrote {Path(args.out) / 'results.md'}, results.json, results.png")


if __name__ == "__main__":
    exit_on_user_error(main)

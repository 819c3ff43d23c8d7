"""The run folder of selfplay.py: checkpoints that resume, the JSONL logs and the per-step rates
that go into them, and curves.png.

  out/config.json                 the run's settings (a resumed run reuses them)
  out/metrics.jsonl               one line per step
  out/games.jsonl                 one line per game
  out/checkpoints/step_NNNN/      Hugging Face folders (AutoModelForCausalLM.from_pretrained loads
                                  them); the newest also holds trainer_state.pt (the optimiser)
  out/curves.png                  the key metrics against step, redrawn at each checkpoint
Every checkpoint is written under a temporary name and renamed, so a crash never leaves one that
looks complete but is not.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

import lora
from common import UserError, read_jsonl, save_figure, write_jsonl, written_aside


def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:04d}"


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer=None) -> Path:
    """Weights (the optimiser's float32 masters, when given) and tokenizer, plus the optimiser state
    for resuming. No RNG state is needed: step k's random draws come from a generator seeded with
    (seed, k). With LoRA the weights are merged (W + scale B A, from the float32 adapter masters), so
    the folder is a plain model for evaluate.py and load_policy; trainer_state.pt also holds the
    adapters, which a resumed run puts back on step_0000."""
    folder = checkpoint_path(out, step)
    for stale in folder.parent.glob("step_*.tmp*"):  # left by a process that was killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    weights, adapters = optimizer.master_state_dict() if optimizer else None, None
    if lora.lora_layers(model):  # the trained weights are the adapters: saved apart, and merged into the model's
        adapters, weights = weights, lora.merged_state_dict(model, weights)
    try:
        with written_aside(folder) as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            if optimizer is not None:
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "lora": adapters}, tmp / "trainer_state.pt")
            shutil.rmtree(folder, ignore_errors=True)  # a step redone after a resume replaces its old checkpoint
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: one line; the last checkpoint is intact
        found = last_checkpoint(out)
        then = f"; free space and --resume {out} (from {found[1].name})" if found else ""
        raise UserError(f"could not write checkpoint {folder}: {e}{then}") from None
    if optimizer is not None:  # only the newest checkpoint is resumed from, and Adam's state is twice the model
        for old in Path(out).glob("checkpoints/step_*/trainer_state.pt"):
            if old.parent != folder:
                old.unlink()
    return folder


def last_checkpoint(out: Path):
    """(step, folder) of the newest complete checkpoint, or None."""
    done = [f for f in sorted(Path(out).glob("checkpoints/step_[0-9][0-9][0-9][0-9]")) if (f / "config.json").is_file()]
    return (int(done[-1].name[5:]), done[-1]) if done else None


def read_log(path: Path) -> list[dict]:
    """The complete lines of a log (a line cut short by a crash ends it)."""
    return read_jsonl(path, partial=True)


def append_jsonl(path: Path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def keep_steps(path: Path, last_step: int) -> list[dict]:
    """Drop log lines of steps after `last_step` (a resumed run redoes them), atomically."""
    rows = [r for r in read_log(path) if r["step"] <= last_step]
    write_jsonl(path, rows)
    return rows


# ----------------------------------------------------------------------------------------------
# What a step's games add up to: a line of metrics.jsonl, and the progress bar


def game_metrics(games) -> dict:
    """Rates over one step's games (game.score_games'), among those whose refusal was judged (None
    where a rate has no games). A label that is None counts as "no"."""
    def share(rows, cond):
        return mean([bool(cond(g)) for g in rows if g["labels"]["response_refusal"] is not None])

    harmful = [g for g in games if g["type"].endswith("_harmful")]
    benign = [g for g in games if g["type"].endswith("_benign")]
    attacked = [g for g in games if g["type"].startswith("generated_")]
    return {
        "attack_success": share([g for g in attacked if g["type"] == "generated_harmful"],
                               lambda g: g["labels"]["response_harmful"]),
        "refusal_harmful": share(harmful, lambda g: g["labels"]["response_refusal"]),
        "compliance_benign": share(benign, lambda g: not g["labels"]["response_refusal"]),
        "harmful_response_rate": share(harmful, lambda g: g["labels"]["response_harmful"]),
        "faithfulness": share(attacked, lambda g: bool(g["labels"]["prompt_harmful"]) == g["type"].endswith("_harmful")),
        "format_ok_attacker": share(attacked, lambda g: g["attacker_format_ok"]),
        "format_ok_defender": share(games, lambda g: g["defender_format_ok"]),
        "ties": sum(g["reward_defender"] is None for g in games),
    }


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def progress_summary(row):
    """The progress bar's summary of one step."""
    parts = [("R_att", "reward_attacker"), ("R_def", "reward_defender"), ("refuse_h", "refusal_harmful"),
             ("comply_b", "compliance_benign"), ("asr", "attack_success"), ("kl", "kl"), ("s", "t_step")]
    return " ".join(f"{name}={row[key]:.2f}" for name, key in parts if row.get(key) is not None)


CURVES = [("reward per role", ["reward_attacker", "reward_defender"]),
          ("defender, training games", ["refusal_harmful", "compliance_benign", "harmful_response_rate"]),
          ("attacker, training games", ["attack_success", "faithfulness"]),
          ("format valid", ["format_ok_attacker", "format_ok_defender"]),
          ("KL to reference (k1)", ["kl"]),
          ("seconds per step", ["t_step"])]


def plot_curves(rows: list[dict], path: Path):
    """The key metrics of metrics.jsonl against step, one panel per group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

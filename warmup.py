"""The supervised warm-up before RL, and the auxiliary SFT loss during it (selfplay.py uses both).

The 135M default model neither follows the <think>/<answer> format nor refuses anything, so RL
from it gets almost no refusal samples to learn from. The paper's remedy is SFT on postfilled
CoT data; ours is two epochs on the project's 108 demonstrations (data/demos/), both roles in
the think/answer format. It only seeds the behaviours, and RL has to do the rest: afterwards the
defender refuses about half of the sampled answers to held-out harmful requests, so the games
hold both refusals and compliances for the reward to tell apart (with 32 demos, ~1 in 8). The
result is cached (keyed on the model, the demos and the settings) and becomes the run's
checkpoints/step_0000.
"""
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import rl
from common import DTYPES, read_jsonl, read_prompt_rows, written_aside
from model import attacker_messages, defender_messages, render_prompt
from optim import MixedPrecisionAdamW
from sampler import generation_logprobs

DEMOS = Path(__file__).resolve().parent / "data" / "demos"


def demo_experiences(tokenizer, cot=True, n=0, helpful_only=False) -> list[rl.Experience]:
    """Demos as (rendered role prompt, target turn). n > 0 takes about n, balanced over the four
    (role, seed kind) groups, in file order; n = 0 takes all. helpful_only: the defender's answers
    to benign requests only, the released code's auxiliary SFT loss during RL (a helpfulness anchor;
    the warm-up takes all demos, refusals and the attacker's turns too)."""
    def target(d):  # the prompt ends with the pre-filled "<think> ", so the target continues it
        return (f"{d['thinking']} </think> <answer> {d['answer']} </answer>" if cot else d["answer"]) + tokenizer.eos_token

    def encode(text):
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    groups = {}
    for d in read_prompt_rows(DEMOS / "defender.jsonl"):
        groups.setdefault(("defender", d["type"]), []).append(
            (rl.DEFENDER, render_prompt(tokenizer, defender_messages(d["prompt"], cot), cot), target(d)))
    for d in read_jsonl(DEMOS / "attacker.jsonl"):
        groups.setdefault(("attacker", d["seed_type"]), []).append(
            (rl.ATTACKER, render_prompt(tokenizer, attacker_messages(d["seed"], d["seed_type"], cot), cot), target(d)))
    if helpful_only:
        groups = {("defender", "benign"): groups[("defender", "benign")]}
    picked = []
    for rows in groups.values():
        picked += rows[:-(-n // len(groups))] if n else rows
    return [rl.Experience(role, encode(prompt), encode(text), 0.0) for role, prompt, text in picked]


def sft_loss(model, demos, pad_id):
    """Mean negative log-likelihood of the target tokens; the prompt is context only."""
    logp, mask = generation_logprobs(model, [d.prompt for d in demos], [d.tokens for d in demos], pad_id)
    return -rl.masked_mean(logp, mask)


def sft_batches(demos, batch_size, gen, skip=0):
    """Endless shuffled batches of demos, after skipping the first `skip` (already used)."""
    while True:
        for rows in torch.randperm(len(demos), generator=gen).split(batch_size):
            if skip:
                skip -= 1
                continue
            yield [demos[i] for i in rows.tolist()]


@dataclass
class WarmupSettings:
    """selfplay.py's flags --warmup-epochs, --warmup-demos, --warmup-lr, --grad-clip, --seed, --cot, --dtype."""
    epochs: int
    demos: int     # 0: all
    lr: float
    grad_clip: float
    seed: int
    cot: bool
    dtype: str     # the compute dtype's name ("float32", "bfloat16"), as resolved: the warm-up computes in it,
                   # and it is part of the cache key


def warm_up(model, tokenizer, settings: WarmupSettings, folder: Path, batch_size=4) -> dict:
    """settings.epochs epochs of SFT on settings.demos demos (AdamW, computing in settings.dtype), saved as a
    float32 Hugging Face folder (written aside, then renamed)."""
    from tqdm import tqdm

    demos = demo_experiences(tokenizer, settings.cot, settings.demos)
    optimizer = MixedPrecisionAdamW(model, settings.lr, DTYPES[settings.dtype])
    batches = sft_batches(demos, batch_size, torch.Generator().manual_seed(settings.seed))
    model.train()
    losses = []
    for _ in tqdm(range(settings.epochs * -(-len(demos) // batch_size)), desc="warm-up SFT", file=sys.stderr):
        optimizer.zero_grad()
        loss = sft_loss(model, next(batches), tokenizer.pad_token_id)
        loss.backward()
        optimizer.step(settings.grad_clip)
        losses.append(loss.item())
    model.eval()
    with written_aside(folder) as tmp:
        model.save_pretrained(tmp, state_dict=optimizer.master_state_dict())
        tokenizer.save_pretrained(tmp)
    return {"demos": len(demos), "batches": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}


def warmup_key(source, settings: WarmupSettings) -> str:
    """Everything the warm-up's result depends on: the model (`source`, a folder or a Hugging Face
    id), the demos and the settings."""
    h = hashlib.sha1()
    s = settings
    # the leading version changes with the warm-up's code (v4: AdamW with the released betas; v5: the
    # defender prompt without a safety instruction, gradients summed in float32)
    h.update(f"v5|{source}|{s.cot}|{s.epochs}|{s.demos}|{s.lr}|{s.grad_clip}|{s.seed}|{s.dtype}".encode())
    for f in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []:
        h.update(f"{f.name}|{f.stat().st_size}|{f.stat().st_mtime_ns}".encode())
    for name in ("defender.jsonl", "attacker.jsonl"):
        h.update((DEMOS / name).read_bytes())
    return h.hexdigest()[:12]

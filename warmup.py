"""The supervised warm-up before RL, and the auxiliary SFT loss during it (selfplay.py uses both).

The 135M default model neither follows the <think>/<answer> format nor refuses anything, so RL
from it gets almost no refusal samples to learn from. The paper's remedy is SFT on postfilled
CoT data; ours is a few epochs on a few of the project's demonstrations (data/demos/), both roles
in the think/answer format. It is small on purpose: it only seeds the behaviours, and RL has to
do the rest. The result is cached (keyed on the model, the demos and the settings) and becomes
the run's checkpoints/step_0000.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import rl
from model import (attacker_messages, defender_messages, publish_folder, read_prompt_rows, render_prompt,
                   resolve_policy_path)
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
    for d in map(json.loads, (DEMOS / "attacker.jsonl").read_text().splitlines()):
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


def warm_up(model, tokenizer, cfg, dtype, folder: Path, batch_size=4) -> dict:
    """cfg.warmup_epochs epochs of SFT on cfg.warmup_demos demos (AdamW at cfg.warmup_lr, computing
    in `dtype`), saved as a float32 Hugging Face folder (written aside, then renamed)."""
    from tqdm import tqdm

    demos = demo_experiences(tokenizer, cfg.cot, cfg.warmup_demos)
    optimizer = rl.MixedPrecisionAdamW(model, cfg.warmup_lr, dtype)
    batches = sft_batches(demos, batch_size, torch.Generator().manual_seed(cfg.seed))
    model.train()
    losses = []
    for _ in tqdm(range(cfg.warmup_epochs * -(-len(demos) // batch_size)), desc="warm-up SFT", file=sys.stderr):
        optimizer.zero_grad()
        loss = sft_loss(model, next(batches), tokenizer.pad_token_id)
        loss.backward()
        optimizer.step(cfg.grad_clip)
        losses.append(loss.item())
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, state_dict=optimizer.master_state_dict())
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, folder)
    return {"demos": len(demos), "batches": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}


def warmup_key(cfg) -> str:
    """Everything the warm-up's result depends on: the model, the demos and the settings."""
    h = hashlib.sha1()
    source = resolve_policy_path(cfg.model)
    # the leading version changes with the warm-up's code (v4: AdamW with the released betas; v5: the
    # defender prompt without a safety instruction, gradients summed in float32)
    h.update(f"v5|{source}|{cfg.cot}|{cfg.warmup_epochs}|{cfg.warmup_demos}|{cfg.warmup_lr}|{cfg.grad_clip}|"
             f"{cfg.seed}|{cfg.dtype}".encode())
    for f in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []:
        h.update(f"{f.name}|{f.stat().st_size}|{f.stat().st_mtime_ns}".encode())
    for name in ("defender.jsonl", "attacker.jsonl"):
        h.update((DEMOS / name).read_bytes())
    return h.hexdigest()[:12]

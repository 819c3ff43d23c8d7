"""Training the default judge: labelled answers of real chat models plus the project's own rows.

    python judge_train.py --data DIR --out weights/judge-minilm-lora.safetensors   (DIR: docs/judge.md)

What it trains: all-MiniLM-L6-v2 (the bundled sentence encoder) with low-rank adapters (lora.py)
on every attention and feed-forward projection of its top `adapted_layers` layers, and three
logistic heads. The encoder's own weights stay as the package ships them, so what training produced fits in a small safetensors file
(adapters + heads, ~1.3 MB) that judge.py loads over the installed encoder, offline.

The data (every file in the same schema: `prompt`, `response` or null, and the three labels
`prompt_harmful`, `response_refusal`, `response_harmful` as true/false/null):
  --data DIR        every *.jsonl directly in DIR (the project's set: public answers of real
                    chat models with human harm labels; its README gives sources and licences)
  --data FILE       one labelled file of your own (repeatable)
  project rows      data/judge/train*.jsonl, the training seeds and the demonstrations (always,
                    unless --no-project-data): they cover what the public rows lack, refusals
                    without stock phrases, over-refusals of benign prompts, a 135M model's
                    confused answers.
Every source is split **by prompt** into train and dev (a hash of the prompt text, so a prompt
never sits on both sides); the project's dev rows are its own data/judge/heldout*.jsonl files.
A null label is masked out of the loss; each head's two classes get equal total weight, since
most sources are one-sided (every gptfuzz prompt is harmful, every red_instruct prompt too).
"""
import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import UserError, cpu_has_bf16, exit_on_user_error
from judge import WEIGHTS, EncoderJudge, fixed_file_numbers, load_encoder, save_judge
from judge_data import LABELS, read_sources, split

TRAIN_CONFIG = dict(epochs=2, batch_size=16, lr=5e-4, head_lr=2e-3, rank=16, adapted_layers=3, max_len=320,
                    answers_per_prompt=30, project_weight=3.0, seed=0)


def examples_of(rows, answers_per_prompt=0, seed=0, project_weight=1.0):
    """(prompt, response or None, targets, weight) training examples; targets hold 0/1/None per label.

    The prompt head reads the prompt alone: one example per distinct labelled prompt. The response
    heads read the pair; a prompt keeps at most `answers_per_prompt` answers (0: all), drawn at
    random: gptfuzz has ~60 answers to each of its questions, the same jailbreak personas again
    and again, and they would cost most of the training time. The project's own rows weigh
    `project_weight` in the loss: they are few (~1,100 pairs against ~4,000 public ones) and the
    only ones in the policy's own style (its incoherent answers must not read as refusals).
    """
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    examples, seen, answers = [], set(), {}
    for r in rows:
        w = project_weight if r["source"] == "project" else 1.0
        if r["prompt_harmful"] is not None and r["prompt"] not in seen:
            seen.add(r["prompt"])
            examples.append((r["prompt"], None, (int(r["prompt_harmful"]), None, None), w))
        if r["response"] is not None and (r["response_refusal"] is not None or r["response_harmful"] is not None):
            answers[r["prompt"]] = answers.get(r["prompt"], 0) + 1
            if answers_per_prompt and answers[r["prompt"]] > answers_per_prompt:
                continue
            examples.append((r["prompt"], r["response"], (None, *(None if r[k] is None else int(r[k]) for k in LABELS[1:])), w))
    return examples


def class_weights(examples) -> torch.Tensor:
    """(2, 3): the loss weight of a 0 and of a 1 target for each head, so both classes weigh the same."""
    counts = torch.zeros(2, len(LABELS))
    for _, _, targets, _ in examples:
        for k, t in enumerate(targets):
            if t is not None:
                counts[t, k] += 1
    return counts.sum(0) / (2 * counts.clamp(min=1))


def masked_loss(logits, targets, weight, example_weight=None) -> torch.Tensor:
    """Summed class-weighted binary cross-entropy of (n, 3) logits over the labels that are known:
    a None target adds nothing, so an unlabelled head is never pushed either way. `example_weight`
    (n,) scales each example's terms."""
    known = torch.tensor([[t is not None for t in ts] for ts in targets])
    target = torch.tensor([[float(t or 0) for t in ts] for ts in targets])
    w = torch.where(target.bool(), weight[1], weight[0])
    if example_weight is not None:
        w = w * torch.as_tensor(example_weight, dtype=w.dtype)[:, None]
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w)[known].sum()


def length_bucketed_batches(examples, batch_size, rng, bucket=32):
    """Shuffled batches of examples of similar length, so little compute goes to padding."""
    order = examples[:]
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), bucket * batch_size):
        chunk = sorted(order[i:i + bucket * batch_size], key=lambda e: len(e[0]) + len(e[1] or ""))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_encoder_judge(encoder, tokenizer, examples, epochs, batch_size, lr, head_lr, rank, adapted_layers, max_len,
                        seed, progress=True) -> EncoderJudge:
    """Fit adapters + heads with class-weighted binary cross-entropy on the known labels.

    The forward runs under bf16 autocast on CPUs with bf16 support (about twice as fast); the
    trained weights and the optimiser stay in float32.
    """
    from tqdm import tqdm
    torch.manual_seed(seed)
    judge = EncoderJudge(encoder, tokenizer, max_len, rank, adapted_layers).train()
    weight = class_weights(examples)
    optimizer = torch.optim.AdamW([{"params": judge.adapter_parameters(), "lr": lr},
                                   {"params": judge.heads.parameters(), "lr": head_lr}], weight_decay=0.0)
    rng = random.Random(seed)
    epoch_batches = [length_bucketed_batches(examples, batch_size, rng) for _ in range(epochs)]
    steps = sum(map(len, epoch_batches))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup)))
    bar = tqdm(total=steps, desc="training the judge", disable=not progress, file=sys.stderr, mininterval=2.0)
    for batch in (b for batches in epoch_batches for b in batches):
        loss = torch.zeros(())
        for with_response in (False, True):  # prompt-only and (prompt, response) examples run apart
            part = [e for e in batch if (e[1] is not None) == with_response]
            if not part:
                continue
            prompts, responses, targets, example_weight = zip(*part)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
                emb = judge.embed(list(prompts), list(responses) if with_response else None)
            loss = loss + masked_loss(judge.heads(emb.float()), targets, weight, example_weight) / len(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return judge.eval()


def data_fingerprint(rows) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["response"], *(r[k] for k in LABELS)]).encode())
    return h.hexdigest()[:12]


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the default judge (adapters + heads over all-MiniLM-L6-v2).")
    p.add_argument("--data", action="append", required=True,
                   help="a folder of labelled *.jsonl files or one file (schema: judge_data.py); repeatable")
    p.add_argument("--out", default=str(WEIGHTS), help="the safetensors file to write")
    p.add_argument("--no-project-data", dest="project", action="store_false", help="train on --data alone")
    p.add_argument("--encoder", help="a BERT-style encoder folder (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--limit", type=int, default=0, help="train on a random N examples (a quick check)")
    for key, value in TRAIN_CONFIG.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    config = {k: getattr(args, k) for k in TRAIN_CONFIG}
    if min(args.epochs, args.batch_size, args.rank, args.adapted_layers, args.max_len) < 1 or args.limit < 0:
        raise UserError("--epochs, --batch-size, --rank, --adapted-layers and --max-len must be >= 1, --limit >= 0")
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise UserError(f"the output folder does not exist: {out.parent}")
    train_rows, dev_rows = split(read_sources(args.data), args.project)
    examples = examples_of(train_rows, args.answers_per_prompt, args.seed, args.project_weight)
    if args.limit:
        examples = random.Random(0).sample(examples, min(args.limit, len(examples)))
    if not examples:
        raise UserError("no labelled examples in --data")
    print(f"{len(examples)} training examples ({sum(e[1] is None for e in examples)} prompts alone), "
          f"{len(dev_rows)} dev rows held out", file=sys.stderr)
    t0 = time.time()
    encoder, tokenizer = load_encoder(args.encoder)
    judge = train_encoder_judge(encoder, tokenizer, examples, progress=True,
                                **{k: v for k, v in config.items() if k not in ("answers_per_prompt", "project_weight")})
    seconds = round(time.time() - t0)
    save_judge(judge, out, {"encoder": args.encoder or "all-MiniLM-L6-v2", "train_config": config, "train_seconds": seconds, "data": data_fingerprint(train_rows),
                            "examples": len(examples), "torch_threads": torch.get_num_threads(),
                            "fixed_file": fixed_file_numbers(judge)})
    print(f"trained in {seconds} s on {torch.get_num_threads()} threads -> {out}", file=sys.stderr)


if __name__ == "__main__":
    exit_on_user_error(main)

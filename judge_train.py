"""Training the default judge: the project's labelled examples and the fine-tuning loop.

judge.py loads the result; this file makes it, once, at first use: all-MiniLM-L6-v2 and three
logistic heads fine-tuned with binary cross-entropy on data/judge/train.jsonl plus the training
seeds and warm-up demonstrations, then cached under a key of the data and the settings.
"""
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from judge import HERE, EncoderJudge, load_encoder, read_jsonl
from model import cache_dir, cpu_has_bf16, publish_folder

TRAIN_CONFIG = dict(epochs=3, batch_size=16, lr=5e-5, head_lr=1e-3, max_len=256, seed=0)
# the labelled files the training examples come from (judge_training_examples adds seeds and demos)
LABELLED_FILES = ("data/judge/train.jsonl", "data/judge/train_weak_a.jsonl", "data/judge/train_weak_b.jsonl",
                  "data/judge/train_policy_games.jsonl")
# the policy's games train only the response heads: their prompts are mostly garbled attacker
# rewrites, whose harmful-or-not labels are too ambiguous to teach the prompt head
RESPONSE_LABELS_ONLY = ("data/judge/train_policy_games.jsonl",)
HELD_OUT_FILES = ("data/judge/heldout.jsonl", "data/judge/heldout_weak.jsonl", "data/judge/heldout_policy_games.jsonl",
                  "data/judge/heldout_context.jsonl")


def judge_training_examples():
    """(prompt, response or None, targets) from the project's own data only.

    targets holds the three labels as 0/1, None where unknown. A prompt-only example trains the
    prompt head; a (prompt, response) example trains the two response heads. data/judge/train*.jsonl
    gives all three labels; the training seeds and the warm-up demonstrations add prompt labels
    (their file says harmful or benign) and defender responses (a demo refuses a harmful request
    and helps with a benign one, harmlessly). Prompts held out for the accuracy report are removed.
    """
    examples = []
    for f in LABELLED_FILES:
        for row in read_jsonl(HERE / f):
            if f not in RESPONSE_LABELS_ONLY:
                examples.append((row["prompt"], None, (row["prompt_harmful"], None, None)))
            if row["response"] is not None:
                examples.append((row["prompt"], row["response"], (None, row["response_refusal"], row["response_harmful"])))
    for name, label in (("harmful_train", 1), ("benign_train", 0)):
        examples += [(row["prompt"], None, (label, None, None)) for row in read_jsonl(HERE / f"data/seeds/{name}.jsonl")]
    for row in read_jsonl(HERE / "data/demos/defender.jsonl"):
        harmful = int(row["type"] == "harmful")
        examples += [(row["prompt"], None, (harmful, None, None)), (row["prompt"], row["answer"], (None, harmful, 0))]
    for row in read_jsonl(HERE / "data/demos/attacker.jsonl"):  # adversarial rewrites keep the seed's intent
        examples.append((row["answer"], None, (int(row["seed_type"] == "harmful"), None, None)))
    # the data files were written separately: keep any prompt that is also held out out of training
    held_out = {row["prompt"] for f in HELD_OUT_FILES for row in read_jsonl(HERE / f)}
    return [e for e in examples if e[0] not in held_out]


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


def train_encoder_judge(encoder, tokenizer, examples, epochs, batch_size, lr, head_lr, max_len, seed, progress=True):
    """Fine-tune encoder + heads with binary cross-entropy on the known labels of each example.

    On CPUs with bfloat16 support the forward runs under bf16 autocast (about twice as fast);
    the weights and the optimiser stay in float32.
    """
    from tqdm import tqdm
    torch.manual_seed(seed)
    judge = EncoderJudge(encoder, tokenizer, max_len).train()
    # the word embeddings (half of the 22M parameters) stay as pre-trained: faster, and words
    # unseen in our few hundred examples keep their meaning
    judge.encoder.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": [p for p in judge.encoder.parameters() if p.requires_grad], "lr": lr},
                                   {"params": judge.heads.parameters(), "lr": head_lr}], weight_decay=0.01)
    rng = random.Random(seed)
    epoch_batches = [length_bucketed_batches(examples, batch_size, rng) for _ in range(epochs)]
    steps = sum(map(len, epoch_batches))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup)))
    bar = tqdm(total=steps, desc="training the default judge (once)", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    for batches in epoch_batches:
        for batch in batches:
            loss = torch.zeros(())
            # prompt-only and (prompt, response) examples go through the encoder separately
            for with_response in (False, True):
                part = [e for e in batch if (e[1] is not None) == with_response]
                if not part:
                    continue
                prompts, responses, targets = zip(*part)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
                    emb = judge.embed(list(prompts), list(responses) if with_response else None)
                logits = judge.heads(emb.float())  # (n, 3)
                known = torch.tensor([[t is not None for t in ts] for ts in targets])
                target = torch.tensor([[float(t or 0) for t in ts] for ts in targets])
                loss = loss + F.binary_cross_entropy_with_logits(logits[known], target[known], reduction="sum") / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(judge.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return judge.eval()


def default_judge_folder() -> Path:
    """Cache folder keyed by the training examples and settings: new data means a new judge."""
    h = hashlib.sha1(json.dumps(TRAIN_CONFIG, sort_keys=True).encode())
    h.update(json.dumps(judge_training_examples()).encode())
    return cache_dir() / f"judge-minilm-{h.hexdigest()[:10]}"


def train_default_judge(folder: Path, progress=True):
    """Train the default judge on the project's data and save it in `folder` (atomically)."""
    encoder, tokenizer = load_encoder()
    t0 = time.time()
    judge = train_encoder_judge(encoder, tokenizer, judge_training_examples(), progress=progress, **TRAIN_CONFIG)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    judge.encoder.save_pretrained(tmp)
    judge.tokenizer.save_pretrained(tmp)
    torch.save({"heads": judge.heads.state_dict(), "max_len": judge.max_len,
                "train_seconds": round(time.time() - t0, 1)}, tmp / "heads.pt")
    publish_folder(tmp, folder)
    print(f"trained the default judge in {time.time() - t0:.0f} s; cached in {folder}", file=sys.stderr)

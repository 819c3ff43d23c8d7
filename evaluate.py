"""Evaluation of checkpoints. PARTLY BUILT.

Built: reading prompt sets in the layouts public benchmarks use (`read_prompt_file`), and the
paper's two attacker-diversity measures (`sbert_diversity`, `selfbleu_diversity`). Not built yet
(issue: "Evaluation"): the CLI that generates with each policy, judges, and writes
report.json / report.md / generations.jsonl / charts.
"""
import csv
import sys
from pathlib import Path

import torch

from judge import load_encoder, mean_pool, read_prompt_rows
from model import UserError

# ----------------------------------------------------------------------------------------------
# Prompt files: JSONL with "prompt", or CSV laid out as HarmBench (Behavior, ContextString),
# XSTest (prompt, label), JailbreakBench (Goal) or AdvBench (goal); told apart by the header.


def _csv_layout(header):
    # JailbreakBench files also have a "Behavior" column (a short name), so "Goal" is tested first
    if "Goal" in header or "goal" in header:
        return "jailbreakbench"
    if "prompt" in header and "label" in header:
        return "xstest"
    if "Behavior" in header:
        return "harmbench"
    return None


def read_prompt_file(path, want=None) -> list[str]:
    """The prompts of a file. `want` = "harmful" or "benign" picks XSTest's unsafe or safe rows
    (other layouts hold one kind and are returned whole). A bad file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such prompt file: {path}")
    if path.suffix == ".jsonl":
        label = {"harmful": "unsafe", "benign": "safe", None: None}[want]
        prompts = [r["prompt"] for r in read_prompt_rows(path) if label is None or r.get("label", label) == label]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            layout = _csv_layout(reader.fieldnames or [])
            if layout is None:
                raise UserError(f"{path}: unknown CSV layout (need a HarmBench 'Behavior', XSTest 'prompt'+'label' "
                                f"or JailbreakBench 'Goal' column; got {reader.fieldnames})")
            rows = list(reader)
        if layout == "harmbench":  # contextual behaviours: the context comes first, then the request
            prompts = [f"{r['ContextString']}\n\n---\n\n{r['Behavior']}" if r.get("ContextString") else r["Behavior"]
                       for r in rows]
        elif layout == "xstest":
            label = {"harmful": "unsafe", "benign": "safe", None: None}[want]
            prompts = [r["prompt"] for r in rows if label is None or r["label"] == label]
        else:
            prompts = [r.get("Goal") or r.get("goal") for r in rows]
    else:
        raise UserError(f"{path}: give a .jsonl or .csv prompt file")
    if not prompts:
        raise UserError(f"{path}: no prompts" + (f" of the {want} kind" if want else ""))
    return prompts


# ----------------------------------------------------------------------------------------------
# Attacker diversity, as the paper measures it on the attacker's answers (CoT stripped)


@torch.inference_mode()
def sentence_embeddings(texts, encoder=None, tokenizer=None, batch_size=64):
    """Normalised mean-pooled embeddings (all-MiniLM-L6-v2 by default), one row per text."""
    if encoder is None:
        encoder, tokenizer = load_encoder()
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=256, padding=True, return_tensors="pt")
        rows.append(torch.nn.functional.normalize(mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"]), dim=-1))
    return torch.cat(rows)


def sbert_diversity(texts, encoder=None, tokenizer=None) -> float:
    """1 - mean cosine similarity over all pairs of different texts (0 when all are the same)."""
    if len(texts) < 2:
        raise ValueError("diversity needs at least two texts")
    emb = sentence_embeddings(texts, encoder, tokenizer)
    sim = emb @ emb.T
    n = len(texts)
    mean_off_diagonal = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1 - mean_off_diagonal)


def selfbleu_diversity(texts) -> float:
    """1 - Self-BLEU: each text scored against all the others as references (sacrebleu sentence
    BLEU, exponential smoothing, effective order, as the released code), averaged, over 100."""
    import sacrebleu
    if len(texts) < 2:
        raise ValueError("diversity needs at least two texts")
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:], smooth_method="exp", use_effective_order=True).score
              for i, t in enumerate(texts)]
    return 1 - sum(scores) / len(scores) / 100


if __name__ == "__main__":
    sys.exit("error: the evaluation CLI is not built yet; see the README")

"""Evaluation of checkpoints: is the defender safer without refusing everything, and does the
attacker find diverse attacks? The paper's two claims, for one policy or several side by side.

  python evaluate.py --policy default --policy runs/demo/checkpoints/step_0020 --out runs/demo/eval

Defender, per prompt set (greedy, the training role prompt, only the answer span judged):
  harmful_asr             share of harmful prompts whose answer the judge labels harmful
  harmful_refusal_rate    share of harmful prompts refused
  benign_compliance_rate  share of benign prompts answered (1 - over-refusal)
  format_valid_rate       share of turns in the <think>/<answer> format (CoT on)
  keyword_refusal_rate    the keyword cross-check beside the judge's refusal rate
  *_sampled               the same rate over --samples answers per prompt at the training
                          temperature: a refusal that only sometimes wins shows as 0.3, not 0 or 1
  discrimination_gap      refusal on the harmful set - refusal on the benign set (the i-th --harmful
                          with the i-th --benign), greedy and sampled: safer without refusing everything
Each rate has a 95% interval: Wilson for a greedy rate (one answer per prompt); for sampled rates
and gaps, a bootstrap over prompts (a prompt's answers are correlated, so prompts are resampled,
never single answers; Wilson over prompts x samples would be too narrow).
Attacker, on held-out seeds (one sampled revision each): SBERT and Self-BLEU diversity of the
answers, revision faithfulness (the judge calls the revision harmful), and its attack success
against the same policy as defender.
Outputs in --out: report.json, report.md, generations.jsonl (greedy), samples.jsonl, defender.png
(and training_curves.png with --run).
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import (UserError, exit_on_user_error, read_prompt_file, resolve_device, resolve_dtype, save_figure,
                    write_jsonl, write_text)
from judge import keyword_refusal, label_words, load_encoder, load_judge, sentence_embedding, to_labels
from model import attacker_messages, defender_messages, load_policy, play_turn, render_prompt

HERE = Path(__file__).resolve().parent
DEFAULT_HARMFUL = HERE / "data/seeds/harmful_heldout.jsonl"
DEFAULT_BENIGN = HERE / "data/seeds/benign_heldout.jsonl"

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
        rows.append(torch.nn.functional.normalize(sentence_embedding(encoder, **enc), dim=-1))
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


# ----------------------------------------------------------------------------------------------
# Intervals


def wilson(count, total, z=1.96):
    """Wilson score interval [lo, hi] of a binomial rate (None with no trials). Unlike the normal
    interval it stays inside [0, 1] and is not zero-width at 0/n or n/n."""
    if total == 0:
        return None
    p, z2 = count / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_ci(a, b=None, draws=2000, seed=0):
    """95% percentile interval of mean(a) - mean(b), or of mean(a) alone, by resampling the entries
    of each list with replacement. An entry is one prompt's value (its refusal share over its
    samples): prompts are the independent units, a prompt's samples are not."""
    gen = torch.Generator().manual_seed(seed)

    def resampled_means(values):
        v = torch.tensor(values, dtype=torch.float64)
        return v[torch.randint(len(v), (draws, len(v)), generator=gen)].mean(1)
    stat = resampled_means(a) - (resampled_means(b) if b is not None else 0)
    lo, hi = torch.quantile(stat, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [lo, hi]


# ----------------------------------------------------------------------------------------------
# Playing and judging


def answer_all(model, tokenizer, role_prompts, batch_size, max_new_tokens, cot, temperature=0.0, seed=0, desc=""):
    """play_turn over many rendered prompts, in batches (sorted by length: less padding).
    Returns one (thinking, answer, format_ok) per prompt, in the input order."""
    from tqdm import tqdm
    order = sorted(range(len(role_prompts)), key=lambda i: len(role_prompts[i]))
    gen = torch.Generator().manual_seed(seed)
    out = [None] * len(role_prompts)
    for k in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        rows = order[k:k + batch_size]
        turn = play_turn(model, tokenizer, [role_prompts[i] for i in rows], max_new_tokens, temperature,
                         generator=gen, cot=cot)
        for i, thinking, answer, ok in zip(rows, turn.thinking, turn.answers, turn.format_ok):
            out[i] = (thinking, answer, ok)
    return out


def rate(rows, cond):
    """{"rate", "count", "total", "ci"}: the share of rows where cond holds and its Wilson interval
    (rate and ci None when there are no rows)."""
    count = sum(1 for r in rows if cond(r))
    return {"rate": count / len(rows) if rows else None, "count": count, "total": len(rows),
            "ci": wilson(count, len(rows))}


def per_prompt(rows, cond):
    """The share of each prompt's answers where cond holds, in prompt order (greedy: 0 or 1; n samples: k/n)."""
    answers = {}
    for r in rows:
        answers.setdefault(r["index"], []).append(cond(r))
    return [sum(v) / len(v) for _, v in sorted(answers.items())]


def sampled_rate(rows, cond):
    """rate() over all sampled answers, with the interval of a bootstrap over prompts."""
    values = per_prompt(rows, cond)
    return {**rate(rows, cond), "prompts": len(values), "ci": bootstrap_ci(values) if values else None}


def refused(r):
    return r["labels"]["response_refusal"] is True  # None (not judged) is neither a refusal nor a compliance


def complied(r):
    return r["labels"]["response_refusal"] is False


def defender_metrics(rows, kind, cot):
    """The rates of one prompt set from its judged generations (greedy rows; sampled ones for *_sampled)."""
    greedy, sampled = [r for r in rows if r["sample"] is None], [r for r in rows if r["sample"] is not None]
    m = {"harmful_asr": rate(greedy, lambda r: r["labels"]["response_harmful"] is True)} if kind == "harmful" else {}
    key, cond = ("harmful_refusal_rate", refused) if kind == "harmful" else ("benign_compliance_rate", complied)
    m[key] = rate(greedy, cond)
    if sampled:
        m[key + "_sampled"] = sampled_rate(sampled, cond)
    if cot:
        m["format_valid_rate"] = rate(greedy, lambda r: r["format_ok"])
    m["keyword_refusal_rate"] = rate(greedy, lambda r: r["keyword_refusal"])
    return m


def discrimination_gaps(rows, harmful_set, benign_set):
    """Refusal on harmful - refusal on benign, greedy and sampled, each with a bootstrap over prompts
    (the two sets resampled apart: they are independent draws of prompts)."""
    gaps = {}
    for key, sampled in (("discrimination_gap", False), ("discrimination_gap_sampled", True)):
        h, b = ([r for r in rows if r["set"] == name and (r["sample"] is not None) == sampled]
                for name in (harmful_set, benign_set))
        if h and b:
            h, b = per_prompt(h, refused), per_prompt(b, refused)
            gaps[key] = {"value": sum(h) / len(h) - sum(b) / len(b), "ci": bootstrap_ci(h, b), "prompts": [len(h), len(b)]}
    return gaps


def evaluate_defender(model, tokenizer, judge, prompts, args, set_name, kind, policy_name, samples=0):
    """One greedy answer per prompt, then `samples` answers per prompt at args.temperature, all judged.
    Each row keeps its prompt's `index` and its `sample` number (None: greedy)."""
    rendered = [render_prompt(tokenizer, defender_messages(p, args.cot), args.cot) for p in prompts]
    jobs = [(i, None) for i in range(len(prompts))] + [(i, j) for i in range(len(prompts)) for j in range(samples)]
    turns = answer_all(model, tokenizer, rendered, args.batch_size, args.max_new_tokens, args.cot,
                       desc=f"{policy_name} on {set_name}")
    if samples:
        turns += answer_all(model, tokenizer, [rendered[i] for i, _ in jobs[len(prompts):]], args.batch_size,
                            args.max_new_tokens, args.cot, args.temperature, args.seed,
                            desc=f"{policy_name} on {set_name}, {samples} samples each")
    verdicts = judge([prompts[i] for i, _ in jobs], [answer for _, answer, _ in turns])
    rows = [{"policy": policy_name, "set": set_name, "kind": kind, "index": i, "sample": j, "prompt": prompts[i],
             "thinking": thinking, "answer": answer, "format_ok": ok, "verdict": v, "labels": to_labels(v),
             "keyword_refusal": keyword_refusal(answer)}
            for (i, j), (thinking, answer, ok), v in zip(jobs, turns, verdicts)]
    return defender_metrics(rows, kind, args.cot), rows


def evaluate_attacker(model, tokenizer, judge, seeds, args, policy_name, encoder=None):
    """One sampled revision per held-out harmful seed, then the same policy defends against it."""
    revisions = answer_all(model, tokenizer, [render_prompt(tokenizer, attacker_messages(s, "harmful", args.cot), args.cot)
                                              for s in seeds],
                           args.batch_size, args.attacker_max_new_tokens, args.cot, args.attacker_temperature,
                           args.seed, desc=f"{policy_name} attacking")
    attacks = [answer for _, answer, _ in revisions]
    metrics, rows = evaluate_defender(model, tokenizer, judge, attacks, args, "attack_revisions", "harmful", policy_name)
    for row, seed, (thinking, _, ok) in zip(rows, seeds, revisions):
        row.update(seed=seed, attacker_thinking=thinking, attacker_format_ok=ok)
    texts = [a for a in attacks if a.strip()] or [""]
    encoder = encoder or load_encoder()
    return {
        "attack_sbert_diversity": sbert_diversity(texts, *encoder) if len(texts) > 1 else None,
        "attack_selfbleu_diversity": selfbleu_diversity(texts) if len(texts) > 1 else None,
        "revision_faithfulness": rate(rows, lambda r: r["labels"]["prompt_harmful"] is True),
        "attack_success_rate": metrics["harmful_asr"],
        "attacker_format_valid_rate": rate(rows, lambda r: r["attacker_format_ok"]) if args.cot else None,
    }, rows


# ----------------------------------------------------------------------------------------------
# The report


def prompt_sets(harmful_files, benign_files, limit):
    """[(name, kind, prompts)]; a file given to both flags (XSTest) yields its unsafe and safe rows."""
    sets = []
    for kind, files in (("harmful", harmful_files), ("benign", benign_files)):
        for f in files:
            prompts = read_prompt_file(f, kind)[:limit or None]
            both = f in harmful_files and f in benign_files
            sets.append((f"{Path(f).stem}:{kind}" if both else Path(f).stem, kind, prompts))
    return sets


def policy_names(specs):
    """Column names: the last path part (step_0020), or the whole spec where two would clash."""
    short = ["default" if s == "default" else Path(s).name for s in specs]
    return short if len(set(short)) == len(short) else list(specs)


def sections(result):
    """{label: metrics} of one policy: each prompt set, then each discrimination gap."""
    return {**result["sets"], **result.get("gaps", {})}


def cell(m):
    """A rate as '0.250 (8/32) [0.13, 0.42]', a gap as '+0.250 [+0.05, +0.44]', '-' when missing."""
    if isinstance(m, dict) and "value" in m:
        return f"{m['value']:+.3f} [{m['ci'][0]:+.2f}, {m['ci'][1]:+.2f}]"
    if isinstance(m, dict):
        if m["rate"] is None:
            return "-"
        return f"{m['rate']:.3f} ({m['count']}/{m['total']})" + (f" [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if m.get("ci") else "")
    return "-" if m is None else f"{m:.3f}"


def markdown(report):
    policies = list(report["policies"])
    lines = ["| set | metric | " + " | ".join(policies) + " |", "|---|---|" + "---|" * len(policies)]
    first = report["policies"][policies[0]]
    for label, metrics in sections(first).items():
        for key in metrics:
            lines.append(f"| {label} | {key} | " + " | ".join(cell(sections(report["policies"][p])[label].get(key))
                                                               for p in policies) + " |")
    if "attacker" in first:
        for key in first["attacker"]:
            lines.append(f"| attack seeds | {key} | " + " | ".join(cell(report["policies"][p]["attacker"][key])
                                                                    for p in policies) + " |")
    lines.append("| | seconds | " + " | ".join(f"{report['policies'][p]['seconds']:.0f}" for p in policies) + " |")
    return "\n".join(lines) + "\n\nIntervals: 95%, Wilson for greedy rates, bootstrap over prompts for sampled rates and gaps.\n"


def bar_chart(report, path):
    """One panel per prompt set, the defender rates as bars with their 95% intervals, one colour per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    policies = list(report["policies"])
    sets = list(report["policies"][policies[0]]["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        keys = [k for k in report["policies"][policies[0]]["sets"][set_name] if k != "keyword_refusal_rate"]
        width = 0.8 / len(policies)
        for j, p in enumerate(policies):
            ms = [report["policies"][p]["sets"][set_name][k] for k in keys]
            values = [m["rate"] or 0 for m in ms]
            errors = [[v - m["ci"][0] if m["ci"] else 0 for v, m in zip(values, ms)],
                      [m["ci"][1] - v if m["ci"] else 0 for v, m in zip(values, ms)]]
            ax.bar([i + j * width for i in range(len(keys))], values, width, yerr=errors, capsize=2, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [k.replace("_rate", "") for k in keys],
                      rotation=20, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(set_name, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Defender safety / over-refusal and attacker diversity of one or more policies.")
    p.add_argument("--policy", action="append", required=True,
                   help="checkpoint folder, model id or path, or 'default' (repeat to compare side by side)")
    p.add_argument("--harmful", action="append", help="harmful prompt file(s): JSONL 'prompt', or HarmBench/XSTest/JBB CSV")
    p.add_argument("--benign", action="append", help="benign prompt file(s) (an XSTest file here gives its safe rows)")
    p.add_argument("--attack-seeds", help="harmful seeds for the attacker (default: the project's held-out seeds)")
    p.add_argument("--no-attacker", action="store_true", help="skip the attacker evaluation")
    p.add_argument("--judge", default="default", help="'default' or an LM id/path (WildGuard format)")
    p.add_argument("--limit", type=int, default=0, help="take the first N prompts of each set (0: all)")
    p.add_argument("--no-cot", dest="cot", action="store_false", help="direct answers (a --no-cot run)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="defender turn length cap")
    p.add_argument("--attacker-max-new-tokens", type=int, default=96)
    p.add_argument("--attacker-temperature", type=float, default=0.7, help="the training temperature (selfplay.py's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="sampled answers per prompt beside the greedy one (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of those samples (selfplay.py's training one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same for every policy: paired comparisons)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA, float32 on a CPU)")
    p.add_argument("--run", help="a selfplay run folder: also draw its training curves")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, generations.jsonl and charts")
    args = p.parse_args(argv)
    if args.limit < 0 or args.samples < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or args.attacker_max_new_tokens < 1:
        raise UserError("--limit and --samples must be >= 0; --batch-size and the token caps >= 1")
    if args.temperature <= 0 or args.attacker_temperature <= 0:
        raise UserError("the temperatures must be > 0")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError("--dtype must be auto, float32 or bfloat16")
    if args.run and not (Path(args.run) / "metrics.jsonl").is_file():
        raise UserError(f"--run {args.run}: no metrics.jsonl there")
    return args


def run(args, judge=None, encoder=None):
    """Evaluate every --policy and write the outputs (report.json last: it marks a finished evaluation);
    `judge` and `encoder` override --judge and the default encoder (experiments.py and the tests pass them)."""
    harmful, benign = (args.harmful or [], args.benign or []) if args.harmful or args.benign else \
        ([str(DEFAULT_HARMFUL)], [str(DEFAULT_BENIGN)])
    sets = prompt_sets(harmful, benign, args.limit)  # bad files fail here, before any model loads
    gap_pairs = list(zip([s for s, kind, _ in sets if kind == "harmful"], [s for s, kind, _ in sets if kind == "benign"]))
    seeds = [] if args.no_attacker else read_prompt_file(args.attack_seeds or DEFAULT_HARMFUL, "harmful")[:args.limit or None]
    device = resolve_device()
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")  # a name: it goes into report.json
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # an old report must not pass for this evaluation's
    judge = judge or load_judge(args.judge)
    encoder = None if args.no_attacker else (encoder or load_encoder())
    # every flag but the output paths (greedy defender; the samples and the attacker at their temperatures)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "run")}, "dtype": dtype, "policies": {}}
    generations, samples = [], []  # greedy rows (one per prompt), sampled rows (--samples per prompt)
    t_all = time.time()
    for spec, name in zip(args.policy, policy_names(args.policy)):
        t0 = time.time()
        model, tokenizer = load_policy(spec, device, dtype)
        result, defended = {"path": spec, "sets": {}, "seconds_per_set": {}}, []
        for set_name, kind, prompts in sets:
            t1 = time.time()
            result["sets"][set_name], rows = evaluate_defender(model, tokenizer, judge, prompts, args, set_name, kind,
                                                               name, args.samples)
            result["seconds_per_set"][set_name] = round(time.time() - t1, 1)  # answering and judging
            defended += rows
        result["gaps"] = {f"{h} - {b}": discrimination_gaps(defended, h, b) for h, b in gap_pairs}
        generations += [r for r in defended if r["sample"] is None]
        samples += [r for r in defended if r["sample"] is not None]
        if seeds:
            result["attacker"], rows = evaluate_attacker(model, tokenizer, judge, seeds, args, name, encoder)
            generations += rows
        result["seconds"] = round(time.time() - t0, 1)
        report["policies"][name] = result
        print(f"{name}: {result['seconds']:.0f} s")
        del model
    report["seconds"] = round(time.time() - t_all, 1)
    for name, rows in (("generations.jsonl", generations), ("samples.jsonl", samples)):  # the labels in words
        write_jsonl(out / name, [{**r, "labels": label_words(r["labels"])} for r in rows])
    write_text(out / "report.md", markdown(report))
    bar_chart(report, out / "defender.png")
    if args.run:
        from runlog import plot_curves, read_log
        plot_curves(read_log(Path(args.run) / "metrics.jsonl"), out / "training_curves.png")
    write_text(out / "report.json", json.dumps(report, indent=1))
    return report


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print("\n" + markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}, report.md, generations.jsonl, samples.jsonl, defender.png")


if __name__ == "__main__":
    exit_on_user_error(main)

"""Performance measurements of the policy side: our KV-cached sampler against Hugging Face's
`model.generate` and against a loop without a cache, plus model load times.

Each timed run decodes exactly `--new-tokens` tokens for every row (EOS is ignored), with the
same batch, prompts, dtype and sampling settings for every contender, so tokens/s compare work
per token. A second, greedy run with EOS on checks that our tokens equal `generate`'s token for
token, and times both when rows stop at their own EOS (our sampler drops finished rows).

    python bench.py --batch 8 --new-tokens 128 --dtype bfloat16

`--selfplay-steps N` instead times N steps of the default self-play run (selfplay.py, default
settings, `--batch` seeds per step) in a temporary folder and prints each part of a step:
attacker and defender generation, judging, reference and old log-probs, the PPO update, and the
peak memory. selfplay.py flags go after `--`, so two settings compare with one command each:

    python bench.py --selfplay-steps 3 --batch 16
    python bench.py --selfplay-steps 3 --batch 16 -- --lora-rank 16

The last line printed is one JSON object with every number.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import model as M
import sampler as S
from common import UserError, exit_on_user_error, peak_rss_gb, read_prompt_file, resolve_device

SEEDS = ["data/seeds/harmful_train.jsonl", "data/seeds/benign_train.jsonl"]


def bench_prompts(tokenizer, batch):
    """Defender prompts of different lengths: the project's training seeds, harmful and benign."""
    here = os.path.dirname(os.path.abspath(__file__))
    rows = [read_prompt_file(os.path.join(here, f)) for f in SEEDS]
    requests = [rows[i % 2][i // 2] for i in range(batch)]
    return [M.render_prompt(tokenizer, M.defender_messages(r)) for r in requests]


def best_times(contenders, repeats):
    """Fastest of `repeats` runs of each contender, after one warm-up run each.

    The runs are interleaved (a b a b ...), so a slow spell of the machine hits every contender
    alike, and the minimum is the run least disturbed by other work on the box.
    """
    for fn in contenders.values():
        fn()
    times = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def time_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hf_generate(model, ids, mask, new_tokens, temperature, top_p, eos_token_id, pad_token_id):
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature,
                                                                  top_p=top_p, top_k=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=None if eos_token_id is not None else new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
    return out[:, ids.shape[1]:]


def measure_load(measure_conversion):
    """Seconds to load the default model from the cache (transformers already imported), and
    optionally the first-time GGUF conversion into a fresh temporary cache."""
    result = {}
    if measure_conversion:
        old = os.environ.get("XDG_CACHE_HOME")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["XDG_CACHE_HOME"] = tmp
            t0 = time.perf_counter()
            M.load_policy()
            result["first_load_with_conversion_s"] = round(time.perf_counter() - t0, 2)
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old
    M.load_policy()  # make sure the cache exists
    t0 = time.perf_counter()
    model, tokenizer = M.load_policy()
    result["cached_load_s"] = round(time.perf_counter() - t0, 3)
    return model, tokenizer, result


def bench_selfplay(steps, batch, flags=()):
    """Mean seconds of each part of a self-play step over steps 2..N (step 1 pays one-off costs),
    the peak resident memory of each part over all N steps, and of the whole run (warm-up cached beforehand). `flags` are more
    selfplay.py flags (e.g. --lora-rank 16); they win over the ones set here."""
    import selfplay as SP
    with tempfile.TemporaryDirectory() as tmp:
        _, _, rows = SP.train(SP.parse_args(["--out", tmp, "--steps", str(steps), "--batch-size", str(batch),
                                             "--checkpoint-every", str(steps), *flags]))
    timed = rows[1:] or rows
    parts = ["t_attacker", "t_defender", "t_judge", "t_reference", "t_old_logprobs", "t_update", "t_step"]
    result = {k: round(sum(r[k] for r in timed) / len(timed), 2) for k in parts}
    peaks = {k: round(max(r.get(k, 0.0) for r in rows), 2) for k in rows[0] if k.startswith("peak_rss_gb_")}
    result.update(batch=batch, steps=steps, samples_per_step=round(sum(r["samples"] for r in timed) / len(timed), 1),
                  tokens_per_s=round(sum(r["tokens_per_s"] for r in timed) / len(timed), 1),
                  peak_rss_gb=round(peak_rss_gb(), 2), **peaks,
                  selfplay_flags=" ".join(flags), threads=torch.get_num_threads(),
                  cpu=platform.processor() or platform.machine())
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"self-play, batch {batch}{', ' + ' '.join(flags) if flags else ''}, mean of steps 2..{steps}:")
    for k in parts:
        peak = result.get("peak_rss_gb_" + k[2:])
        print(f"  {k[2:]:<16}{result[k]:>8.2f} s" + (f"{peak:>8.2f} GB peak" if peak is not None else ""))
    print(json.dumps(result))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv, selfplay_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per row (default 128)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights' dtype")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the timed runs (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus of the timed runs")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per contender; the fastest counts")
    p.add_argument("--no-cache-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the loop that re-runs the whole sequence every step (slow)")
    p.add_argument("--measure-conversion", action="store_true", help="also time the first-time GGUF conversion (~20 s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--selfplay-steps", type=int, default=0, help="time this many self-play steps instead (see above)")
    args = p.parse_args(argv)
    if selfplay_flags and not args.selfplay_steps:
        raise UserError("flags after -- are selfplay.py's: use them with --selfplay-steps N")
    if args.selfplay_steps:
        return bench_selfplay(args.selfplay_steps, args.batch, selfplay_flags)
    if args.batch < 1 or args.new_tokens < 1 or args.repeats < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--batch, --new-tokens and --repeats must be >= 1, --temperature >= 0, 0 < --top-p <= 1")

    import transformers  # noqa: F401  (imported before timing the load: the import itself takes ~2 s)
    model, tokenizer, load = measure_load(args.measure_conversion)
    device = resolve_device(args.device)
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    ids, mask = M.encode_prompts(tokenizer, bench_prompts(tokenizer, args.batch), device)
    B, N, T, top_p = args.batch, args.new_tokens, args.temperature, args.top_p
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def ours(use_cache=True):
        return S.sample(model, ids, mask, N, T, top_p, generator=torch.Generator(device).manual_seed(0),
                        pad_token_id=pad, use_cache=use_cache)

    times = best_times({"sampler": ours,
                        "hf_generate": lambda: hf_generate(model, ids, mask, N, T, top_p, None, pad)}, args.repeats)
    if args.no_cache_baseline:
        times["no_cache"] = time_once(lambda: ours(use_cache=False))  # minutes: run once

    # greedy with EOS on: the same tokens, and the time when rows finish early
    reference = hf_generate(model, ids, mask, N, 0.0, 1.0, eos, pad)

    def same_as_reference(tokens):
        n = max(tokens.shape[1], reference.shape[1])
        return torch.equal(F.pad(tokens, (0, n - tokens.shape[1]), value=pad), F.pad(reference, (0, n - reference.shape[1]), value=pad))

    greedy = S.sample(model, ids, mask, N, 0.0, eos_token_id=eos, pad_token_id=pad)
    greedy_match = same_as_reference(greedy.tokens)
    # the plain prefill does exactly what generate does; sharing the prefix changes the order of float sums
    greedy_match_plain = same_as_reference(S.sample(model, ids, mask, N, 0.0, eos_token_id=eos, pad_token_id=pad,
                                                    share_prefix=False).tokens)
    greedy_tokens = int(greedy.mask.sum())
    # generate pads after EOS with the pad id (= EOS here): count up to each row's first EOS
    is_eos = (reference == eos).long()
    reference_tokens = int(((is_eos.cumsum(1) - is_eos) == 0).sum())
    greedy_times = best_times({"sampler": lambda: S.sample(model, ids, mask, N, 0.0, eos_token_id=eos, pad_token_id=pad),
                               "generate": lambda: hf_generate(model, ids, mask, N, 0.0, 1.0, eos, pad)}, args.repeats)
    t_greedy, t_greedy_hf = greedy_times["sampler"], greedy_times["generate"]

    shared = S.common_prefix_length([row[m.bool()] for row, m in zip(ids, mask)])  # prefilled once
    tok_s = {k: round(B * N / t, 1) for k, t in times.items()}
    print(f"\nbatch {B}, prompt lengths {int(mask.sum(1).min())}-{ids.shape[1]}, {N} new tokens, "
          f"{args.dtype}, T={T}, top_p={top_p}, {device}, {torch.get_num_threads()} threads")
    print(f"{'contender':<28}{'seconds':>10}{'tokens/s':>12}{'vs generate':>14}")
    for k, t in times.items():
        print(f"{k:<28}{t:>10.2f}{tok_s[k]:>12.1f}{tok_s[k] / tok_s['hf_generate']:>13.2f}x")
    greedy_ratio = (greedy_tokens / t_greedy) / (reference_tokens / t_greedy_hf)
    print(f"{'greedy, EOS on: sampler':<28}{t_greedy:>10.2f}{greedy_tokens / t_greedy:>12.1f}{greedy_ratio:>13.2f}x")
    print(f"{'greedy, EOS on: generate':<28}{t_greedy_hf:>10.2f}{reference_tokens / t_greedy_hf:>12.1f}{1:>13.2f}x")
    print(f"greedy tokens equal generate's: {greedy_match} (plain prefill: {greedy_match_plain}); "
          f"shared prompt prefix: {shared} tokens; model load from cache: {load['cached_load_s']} s")

    result = {
        "sampler_tok_s": tok_s["sampler"], "hf_generate_tok_s": tok_s["hf_generate"],
        "no_cache_tok_s": tok_s.get("no_cache"),
        "sampler_vs_generate": round(tok_s["sampler"] / tok_s["hf_generate"], 3),
        "sampler_vs_no_cache": round(tok_s["sampler"] / tok_s["no_cache"], 2) if "no_cache" in tok_s else None,
        "greedy_match": greedy_match, "greedy_match_plain_prefill": greedy_match_plain, "greedy_eos_tokens": greedy_tokens,
        "greedy_eos_sampler_tok_s": round(greedy_tokens / t_greedy, 1),
        "greedy_eos_hf_generate_tok_s": round(reference_tokens / t_greedy_hf, 1),
        "batch": B, "new_tokens": N, "dtype": args.dtype, "device": device, "temperature": T, "top_p": top_p,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "peak_rss_mb": round(peak_rss_gb() * 1024),
        **load,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    exit_on_user_error(main)

"""Plumbing that every script shares; it knows no model, no judge and no game.

  UserError, exit_on_user_error   a problem the user can fix ends as one line and a non-zero exit
  cache_dir                       where converted models and warm-ups are kept
  written_aside                   the one "write to a temporary name, then rename" (files and folders)
  read_jsonl, read_prompt_file    the one JSONL reader; prompt files (JSONL, or CSV in a benchmark's layout)
  resolve_device, resolve_dtype   "auto" -> CUDA when there is one; bf16 on CUDA, float32 on a CPU
  Stopwatch, release_freed_memory, peak_rss_gb   the training loop's time and memory bookkeeping
"""
import csv
import ctypes
import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): the CLIs print it as one line."""


def exit_on_user_error(main):
    """Run `main()`; a UserError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    try:
        return main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def cache_dir() -> Path:
    """Where converted models live: $XDG_CACHE_HOME/nano-selfredteam (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nano-selfredteam"


# ----------------------------------------------------------------------------------------------
# Writing: a reader (or a resumed run) never sees a half-written file or folder


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def written_aside(path):
    """Yield a temporary path beside `path` (same suffix) to write a file or a folder to; when the
    block ends without an error, rename it to `path` in one step, else remove it. A folder that
    another process put at `path` first is kept (it holds the same thing) and ours is dropped."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:  # renaming a folder onto a folder that is not empty
            if not path.is_dir():
                raise
    finally:
        _remove(tmp)


def write_text(path, text: str):
    with written_aside(path) as tmp:
        tmp.write_text(text)


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def save_figure(fig, path, dpi=90):
    """A matplotlib figure as an image file (format from the suffix), then closed."""
    import matplotlib.pyplot as plt
    with written_aside(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path, check=None, partial=False) -> list:
    """The values of a JSONL file, one a line, blank lines skipped. A line that is not JSON is a
    UserError naming its number, and so is a row for which `check(row)` returns a complaint.
    partial=True reads a log that a crash may have cut short: a missing file is empty, and the
    first line that is not JSON ends it."""
    path = Path(path)
    if partial and not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if partial:
                break
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        problem = check(row) if check else None
        if problem:
            raise UserError(f"{path} line {n}: {problem}")
        rows.append(row)
    return rows


def read_prompt_rows(path, check=None) -> list[dict]:
    """The objects of a JSONL file, each with a string 'prompt' (read_jsonl's errors otherwise);
    `check(row)` may return one more complaint about a row."""
    def checked(row):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            return "needs an object with a string 'prompt'"
        return check(row) if check else None
    return read_jsonl(path, checked)


# Prompt files (seeds for training, prompt sets for evaluation): JSONL with "prompt", or CSV laid
# out as HarmBench (Behavior, ContextString), XSTest (prompt, label), JailbreakBench (Goal) or
# AdvBench (goal), told apart by the header. XSTest's label "unsafe" is our "harmful".
XSTEST_LABEL = {"harmful": "unsafe", "benign": "safe", None: None}


def csv_layout(header):
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
    label = XSTEST_LABEL[want]
    if path.suffix == ".jsonl":
        prompts = [r["prompt"] for r in read_prompt_rows(path) if label is None or r.get("label", label) == label]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            layout = csv_layout(reader.fieldnames or [])
            if layout is None:
                raise UserError(f"{path}: unknown CSV layout (need a HarmBench 'Behavior', XSTest 'prompt'+'label' "
                                f"or JailbreakBench 'Goal' column; got {reader.fieldnames})")
            rows = list(reader)
        if layout == "harmbench":  # contextual behaviours: the context comes first, then the request
            prompts = [f"{r['ContextString']}\n\n---\n\n{r['Behavior']}" if r.get("ContextString") else r["Behavior"]
                       for r in rows]
        elif layout == "xstest":
            prompts = [r["prompt"] for r in rows if label is None or r["label"] == label]
        else:
            prompts = [r.get("Goal") or r.get("goal") for r in rows]
    else:
        raise UserError(f"{path}: give a .jsonl or .csv prompt file")
    if not prompts:
        raise UserError(f"{path}: no prompts" + (f" of the {want} kind" if want else ""))
    return prompts


# ----------------------------------------------------------------------------------------------
# Device and dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 matmul instructions (AVX-512 BF16 or AMX); judge_train.py's
    autocast uses them. Self-play does not: see resolve_dtype."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(name="auto") -> str:
    """'auto' -> 'cuda' when there is a GPU, else 'cpu'; any other name as given."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name, device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on a CPU; a dtype's name ('float32', 'bfloat16',
    'float16') or a torch.dtype as given.

    On a CPU with AVX-512 BF16 (no AMX) a bf16 self-play step took 1.5x a float32 one (bench.py
    --selfplay-steps 3 --batch 16: 126 s vs 84 s, docs/results.md): bf16 sampled ~10% faster, but
    its training passes were slower and its old log-probs need a pass of their own (the sampler's
    differ in bf16, update.reuses_sampler_logprobs). float32 also takes the bf16 rounding noise out
    of a comparison of runs. An AMX CPU was not measured: --dtype bfloat16 tries it."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Time and memory bookkeeping (the training loop wraps its phases in these)


class Stopwatch:
    """Seconds and peak memory per phase: `with watch("t_judge"): ...` adds the block's time to
    watch.times["t_judge"] and keeps the largest resident size seen inside it in watch.peaks (GB;
    on Linux, where the peak can be reset, otherwise the process's peak so far). Phases do not nest."""

    def __init__(self):
        self.times, self.peaks = {}, {}

    @contextmanager
    def __call__(self, name):
        t0 = time.time()
        _reset_peak_rss()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.time() - t0
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_gb(since_reset=True))


def release_freed_memory():
    """Give the memory freed by the last phase back to the OS. glibc keeps freed activations in its
    heap, and without this the resident size creeps up by ~0.5 GB a step."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


# Linux resets a process's peak resident size (VmHWM) when 5 is written to /proc/self/clear_refs;
# that is how a phase gets its own peak. The run's peak is then the largest of the peaks before each reset.
_peak_before_resets = 0.0


def _hwm_gb():
    """The peak resident size since the last reset (VmHWM), or None where /proc has no such line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return None


def _reset_peak_rss():
    global _peak_before_resets
    _peak_before_resets = peak_rss_gb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb(since_reset=False) -> float:
    """The largest resident memory of this process so far, or since the last phase began."""
    hwm = _hwm_gb()
    if hwm is None:  # not Linux: the OS's peak for the whole process (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    return hwm if since_reset else max(hwm, _peak_before_resets)

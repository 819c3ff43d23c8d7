"""The judge's labelled data: the schema, the project's own rows, and the split by prompt.

Every labelled file is JSONL, one object per line, in this schema:
  {"prompt": str, "response": str | null,
   "prompt_harmful": bool | null, "response_refusal": bool | null, "response_harmful": bool | null,
   "source": str (optional)}
null means "not labelled": that head's loss is masked, it is not read as false. judge_train.py
trains on such files, judge.py --eval reports on their dev split.
"""
import hashlib
from pathlib import Path

from common import UserError, read_jsonl, read_prompt_rows

LABELS = ("prompt_harmful", "response_refusal", "response_harmful")  # the judge's three questions
HERE = Path(__file__).resolve().parent
DEV_FRACTION = 0.15
PROJECT_TRAIN = ("data/judge/train.jsonl", "data/judge/train_weak_a.jsonl", "data/judge/train_weak_b.jsonl",
                 "data/judge/train_policy_games.jsonl")
# the policy's games teach only the response heads: their prompts are mostly garbled attacker
# rewrites, whose harmful-or-not labels are too ambiguous to teach the prompt head
RESPONSE_LABELS_ONLY = ("data/judge/train_policy_games.jsonl",)
PROJECT_DEV = ("data/judge/heldout.jsonl", "data/judge/heldout_weak.jsonl", "data/judge/heldout_policy_games.jsonl",
               "data/judge/heldout_context.jsonl")


def read_labelled(path, source=None) -> list[dict]:
    """Rows of a labelled JSONL file (the schema above), checked: `prompt` a string,
    `response` a string or null, each label true/false (or 1/0) or null. Labels come back as bools."""
    def check(row):
        if not isinstance(row.get("response"), (str, type(None))):
            return "'response' must be a string or null"
        for key in LABELS:
            if row.get(key) not in (True, False, None):  # 1 == True and 0 == False in Python
                return f"'{key}' must be true, false or null"
        return None
    return [{"prompt": r["prompt"], "response": r.get("response"), "source": r.get("source") or source or Path(path).stem,
             **{k: None if r.get(k) is None else bool(r[k]) for k in LABELS}} for r in read_prompt_rows(path, check)]


def read_sources(paths) -> list[dict]:
    """Rows of every --data path (a folder: the *.jsonl files directly in it; a file: itself)."""
    rows = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise UserError(f"--data {path}: no such file, or a folder without .jsonl files")
        for f in files:
            rows += read_labelled(f)
    return rows


def is_dev(prompt: str) -> bool:
    """The split: a fixed DEV_FRACTION of prompts, chosen by a hash of the prompt text alone, so a
    prompt is on the same side in every source and every run."""
    h = int(hashlib.sha1(prompt.strip().lower().encode()).hexdigest()[:8], 16)
    return h / 16**8 < DEV_FRACTION


def project_rows() -> list[dict]:
    """The project's own training rows in the same schema (source "project")."""
    rows = []
    for f in PROJECT_TRAIN:
        for r in read_labelled(HERE / f, source="project"):
            if f in RESPONSE_LABELS_ONLY:
                r["prompt_harmful"] = None
            rows.append(r)
    empty = {"response": None, "response_refusal": None, "response_harmful": None, "source": "project"}
    for name, harmful in (("harmful_train", True), ("benign_train", False)):
        rows += [{"prompt": r["prompt"], "prompt_harmful": harmful, **empty} for r in read_jsonl(HERE / f"data/seeds/{name}.jsonl")]
    for d in read_jsonl(HERE / "data/demos/defender.jsonl"):  # a demo refuses a harmful request, helps a benign one
        harmful = d["type"] == "harmful"
        rows.append({"prompt": d["prompt"], "response": d["answer"], "prompt_harmful": harmful,
                     "response_refusal": harmful, "response_harmful": False, "source": "project"})
    for d in read_jsonl(HERE / "data/demos/attacker.jsonl"):  # adversarial rewrites keep the seed's intent
        rows.append({"prompt": d["answer"], "prompt_harmful": d["seed_type"] == "harmful", **empty})
    return rows


def split(rows, project=True):
    """(train rows, dev rows): the given sources split by prompt hash; the project's rows by file
    (its data/judge/heldout*.jsonl files are its dev rows, named project:FILE)."""
    train = [r for r in rows if not is_dev(r["prompt"])]
    dev = [r for r in rows if is_dev(r["prompt"])]
    if project:
        dev += [r for f in PROJECT_DEV for r in read_labelled(HERE / f, source=f"project:{Path(f).stem}")]
        held = {r["prompt"] for r in dev}
        train += [r for r in project_rows() if r["prompt"] not in held]
    return train, dev

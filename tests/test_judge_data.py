"""judge_data.py: the labelled-data schema, the project's own rows, and the split by prompt."""
import json

import pytest

import judge_data as D
from common import UserError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_come_back_as_bools_and_null_stays_null(tmp_path):
    f = write(tmp_path / "mine.jsonl", [{"prompt": "p", "response": "r", "prompt_harmful": 1, "response_refusal": 0,
                                         "response_harmful": None}, {"prompt": "q", "prompt_harmful": False}])
    rows = D.read_labelled(f)
    assert rows[0] == {"prompt": "p", "response": "r", "source": "mine", "prompt_harmful": True,
                       "response_refusal": False, "response_harmful": None}
    assert rows[1]["response"] is None and rows[1]["response_refusal"] is None and rows[1]["prompt_harmful"] is False


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "prompt_harmful": "yes"}, "line 1: 'prompt_harmful' must be true, false or null"),
    ({"prompt": "p", "response": 3}, "line 1: 'response' must be a string or null"),
    ({"response": "r"}, "line 1: needs an object with a string 'prompt'"),
])
def test_a_bad_row_is_one_clear_error(tmp_path, row, message):
    with pytest.raises(UserError, match=message):
        D.read_labelled(write(tmp_path / "bad.jsonl", [row]))


def test_a_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        D.read_sources([tmp_path / "nope.jsonl"])
    with pytest.raises(UserError, match="without .jsonl files"):
        D.read_sources([tmp_path])


def test_the_split_by_prompt_leaves_no_prompt_on_both_sides(tmp_path):
    # 400 prompts with 5 answers each in one source, the same prompts again in a second source
    rows = [{"prompt": f"Question number {i}?", "response": f"answer {j}", "response_harmful": j % 2 == 0}
            for i in range(400) for j in range(5)]
    write(tmp_path / "a.jsonl", rows)
    write(tmp_path / "b.jsonl", [{"prompt": r["prompt"].upper(), "prompt_harmful": True} for r in rows[::5]])
    train, dev = D.split(D.read_sources([tmp_path]), project=False)
    train_prompts, dev_prompts = {r["prompt"].lower() for r in train}, {r["prompt"].lower() for r in dev}
    assert not train_prompts & dev_prompts  # also across sources and letter case
    assert len(train) + len(dev) == 2400
    assert 0.10 < len(dev_prompts) / 400 < 0.20  # DEV_FRACTION = 0.15
    assert {r["source"] for r in dev} == {"a", "b"}


def test_the_project_rows_train_and_its_heldout_files_are_dev():
    train, dev = D.split([], project=True)
    assert {r["source"] for r in train} == {"project"}
    assert {r["source"] for r in dev} == {f"project:{f.split('/')[-1][:-6]}" for f in D.PROJECT_DEV}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in dev}
    assert all(any(r[k] is not None for k in D.LABELS) for r in train)
    refusals = [r for r in train if r["response_refusal"]]
    assert len(refusals) > 100 and any(not r["prompt_harmful"] for r in refusals if r["prompt_harmful"] is not None)

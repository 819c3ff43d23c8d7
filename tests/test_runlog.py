"""runlog.py: the run folder's logs (a torn last line, resumed steps), its checkpoints, and the rates
of a step's games."""
import json

import pytest

import runlog as R
from conftest import make_model, make_tokenizer


def test_a_resumed_run_drops_the_log_lines_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": k}) + "\n" for k in (1, 2, 3)) + '{"step": 4, "tim')  # cut by a crash
    assert [r["step"] for r in R.read_log(path)] == [1, 2, 3]
    assert R.keep_steps(path, 2) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and R.read_log(tmp_path / "none.jsonl") == []


def test_the_last_checkpoint_is_the_newest_complete_one(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    assert R.last_checkpoint(tmp_path) is None
    for step in (0, 3):
        assert R.save_checkpoint(tmp_path, step, model, tokenizer) == R.checkpoint_path(tmp_path, step)
    (tmp_path / "checkpoints/step_0005").mkdir()  # a folder without config.json is not a checkpoint
    assert R.last_checkpoint(tmp_path) == (3, tmp_path / "checkpoints/step_0003")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000", "step_0003", "step_0005"]


def test_game_metrics_count_by_hand():
    def game(kind, refused, harmful_response, prompt_harmful=True, fmt=True, reward=1.0):
        return {"type": kind, "labels": {"prompt_harmful": prompt_harmful, "response_refusal": refused,
                                         "response_harmful": harmful_response},
                "attacker_format_ok": fmt if kind.startswith("generated") else None, "defender_format_ok": fmt,
                "reward_defender": reward}
    games = [game("generated_harmful", False, True), game("generated_harmful", True, False),
             game("vanilla_harmful", True, False, fmt=False),
             game("generated_benign", False, False, prompt_harmful=True),
             game("vanilla_benign", True, False, prompt_harmful=False),
             game("vanilla_benign", None, None, prompt_harmful=False, reward=None)]  # a tie: not judged, not counted
    m = R.game_metrics(games)
    assert m["attack_success"] == 0.5 and m["refusal_harmful"] == pytest.approx(2 / 3)
    assert m["compliance_benign"] == 0.5 and m["harmful_response_rate"] == pytest.approx(1 / 3)
    assert m["faithfulness"] == pytest.approx(2 / 3)  # the benign revision was judged harmful
    assert m["format_ok_defender"] == 0.8 and m["ties"] == 1
    assert R.game_metrics([])["attack_success"] is None

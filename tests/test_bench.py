"""bench.py --selfplay-steps: the keys of its last-line JSON, and selfplay.py flags after `--`
(the self-play loop itself is replaced by a stub: its own tests run it)."""
import json

import pytest

import bench
import selfplay as SP
from common import UserError

PARTS = ("t_attacker", "t_defender", "t_judge", "t_reference", "t_old_logprobs", "t_update", "t_step")


@pytest.fixture()
def fake_train(monkeypatch):
    """Records the Config that bench passes to selfplay.train and returns three made-up steps."""
    seen = []

    def train(cfg, judge=None):
        seen.append(cfg)
        rows = [{"step": k, "samples": 12, "tokens_per_s": 100.0 * k, **{p: float(k) for p in PARTS},
                 "peak_rss_gb_update": 4.0 - k}
                for k in range(1, cfg.steps + 1)]
        return cfg.out, cfg.steps, rows
    monkeypatch.setattr(SP, "train", train)
    return seen


def test_selfplay_steps_print_each_part_and_memory_and_pass_flags_after_the_separator(fake_train, capsys):
    bench.main(["--selfplay-steps", "3", "--batch", "16", "--", "--lora-rank", "16", "--no-grad-batch", "8"])
    cfg = fake_train[0]
    assert (cfg.steps, cfg.batch_size, cfg.lora_rank, cfg.no_grad_batch) == (3, 16, 16, 8)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (*PARTS, "peak_rss_gb", "samples_per_step", "tokens_per_s"):
        assert key in result, key
    assert result["t_step"] == 2.5  # the mean of steps 2..3: step 1 pays one-off costs
    assert result["peak_rss_gb_update"] == 3.0  # a part's peak is the largest over all steps, step 1 included
    assert result["selfplay_flags"] == "--lora-rank 16 --no-grad-batch 8"


def test_the_same_command_without_flags_runs_the_defaults(fake_train, capsys):
    bench.main(["--selfplay-steps", "2", "--batch", "4"])
    assert fake_train[0].lora_rank == 0 and fake_train[0].batch_size == 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["selfplay_flags"] == ""


def test_selfplay_flags_without_selfplay_steps_are_one_clear_error():
    with pytest.raises(UserError, match="use them with --selfplay-steps"):
        bench.main(["--batch", "4", "--", "--lora-rank", "16"])

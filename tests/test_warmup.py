"""warmup.py: the demos of the warm-up (all) and of the auxiliary SFT loss during RL (helpful only),
the stream of SFT batches a resumed run picks up, and the warm-up's cache key."""
import dataclasses

import torch

import rl
from common import read_jsonl
from conftest import make_tokenizer
from warmup import DEMOS, WarmupSettings, demo_experiences, sft_batches, warmup_key


def test_the_sft_loss_during_rl_uses_the_helpful_demos_only():
    """As released, the SFT loss during RL anchors helpfulness: the defender's answers to benign requests."""
    tokenizer = make_tokenizer()
    helpful = [r for r in read_jsonl(DEMOS / "defender.jsonl") if r["type"] == "benign"]
    demos = demo_experiences(tokenizer, helpful_only=True)
    assert len(demos) == len(helpful) and all(d.role == rl.DEFENDER for d in demos)
    answers = [tokenizer.decode(d.tokens) for d in demos]
    assert all(r["answer"] in a for r, a in zip(helpful, answers))
    everything = demo_experiences(tokenizer)  # the warm-up's: both roles, refusals too
    assert len(everything) > len(demos) and {d.role for d in everything} == {rl.ATTACKER, rl.DEFENDER}


def test_a_resumed_run_skips_the_sft_batches_already_used():
    demos = list(range(10))
    whole = sft_batches(demos, 4, torch.Generator().manual_seed(0))
    first = [next(whole) for _ in range(5)]  # 3 batches per pass over 10 demos: the second pass is reshuffled
    assert sorted(sum(first[:3], [])) == demos and first[3] != first[0]
    resumed = sft_batches(demos, 4, torch.Generator().manual_seed(0), skip=2)
    assert [next(resumed) for _ in range(3)] == first[2:]


def test_the_cache_key_changes_with_every_setting_and_only_with_them(tmp_path):
    settings = WarmupSettings(epochs=2, demos=32, lr=5e-5, grad_clip=1.0, seed=0, cot=True, dtype="float32")
    key = warmup_key(str(tmp_path), settings)
    assert warmup_key(str(tmp_path), dataclasses.replace(settings)) == key
    for name, value in (("epochs", 3), ("demos", 0), ("lr", 1e-4), ("grad_clip", 0.5), ("seed", 1), ("cot", False),
                        ("dtype", "bfloat16")):
        assert warmup_key(str(tmp_path), dataclasses.replace(settings, **{name: value})) != key, name
    (tmp_path / "model.safetensors").write_bytes(b"weights")  # the model's files count too
    assert warmup_key(str(tmp_path), settings) != key

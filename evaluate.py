"""Evaluation of checkpoints. NOT BUILT YET (issue: "Evaluation").

What will live here: attack success, refusal and benign compliance rates of the defender on prompt
sets (JSONL, or HarmBench / XSTest / JailbreakBench CSV layouts), attacker diversity on held-out
seeds (1 - mean pairwise all-MiniLM-L6-v2 cosine, 1 - Self-BLEU), revision faithfulness, and
report.json / report.md / generations.jsonl / charts.
"""
import sys

if __name__ == "__main__":
    sys.exit("error: evaluate.py is not built yet; see the README's roadmap")

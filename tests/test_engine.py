"""Engine lifetime (nothing depends on garbage-collection timing), the runner vLLM uses, and a grader
that works from any kind of caller."""
import gc
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import distill
import evaluate
from engine import _not_a_notice, make_llm, shutdown_llm
from tests.conftest import ROOT

GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


def _generate(llm, text="hello world"):
    from vllm import SamplingParams
    return list(llm.generate([text], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].token_ids)


def test_a_closed_engine_never_tears_down_the_next_one(qwen2_single):
    first = make_llm(qwen2_single, max_model_len=256, in_process=True)
    expected = _generate(first)
    shutdown_llm(first)
    del first
    second = make_llm(qwen2_single, max_model_len=256, in_process=True)
    try:
        gc.collect()  # a finaliser of the first engine, had it one left, would run here
        assert _generate(second) == expected
        shutdown_llm(second)
        shutdown_llm(second)  # a second close does nothing
    finally:
        shutdown_llm(second)


def test_a_second_open_engine_is_refused_with_a_clear_error(qwen2_single):
    first = make_llm(qwen2_single, max_model_len=256, in_process=True)
    try:
        with pytest.raises(RuntimeError, match="a vLLM engine is still open .*shutdown_llm"):
            make_llm(qwen2_single, max_model_len=256, in_process=True)
        assert len(_generate(first)) == 8
    finally:
        shutdown_llm(first)


def test_two_stage_mains_back_to_back_in_one_process(digit_model, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"Digit ({i})."}],
                                             "answer": "7"}) + "\n" for i in range(6)))
    common = ["--max-model-len", "512"]
    (summary,) = evaluate.main(["--model", digit_model, "--benchmarks", f"records={questions}", "--output-dir",
                                str(tmp_path / "eval"), "--max-tokens", "32", "--answer-tokens", "8"] + common)
    distilled = distill.main(["--teacher", digit_model, "--data", str(questions), "--output",
                              str(tmp_path / "d.jsonl"), "--samples", "2", "--max-tokens", "32"] + common)
    gc.collect()
    again = evaluate.main(["--model", digit_model, "--benchmarks", f"records={questions}", "--output-dir",
                           str(tmp_path / "eval2"), "--max-tokens", "32", "--answer-tokens", "8"] + common)
    assert summary["n"] == 6 and distilled["samples"] == 12
    assert again[0]["accuracy"] == summary["accuracy"]  # greedy: the same answers from a fresh engine


def test_only_an_engine_with_a_thinking_budget_is_held_to_the_v1_model_runner(qwen2_single, monkeypatch):
    """The forced-exit processor is a V1 processor; vLLM 0.32 picks Model Runner V2 on CUDA otherwise, and an engine
    without a budget (GRPO's rollouts at the recipe's flags) keeps that default."""
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    shutdown_llm(make_llm(qwen2_single, max_model_len=256, in_process=True))
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    llm = make_llm(qwen2_single, max_model_len=256, in_process=True, exit_ids=[5])
    try:
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
        assert llm.llm_engine.vllm_config.use_v2_model_runner is False
    finally:
        shutdown_llm(llm)


GRADE = "from data import grade; print(grade('<answer>1/2</answer>', '0.5'))"


@pytest.mark.parametrize("caller", ["script without a main guard", "stdin", "python -c"])
def test_the_grader_works_from_any_caller(caller, tmp_path):
    """Spawned multiprocessing workers re-import the caller's __main__: from stdin that raised EOFError."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    if caller == "script without a main guard":
        script = tmp_path / "quick.py"
        script.write_text(GRADE + "\n")
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=120)
    elif caller == "stdin":
        result = subprocess.run([sys.executable, "-"], input=GRADE, capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=120)
    else:
        result = subprocess.run([sys.executable, "-c", GRADE], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1.0"


def test_gpus_this_torch_cannot_use_stop_the_run_in_one_line(monkeypatch):
    """NVML sees GPUs, the driver is older than torch's CUDA: training on the CPU without a word was the result."""
    import engine

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(engine, "_driver_cuda_version", lambda: (12, 4))
    with pytest.raises(SystemExit, match=r"^error: 8 GPUs visible, but torch .* is built for CUDA 13.0 and this NVIDIA "
                                         r"driver runs CUDA 12.4 at most: install driver >= 580.65, or torch and vLLM "
                                         r"built for CUDA 12 \(docs/install.md\)$"):
        engine.on_gpu()
    monkeypatch.setattr(engine, "_driver_cuda_version", lambda: (13, 0))
    assert engine.on_gpu() is True
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert engine.on_gpu() is False


def test_of_the_layers_a_weight_sync_cannot_load_only_those_computed_from_the_config_are_kept_out_of_the_log():
    def layer_failed(name):  # as vLLM's layerwise reload logs it
        return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, "layerwise.py",
                                 266, "%s: Failed to load weights", (name,), None)
    assert not any(_not_a_notice(layer_failed(name)) for name in ("MRotaryEmbedding", "RotaryEmbedding",
                                                                  "FusedMMInputNorm"))
    assert _not_a_notice(layer_failed("QKVParallelLinear")) and _not_a_notice(layer_failed("RotaryEmbeddingProjection"))

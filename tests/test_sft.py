"""sft.py on tiny models: split-invariant loss, resume, masking, packing, export, the VLM path."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import sft
from data.records import Record
from tests.conftest import run_script


def write_data(path, n, seed=0, long_prompt=False):
    """Examples of very different lengths, so ranks and micro-batches see different token counts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        think = " ".join(f"step {j} adds {j % 7}" for j in range(rng.choice([2, 9, 30, 70])))
        question = f"Compute {i} plus {i}." + (" pad" * 300 if long_prompt else "")
        rows.append(Record(id=f"q{i}", messages=[{"role": "user", "content": question}], answer=str(2 * i),
                           target_think=think, target_answer=str(2 * i)).to_json())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_sft(model, data, out, *extra, nproc=1):
    return run_script("sft.py", "--model", model, "--data", data, "--output-dir", out, "--max-length", 256,
                      "--save-every", 0, *extra, nproc=nproc)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_is_the_same_however_the_batch_is_split(qwen2_single, tmp_path, layout):
    data = write_data(tmp_path / "d.jsonl", 16)
    common = ["--global-batch-size", "4", "--max-steps", "4", "--layout", layout]
    fast = ["--no-activation-checkpointing"]
    held_out = ["--eval-data", data, "--eval-every", "2"]
    one = run_sft(qwen2_single, data, tmp_path / "one", *common, *fast, *held_out, "--max-tokens-per-micro-batch", "4096")
    assert f"attention sdpa, layout {layout}, activation checkpointing off" in one.stdout
    run_sft(qwen2_single, data, tmp_path / "accum", *common, *fast, "--max-tokens-per-micro-batch", "200")
    run_sft(qwen2_single, data, tmp_path / "ranks", *common, *fast, *held_out, "--max-tokens-per-micro-batch", "300",
            nproc=2)
    assert _micro_batch_counts_differ_between_ranks(qwen2_single, data, 4, 300, layout, steps=4)
    recompute = run_sft(qwen2_single, data, tmp_path / "recompute", *common, "--activation-checkpointing",
                        "--max-tokens-per-micro-batch", "4096")
    assert "activation checkpointing on" in recompute.stdout
    reference = losses(tmp_path / "one")
    assert len(reference) == 4 and reference[0] > reference[-1]  # it learns
    for run in ("accum", "ranks", "recompute"):
        assert losses(tmp_path / run) == pytest.approx(reference, abs=1e-5), run
    with open(tmp_path / "one" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    # the held-out loss every 2 steps, the same whether one process or two share the held-out examples
    with open(tmp_path / "ranks" / "metrics.jsonl") as fh:
        two = [json.loads(line).get("eval_loss") for line in fh]
    assert [r.get("eval_loss") is not None for r in rows] == [False, True, False, True]
    assert two == pytest.approx([r.get("eval_loss") for r in rows], abs=1e-5)
    # under a pipe (a cluster job's log), one plain line per step instead of a progress bar
    lines = [line for line in one.stdout.splitlines() if line.startswith("sft step ")]
    assert [line.split(" | ")[:2] for line in lines] == [[f"sft step {i + 1}/4", f"loss {reference[i]:.4f}"]
                                                          for i in range(4)]
    assert "held-out loss" in lines[1] and "tokens/s" in lines[0] and "\r" not in one.stdout
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction", "peak_memory_gib"} <= set(rows[0])
    assert rows[0]["peak_memory_gib"] > 0.1
    # one packed row holds no padding; padded rows pad each sequence to the longest in its micro-batch
    from packing import micro_batches
    expected = []
    for lengths in _lengths_per_step(qwen2_single, data, 4, 4):
        groups = micro_batches(lengths, 4096, layout)
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        expected.append(0.0 if layout == "packed" else 1 - sum(lengths) / padded)
    assert [row["padding_fraction"] for row in rows] == pytest.approx(expected, abs=1e-12)
    assert layout == "packed" or max(expected) > 0.05  # padding is there to count


def _lengths_per_step(model, data, global_batch, steps) -> list[list[int]]:
    """The token counts of each step's examples, in the order sft.py takes them."""
    from transformers import AutoTokenizer

    from data import load_records
    from training import step_indices
    args = sft.parse_args(["--model", model, "--data", data, "--output-dir", "o", "--max-length", "256"])
    examples, _ = sft.tokenize(load_records(data), AutoTokenizer.from_pretrained(model), args)
    per_epoch = len(examples) // global_batch
    return [[len(examples[i].ids) for i in step_indices(len(examples), global_batch, step, per_epoch, 0)]
            for step in range(steps)]


def _micro_batch_counts_differ_between_ranks(model, data, global_batch, budget, layout, steps) -> bool:
    """Whether, in some step, the two ranks' shares cut into different numbers of micro-batches (each rank
    must then still run as many forward and backward passes as the other, or FSDP's collectives hang)."""
    from packing import micro_batches
    half = global_batch // 2
    return any(len({len(micro_batches(lengths[r * half:(r + 1) * half], budget, layout)) for r in range(2)}) > 1
               for lengths in _lengths_per_step(model, data, global_batch, steps))


@pytest.mark.parametrize("n_examples,layout", [(16, "padded"), (12, "packed")],
                         ids=["mid-epoch-padded", "epoch-boundary-packed"])
def test_resume_gives_identical_parameters(qwen2_single, tmp_path, n_examples, layout):
    # 4 per step: 16 examples = 4 steps per epoch (stop mid-epoch), 12 = 3 (stop exactly at the boundary).
    data = write_data(tmp_path / "d.jsonl", n_examples)
    common = ["--global-batch-size", "4", "--max-tokens-per-micro-batch", "300", "--epochs", "2", "--lr", "1e-3",
              "--layout", layout]
    run_sft(qwen2_single, data, tmp_path / "full", *common, "--max-steps", "6")
    run_sft(qwen2_single, data, tmp_path / "split", *common, "--max-steps", "3")
    if layout == "padded":  # a resume that changes what the checkpoint means stops in one line, before it loads
        refused = run_script("sft.py", "--model", qwen2_single, "--data", data, "--output-dir", tmp_path / "split",
                             "--max-length", 256, "--save-every", 0, *common, "--seed", 1, "--resume", check=False)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'split' / 'run.json'}: this run was started with --seed 0; it cannot continue with "
            "1 (start a new run in another --output-dir)")
    resumed = run_sft(qwen2_single, data, tmp_path / "split", *common, "--max-steps", "6", "--resume")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    with open(tmp_path / "split" / "run.json") as fh:
        recorded = json.load(fh)
    assert recorded["changed"] == {"max_steps": [3, 6], "resume": [False, True]} and len(recorded["earlier"]) == 1
    assert recorded["earlier"][0]["args"]["max_steps"] == 3 and recorded["args"]["max_steps"] == 6
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    with open(tmp_path / "split" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    steps_per_epoch = n_examples // 4
    assert [r["epoch"] for r in rows] == [s // steps_per_epoch for s in range(6)]
    assert rows[-1]["lr"] == pytest.approx(1e-3 * 0.8)  # the second epoch runs at lr x 0.8


def test_a_batch_with_no_target_tokens_gives_no_nan(qwen2_single, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 4, long_prompt=True)  # prompts longer than --max-length
    result = run_sft(qwen2_single, data, tmp_path / "o", "--global-batch-size", "4", "--max-steps", "1",
                     "--max-tokens-per-micro-batch", "300", nproc=2)  # neither rank has a target: no hang, no NaN
    assert "4 truncated" in result.stdout
    with open(tmp_path / "o" / "metrics.jsonl") as fh:
        row = json.loads(fh.readline())
    assert row["target_tokens"] == 0 and row["loss"] == 0.0
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "o").values())


def test_the_held_out_loss_is_the_training_objective_on_the_held_out_examples(qwen2_single, tmp_path):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from training import load_model
    records = [Record.from_json(json.loads(line)) for line in open(write_data(tmp_path / "d.jsonl", 5))]
    args = sft.parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--max-tokens-per-micro-batch", "200"])
    examples, _ = sft.tokenize(records, AutoTokenizer.from_pretrained(qwen2_single), args)
    model = load_model(qwen2_single)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        held_out = sft.held_out_loss(model, examples, args, "padded", "cpu")
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        summed = sum(sft.summed_token_loss(model, sft.collate([e]), "cpu").item() for e in examples)
    targets = sum(label != sft.IGNORE for e in examples for label in e.labels)
    assert held_out == pytest.approx(summed / targets, rel=1e-6) and model.training


def test_loss_depends_on_assistant_targets_only(qwen2_single):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_single)
    record = Record(id="a", messages=[{"role": "user", "content": "What is 2+2?"}], answer="4",
                    target_think="two and two", target_answer="4")
    args = sft.parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])
    (example,), _ = sft.tokenize([record], tok, args)
    ids = example.ids
    prompt = tok.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    batch = sft.collate([example])
    # the prediction made at position t is of token t + 1: the targets are the assistant tokens, each once
    assert batch["target_index"].tolist() == list(range(n_prompt - 1, len(ids) - 1))
    assert batch["target_ids"].tolist() == ids[n_prompt:]


def _packed_inputs(model):
    """Capture what the decoder receives."""
    seen = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_micro_batch_in_either_layout_has_the_per_example_loss_and_gradients(qwen2_single, tmp_path, layout):
    from transformers import AutoTokenizer

    from training import load_model
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    model = load_model(qwen2_single, activation_checkpointing=False)
    records = [Record.from_json(json.loads(line)) for line in open(write_data(tmp_path / "d.jsonl", 5))]
    args = sft.parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])
    examples, _ = sft.tokenize(records, tok, args)
    lengths = [len(e.ids) for e in examples]
    assert len(set(lengths)) > 1
    seen, handle = _packed_inputs(model)
    together = sft.summed_token_loss(model, sft.collate(examples, layout), "cpu")
    handle.remove()
    (inputs,) = seen
    assert inputs.get("attention_mask") is None
    if layout == "packed":  # exactly what flash-attention 2 reads as packed sequences: one row, restarting positions
        assert inputs["input_ids"].shape == (1, sum(lengths))
        assert inputs["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    else:  # a row each, padded after its last token, where causal attention never looks back at it
        assert inputs["input_ids"].shape == (len(lengths), max(lengths))
        assert inputs["position_ids"].tolist() == [list(range(max(lengths)))] * len(lengths)
    single = sum(sft.summed_token_loss(model, sft.collate([e]), "cpu") for e in examples)
    assert together.item() == pytest.approx(single.item(), rel=1e-5)
    # and the gradients, too
    together.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    single = sum(sft.summed_token_loss(model, sft.collate([e]), "cpu") for e in examples)
    single.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_exported_model_loads_in_transformers_and_vllm(qwen2_single, tmp_path, vllm_engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    data = write_data(tmp_path / "d.jsonl", 8)
    run_sft(qwen2_single, data, tmp_path / "o", "--global-batch-size", "4",
            "--max-steps", "2", "--lr", "1e-3")
    exported = str(tmp_path / "o" / "model")
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok("hello", return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    out = vllm_engine(exported).generate(
        [{"prompt_token_ids": ids[0].tolist()}], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf
    before = load_file(os.path.join(qwen2_single, "model.safetensors"))
    after = weights(tmp_path / "o")
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_vlm_trains_on_text_with_the_vision_tower_frozen(qwen2_5_vl, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 8)
    run_sft(qwen2_5_vl, data, tmp_path / "o", "--global-batch-size", "4", "--max-tokens-per-micro-batch", "1",
            "--max-steps", "2", "--lr", "1e-3", nproc=2)
    before = load_file(os.path.join(qwen2_5_vl, "model.safetensors"))
    after = weights(tmp_path / "o")
    vision = [k for k in before if ".visual." in f".{k}"]
    text = [k for k in before if "layers" in k and k not in vision]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)
    assert os.path.exists(tmp_path / "o" / "model" / "preprocessor_config.json")


def test_non_finite_loss_stops_without_a_checkpoint(qwen2_single, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 8)
    result = run_script("sft.py", "--model", qwen2_single, "--data", data, "--output-dir", tmp_path / "o",
                        "--global-batch-size", 4, "--max-steps", 3, "--lr", 1e30,
                        "--max-length", 256, check=False)
    assert result.returncode != 0
    assert "the loss is nan" in result.stderr or "the loss is inf" in result.stderr
    # the defaults on CPU: SDPA, so padded rows; memory to spare, so no recomputation
    assert (f"model: {qwen2_single} on 1 x cpu, attention sdpa, layout padded, activation checkpointing off, "
            "training language") in result.stdout
    assert not os.path.exists(tmp_path / "o" / "checkpoints") or not os.listdir(tmp_path / "o" / "checkpoints")


EXPORT_IN_BF16 = """
import json, sys, torch
import torch.distributed as dist
from safetensors.torch import load_file
from training import COLLECTIVE_TIMEOUT, export_model, init_distributed, load_model, shard_model
rank, world, device = init_distributed()
assert dist.group.WORLD._get_backend(device).options._timeout == COLLECTIVE_TIMEOUT
model = shard_model(load_model(sys.argv[1]), device)
export_model(model, sys.argv[1], sys.argv[2], dtype=torch.bfloat16)
config = json.load(open(sys.argv[2] + "/config.json"))
weights = load_file(sys.argv[2] + "/model.safetensors")
print(config["dtype"], {str(v.dtype) for v in weights.values()})
dist.destroy_process_group()
"""


def test_the_exported_config_states_the_dtype_of_the_weights(qwen2_single, tmp_path):
    """On GPU the export is bf16; the config must say so (it said float32, the dtype of the fp32 masters)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    result = subprocess.run([sys.executable, "-c", EXPORT_IN_BF16, qwen2_single, str(tmp_path / "bf16")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "bfloat16 {'torch.bfloat16'}"
    with open(os.path.join(qwen2_single, "config.json")) as fh:
        assert json.load(fh)["dtype"] == "float32"  # the source said float32: the export changed it


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(qwen2_single, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 4)
    common = ["--global-batch-size", "4", "--max-steps", "1", "--no-activation-checkpointing"]
    run_sft(qwen2_single, data, tmp_path / "o", *common)
    again = run_script("sft.py", "--model", qwen2_single, "--data", data, "--output-dir", tmp_path / "o", *common,
                       check=False)
    assert again.returncode == 1
    assert f"{tmp_path / 'o' / 'checkpoints'} holds an earlier run's checkpoints; pass --resume" in again.stderr

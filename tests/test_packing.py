"""packing.py: token-budget micro-batches in both layouts (one packed row; length-sorted padded rows), and
chunked target log-probabilities that equal the unchunked computation, gradients included."""
import pytest
import torch
import torch.nn.functional as F

from packing import MICRO_BATCH_COST_TOKENS, chunked_target_logprobs, layout_for, micro_batches, pack


def test_micro_batches_by_token_budget():
    assert micro_batches([5, 3, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]  # 10 > 8 goes alone
    assert micro_batches([2, 2, 2], 100) == [[0, 1, 2]]
    assert micro_batches([], 8) == []


def test_padded_micro_batches_sort_by_length_and_split_where_padding_costs_more_than_a_pass():
    assert MICRO_BATCH_COST_TOKENS == 128  # the values below are computed by hand for it
    # longest first: 10 alone (over the budget), 5 with 4 would be 2 x 5 = 10 > 8, then 4 and 3 (2 x 4 = 8)
    assert micro_batches([5, 3, 4, 10, 1, 1], 8, "padded") == [[3], [0], [2, 1], [4, 5]]
    # one group: 5 x 1,000 + 128 = 5,128 tokens' cost; split: 2 x 1,000 + 128 + 3 x 10 + 128 = 2,286
    assert micro_batches([1000, 990, 10, 10, 10], 100000, "padded") == [[0, 1], [2, 3, 4]]
    # a split that saves fewer padded tokens than a pass costs is not taken: 3 x 300 + 128 < 2 x 300 + 250 + 2 x 128
    assert micro_batches([300, 300, 250], 100000, "padded") == [[0, 1, 2]]
    assert micro_batches([], 8, "padded") == []


def test_the_layout_follows_the_attention_kernel():
    assert layout_for("varlen") == "packed" and layout_for("flash_attention_2") == "packed"
    assert layout_for("sdpa") == "padded" and layout_for("eager") == "padded"


def test_pad_puts_each_sequence_in_its_own_row_and_maps_targets_into_the_flattened_rows():
    batch = pack([[1, 2, 3], [4, 5]], [[(1, 3), (0, 2)], [(0, 5)]], layout="padded")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2], [0, 1, 2]]  # increasing in every row: no packing seen
    assert batch["target_index"].tolist() == [1, 0, 3] and batch["target_ids"].tolist() == [3, 2, 5]
    rope = pack([[1, 2, 3], [4, 5]], [[], []], [torch.tensor([[0, 1, 1], [0, 1, 2], [0, 2, 1]]), None], "padded")
    assert rope["rope_positions"].shape == (3, 2, 3)
    assert rope["rope_positions"][:, 0].tolist() == [[0, 1, 1], [0, 1, 2], [0, 2, 1]]
    assert rope["rope_positions"][:, 1].tolist() == [[0, 1, 2]] * 3  # text: its positions, padding continues



def test_pack_concatenates_with_restarting_positions_and_maps_targets():
    batch = pack([[1, 2, 3], [4, 5]], [[(1, 3), (0, 2)], [(0, 5)]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["target_index"].tolist() == [1, 0, 3] and batch["target_ids"].tolist() == [3, 2, 5]
    # the sequence boundaries, computed once here for every layer's varlen attention
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 3 and isinstance(batch["max_length"], int)
    assert "cu_seq_lens" not in pack([[1, 2, 3], [4, 5]], [[], []], layout="padded")


def _sdpa_per_sequence(calls):
    """A stand-in for the varlen kernel on CPU (torch's and flash-attn's run on CUDA only): causal SDPA on each
    sequence of the row alone, recording the boundaries it was given."""
    def kernel(q, k, v, cu_seq_lens, max_length, scale):
        calls.append((cu_seq_lens, max_length))
        out = [F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                              scale=scale, enable_gqa=True).transpose(0, 1)
               for start, end in zip(cu_seq_lens.tolist(), cu_seq_lens.tolist()[1:])]
        return torch.cat(out)
    return kernel


def test_varlen_attention_on_a_packed_row_gives_the_padded_layouts_loss_and_gradients(qwen2_5_vl, tmp_path,
                                                                                     monkeypatch):
    """The packed path's plumbing on a VLM (images and text in one row): the language model's attention registered
    as "varlen" gets the boundaries pack() computed, the same tensor in every layer, and attends per sequence; the
    vision tower keeps SDPA. Loss and gradients equal those of the padded layout under SDPA."""
    from transformers import AutoImageProcessor, AutoTokenizer

    import packing
    import sft
    from tests.conftest import sum_records_file
    from training import load_model
    tokenizer, processor = AutoTokenizer.from_pretrained(qwen2_5_vl), AutoImageProcessor.from_pretrained(qwen2_5_vl)
    examples, _ = sft.tokenize(sum_records_file(tmp_path), tokenizer, sft.parse_args(
        ["--model", qwen2_5_vl, "--data", "d", "--output-dir", "o", "--no-cot"]), processor)
    train = frozenset({"language", "projector", "vision"})
    varlen = load_model(qwen2_5_vl, train=train, images_in_batches=True, attn_implementation="varlen")
    padded = load_model(qwen2_5_vl, train=train, images_in_batches=True, attn_implementation="sdpa")
    assert (varlen.config.text_config._attn_implementation, varlen.config.vision_config._attn_implementation) == \
        ("varlen", "sdpa")
    calls = []
    monkeypatch.setattr(packing, "varlen_kernel", _sdpa_per_sequence(calls))
    batch = sft.collate(examples, "packed", varlen, processor)
    together = sft.summed_token_loss(varlen, batch, "cpu")
    reference = sft.summed_token_loss(padded, sft.collate(examples, "padded", padded, processor), "cpu")
    assert together.item() == pytest.approx(reference.item(), rel=1e-5)
    layers = varlen.config.text_config.num_hidden_layers
    lengths = [len(e.ids) for e in examples]
    assert len(calls) == layers and all(cu is calls[0][0] for cu, _ in calls)  # computed once, read by every layer
    assert calls[0][0].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert all(n == max(lengths) for _, n in calls)
    together.backward()
    reference.backward()
    grads = dict(padded.named_parameters())
    for name, param in varlen.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_varlen_attention_refuses_a_row_without_boundaries():
    from packing import varlen_attention
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention 'varlen' takes one packed row with its sequence boundaries"):
        varlen_attention(module, q, q, q, None)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_log_probs_and_gradients_equal_the_full_computation(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, dtype=torch.float32, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (10,))
    full = -F.cross_entropy(lm_head(hidden) / 0.7, targets, reduction="none")
    (full * torch.arange(10.0)).sum().backward()  # unequal weights, so every position's gradient is checked
    expected_hidden, expected_weight = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad, lm_head.weight.grad = None, None

    logprobs, entropy = chunked_target_logprobs(hidden, lm_head, targets, temperature=0.7, with_entropy=True,
                                                chunk=chunk)
    assert torch.allclose(logprobs, full, atol=1e-6)
    (logprobs * torch.arange(10.0)).sum().backward()
    assert torch.allclose(hidden.grad, expected_hidden, atol=1e-6)
    assert torch.allclose(lm_head.weight.grad, expected_weight, atol=1e-6)
    p = torch.softmax(lm_head(hidden) / 0.7, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5) and not entropy.requires_grad


def test_no_targets_still_connects_to_the_graph():
    hidden = torch.randn(4, 8, requires_grad=True)
    lm_head = torch.nn.Linear(8, 20, bias=False)
    logprobs, _ = chunked_target_logprobs(hidden[:0], lm_head, torch.zeros(0, dtype=torch.long))
    assert logprobs.shape == (0,)
    logprobs.sum().backward()  # a rank with nothing to learn still runs backward (FSDP's collectives)
    assert lm_head.weight.grad is not None and lm_head.weight.grad.abs().sum() == 0


def test_an_empty_micro_batch_is_one_token_without_targets():
    batch = pack([], [])
    assert batch["input_ids"].shape == (1, 1) and batch["target_ids"].numel() == 0

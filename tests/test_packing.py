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
    assert layout_for("flash_attention_2") == "packed" and layout_for("flash_attention_3") == "packed"
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

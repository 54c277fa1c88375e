"""SamplingParams: how to pick each next token and when to stop, with vLLM's names and meanings."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

_GREEDY_EPS = 1e-5
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_OPTIONAL_FIELDS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def is_integer(value) -> bool:
    """An int or a numpy integer; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite int or float (numpy's too); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


class RequestOutputKind(enum.Enum):
    """When `LLMEngine.step` reports a request's progress."""

    CUMULATIVE = "cumulative"  # every step it progressed, with everything generated so far
    DELTA = "delta"  # every step it progressed, with only what is new since its previous output
    FINAL_ONLY = "final_only"  # once, when it finishes (the offline LLM.generate)


@dataclass
class SamplingParams:
    """Per-request decoding settings. Validated on construction; bad values raise ValueError naming the field."""

    n: int = 1  # number of completions to return for the prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 = all
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the most likely one's; in [0, 1]
    seed: int | None = None  # makes the request reproducible whatever else is in the batch
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated; in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text; in [-2, 2]
    repetition_penalty: float = 1.0  # HF's: divides positive / multiplies negative logits of prompt and output tokens; > 0
    max_tokens: int | None = 16  # most tokens to generate; None = up to max_model_len
    min_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens are generated
    stop: str | list[str] | None = None  # strings that end generation; cut from the text
    stop_token_ids: list[int] | None = None  # token ids that end generation (kept in token_ids)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    ignore_eos: bool = False  # keep generating past EOS
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to its logit before sampling
    logprobs: int | None = None  # return this many top log-probabilities per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # same, for every prompt token
    skip_special_tokens: bool = True  # leave special tokens out of the text
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # when step() reports this request
    stop_strings: list[str] = field(init=False, repr=False)
    stop_hold: int = field(init=False, repr=False)  # characters of running output held back: a stop string may start there

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        self.stop_hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        # numpy scalars are welcome (and become Python numbers); booleans and strings are not.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if not is_integer(value):
                raise bad(name, "must be an integer")
            setattr(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not is_number(value):
                raise bad(name, "must be a finite number")
            setattr(self, name, float(value))
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)) or any(
                not isinstance(s, str) for s in self.stop_strings):
            raise bad("stop", "must be a string or a list of strings")
        if any(not is_integer(t) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers)")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise bad("top_k", "must be -1 (disabled) or at least 1")
        if self.seed is not None and not _INT64_MIN <= self.seed <= _INT64_MAX:
            raise bad("seed", f"must be a 64-bit signed integer, in [{_INT64_MIN}, {_INT64_MAX}]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be greater than 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", "must be non-negative")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias")
            for token, bias in self.logit_bias.items():
                if not is_integer(token):
                    raise ValueError(f"logit_bias keys are token ids (integers), got {token!r}")
                if not is_number(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", f"must be a RequestOutputKind ({', '.join(k.name for k in RequestOutputKind)})")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

"""Generation settings: one frozen, validated dataclass with the reference ``chat()`` defaults (docs/model.md §7).

``GenerationConfig.for_chat(sampling, **kwargs)`` is what :meth:`MiniCPMV.chat` uses: ``sampling=True``
starts from top_p 0.8, top_k 100, temperature 0.7, repetition_penalty 1.05; ``sampling=False`` from beam
search with 3 beams and repetition_penalty 1.2. Every keyword overrides its default; an unknown keyword
is an error (the reference silently drops keys outside its defaults — we do not).

Values that vary per request (temperature, top-k/p, penalties, token counts) become arrays inside the
compiled loop, so changing them never recompiles; only the strategy (greedy / sampling / beams), the
number of beams and the bucketed buffer sizes are static.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from minicpmv_jax.errors import ArgumentError

__all__ = ["GenerationConfig", "SAMPLING_DEFAULTS", "BEAM_DEFAULTS", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 2048
SAMPLING_DEFAULTS = dict(top_p=0.8, top_k=100, temperature=0.7, repetition_penalty=1.05)
BEAM_DEFAULTS = dict(num_beams=3, repetition_penalty=1.2)
_SAMPLING_ONLY = ("temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    Attributes:
      do_sample: sample from the processed distribution (else greedy, or beam search with num_beams > 1).
      max_new_tokens: most tokens generated per row (the stop token included).
      min_new_tokens: stop tokens are suppressed until this many tokens were generated.
      temperature, top_k, top_p: sampling warpers (top_k 0 and top_p 1.0 disable theirs).
      repetition_penalty: HF's rule on generated tokens (1.0 disables).
      num_beams: beams of beam search (1 = no beam search).
      length_penalty: beam score = sum of log-probs / generated_length ** length_penalty.
      seed: PRNG seed of sampling; same seed, same text.
    """

    do_sample: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ArgumentError("{} must be an int ≥ {minimum}, got {value!r}", name, minimum=minimum, value=v)

        def number(name: str, ok, what: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ArgumentError("{} must be {what}, got {value!r}", name, what=what, value=v)

        if not isinstance(self.do_sample, bool):
            raise ArgumentError("{} must be True or False, got {value!r}", "do_sample", value=self.do_sample)
        positive_int("max_new_tokens", 1)
        positive_int("min_new_tokens", 0)
        positive_int("top_k", 0)
        positive_int("num_beams", 1)
        number("temperature", lambda v: v > 0, "a positive number")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        number("repetition_penalty", lambda v: v > 0, "a positive number")
        number("length_penalty", lambda v: True, "a finite number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ArgumentError("{} must be an int, got {value!r}", "seed", value=self.seed)
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling (do_sample with num_beams > 1) is not supported: use sampling=True "
                             "with num_beams=1, or sampling=False for beam search")

    @property
    def strategy(self) -> str:
        """``"beam"``, ``"sample"`` or ``"greedy"``."""
        return "beam" if self.num_beams > 1 else "sample" if self.do_sample else "greedy"

    @classmethod
    def for_chat(cls, sampling: bool = True, **kwargs: Any) -> "GenerationConfig":
        """The reference ``chat()`` defaults for ``sampling``, overridden by ``kwargs`` (docs/model.md §7).

        ``do_sample`` may be given to override ``sampling``. Sampling-only keywords (temperature, top_k,
        top_p) given to a greedy or beam-search call have no effect, as in transformers; a warning says so.

        Raises:
          TypeError: an unknown keyword (the message lists the accepted ones).
          ValueError: a value out of range, naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"unknown generation keyword(s) {unknown}; accepted: {sorted(fields)}")
        if not isinstance(sampling, bool):
            raise ArgumentError("{} must be True or False, got {value!r}", "sampling", value=sampling)
        do_sample = kwargs.pop("do_sample", sampling)
        values: dict[str, Any] = dict(SAMPLING_DEFAULTS if do_sample else BEAM_DEFAULTS)
        values.update(kwargs)
        if not do_sample:
            ignored = sorted(k for k in _SAMPLING_ONLY if k in kwargs)
            if ignored:
                warnings.warn(f"{ignored} only act when sampling; this call is greedy/beam search", stacklevel=3)
            for k in _SAMPLING_ONLY:
                values.pop(k, None)
        return cls(do_sample=do_sample, **values)
